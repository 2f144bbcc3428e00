"""Peak memory of one call. On a GPU: torch.cuda.max_memory_allocated over the call (weights,
inputs and optimizer state included, as a user sees it). On a CPU there is no allocator
high-water mark to reset, and max-RSS only grows, so the figure is reported as n/a."""
from __future__ import annotations

from typing import Callable, Optional

import torch

CPU_NOTE = "n/a on CPU (no resettable allocator peak)"


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated on `device` while `fn` runs (after a reset); None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def format_memory(nbytes: Optional[int]) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2 ** 20:.0f} MiB"
