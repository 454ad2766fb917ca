"""Machine resources the engine sizes itself by: torch threads and the memory a KV cache may take."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

# Share of the memory free at load that the KV cache may take when no budget is set.
DEFAULT_KV_FRACTION = 0.5


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_torch_threads(threads: int = 0) -> int:
    """Set torch's intra-op threads: ``threads``, or cores - 1 (at least 1) when 0, leaving a core to the event loop
    and Kafka clients; oversubscribed threads made the engine many times slower on a busy 2-core box."""
    count = threads if threads > 0 else max(1, usable_cores() - 1)
    torch.set_num_threads(count)
    return count


def default_kv_cache_bytes(device: torch.device) -> int:
    """Half of the memory free now on ``device`` (GPU memory on cuda, available RAM otherwise)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(free * DEFAULT_KV_FRACTION)
