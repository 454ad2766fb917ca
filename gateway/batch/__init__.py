"""OpenAI's Batch API (``/v1/files``, ``/v1/batches``) with its state in Kafka."""
