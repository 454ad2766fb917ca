"""The project's own small default model: corpus, training, and locating the built weights."""

from workers.model.registry import DEFAULT_MODEL_NAME, default_model_dir, ensure_default_model, resolve_model

__all__ = ["DEFAULT_MODEL_NAME", "default_model_dir", "ensure_default_model", "resolve_model"]
