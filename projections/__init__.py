"""Read side of ledgerflow: ClickHouse projections of the event log and the service that owns them.

Why a package of its own: the sink is the only Kafka → ClickHouse path (effectively-once,
resuming from what ClickHouse already holds), and the embedded store (chDB) can be opened
by one process only, so the same process serves read-only SQL to everybody else.

Modules: `store` (open a ClickHouse/chDB client), `migrations` (versioned DDL), `schema`
(event → row, pure), `sqlguard` (read-only SQL checks, pure), `sink` (the consumer),
`replay` (rebuild tables into another database from the log, and checksum-compare them),
`service` (the process: migrations, sink thread, replay jobs, HTTP SQL endpoint).
Dependencies point one way: this package imports `streams` (and may import `domain`), never
`ledgerflow`, `gateway` or `agents`; settings arrive as plain parameters.
"""
