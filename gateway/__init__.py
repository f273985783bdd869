"""The write side: aiohttp ingress that authenticates, answers, and records facts on Kafka.

It never reads ClickHouse; everything it needs at request time is in memory.
"""
