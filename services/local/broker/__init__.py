"""Run a single-node Apache Kafka broker (KRaft) from Maven-resolved jars, for one machine and for tests."""
