"""The Faust app and its agents: Kafka → fold → Kafka. Folds live in `domain/`."""
