"""Contracts: event types, their Avro codec, topics, and Kafka plumbing.

This package imports nothing else of ledgerflow's; every other side imports it.
"""
