"""Locate the default model: the committed build, or one built on demand into the user cache."""

from __future__ import annotations

from pathlib import Path

from services.settings import Settings

DEFAULT_MODEL_NAME = "default"
COMMITTED_DIR = Path(__file__).resolve().parent / "default"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _cache_dir(cache_dir: Path | None = None) -> Path:
    base = Settings.from_env().cache_dir if cache_dir is None else cache_dir
    return base / "models" / DEFAULT_MODEL_NAME


def is_complete(directory: Path) -> bool:
    """True when ``directory`` holds everything ``from_pretrained`` needs for model and tokenizer."""
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The committed ``workers/model/default`` when present, else ``models/default`` under the cache directory
    (``TOKENRELAY_CACHE_DIR``; it may not exist yet)."""
    return COMMITTED_DIR if is_complete(COMMITTED_DIR) else _cache_dir(cache_dir)


def ensure_default_model(progress: bool = True, cache_dir: Path | None = None) -> Path:
    """Return a directory holding the default model, training it into the cache first if it is missing."""
    directory = default_model_dir(cache_dir)
    if not is_complete(directory):
        from workers.model.build import build_model  # deferred: pulls in torch and transformers

        build_model(directory, progress=progress)
    return directory


def resolve_model(name: str, cache_dir: Path | None = None) -> str:
    """Map ``"default"`` to the default model directory (building it if needed); pass paths and hub ids through."""
    if name == DEFAULT_MODEL_NAME:
        return str(ensure_default_model(cache_dir=cache_dir))
    return name
