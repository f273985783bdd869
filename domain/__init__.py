"""Pure logic the sides share: pricing, folds. No I/O, no Kafka, no ClickHouse."""
