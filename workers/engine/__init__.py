"""Inference engine: iteration-level scheduler, model runner, sampling and incremental detokenization."""
