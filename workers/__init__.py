"""The inference worker: Kafka intake, engine with continuous batching, token publishing."""
