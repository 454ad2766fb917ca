"""Shared settings, Kafka plumbing, local broker, analytics and the command line."""
