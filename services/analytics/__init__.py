"""Usage and latency analytics on the token log (faust-streaming)."""
