"""Where a running `tokenrelay up` put Kafka, so that client commands in another shell find it by default."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from services.settings import Settings

STATE_FILE = "up.json"


@dataclass(frozen=True, slots=True)
class UpState:
    """What `tokenrelay up` tells the client commands while it runs."""

    pid: int
    kafka_bootstrap: str
    topic_prefix: str
    local_broker: bool
    gateway_url: str
    analytics_url: str
    schema_registry_url: str = ""  # the registry the stack writes with, so that clients decode the log


def state_path(settings: Settings) -> Path:
    return settings.cache_dir / STATE_FILE


def write_state(settings: Settings, state: UpState) -> Path:
    path = state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1) + "\n")
    tmp.replace(path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(settings: Settings) -> UpState | None:
    """The state of a `tokenrelay up` that is still running, else None (a stale file is ignored)."""
    try:
        data = json.loads(state_path(settings).read_text())
        state = UpState(**data)
    except (OSError, ValueError, TypeError):
        return None
    return state if _alive(state.pid) else None


def clear_state(settings: Settings, pid: int) -> None:
    """Remove the state file if it is this process's (another `up` may have written its own since)."""
    current = read_state(settings)
    if current is None or current.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            state_path(settings).unlink()
