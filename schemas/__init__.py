"""Avro schemas of the topics and their pure encode/decode code."""
