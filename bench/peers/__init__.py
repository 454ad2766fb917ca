"""Peer engines run in their own virtualenvs for side-by-side benchmarks (never product dependencies)."""
