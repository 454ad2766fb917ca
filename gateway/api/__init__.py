"""The APIs: native and OpenAI-compatible handlers, body validation, keys and tokens, the edge checks."""
