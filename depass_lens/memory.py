"""How much memory a device has free now: the default that ``memory_budget`` scales from."""

from __future__ import annotations

import torch

#: What :func:`free_memory` assumes where it cannot ask (no ``/proc/meminfo``).
FALLBACK_BYTES = 4 * 1024**3


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's count on a GPU, ``MemAvailable`` on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return FALLBACK_BYTES


__all__ = ["FALLBACK_BYTES", "free_memory"]
