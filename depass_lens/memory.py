"""How much memory a device has free now: the default that ``memory_budget`` scales from."""

from __future__ import annotations

import torch

#: What :func:`free_memory` assumes where it cannot ask (no ``/proc/meminfo``).
FALLBACK_BYTES = 4 * 1024**3


def proc_bytes(path: str, key: str) -> int | None:
    """A ``key:  N kB`` line of a Linux ``/proc`` file (``/proc/meminfo``, ``/proc/self/status``)
    in bytes, or ``None`` where the file or the key is missing."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's count on a GPU, ``MemAvailable`` on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    return FALLBACK_BYTES if available is None else available


__all__ = ["FALLBACK_BYTES", "free_memory", "proc_bytes"]
