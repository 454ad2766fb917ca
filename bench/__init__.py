"""Benchmarks: each module has a `run() -> dict[str, float]` and prints its figures when run alone."""
