"""Local infrastructure for development and tests (brokers we run without Docker)."""
