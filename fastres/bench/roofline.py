"""The device's measured peak: a large matmul in the benchmark dtype, timed once per process
and cached, so each figure can say what fraction of the machine it used (the roofline column)."""
from __future__ import annotations

import functools

import torch

from .timing import synchronize, time_once


@functools.lru_cache(maxsize=None)
def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of an n x n x n matmul (n = 8192 on a GPU, 1024 on a CPU) over a few runs.

    fp32 on a GPU is measured with TF32 as cuDNN's convolutions use it (torch's default for
    convs is TF32 on, for matmuls off): the peak must be the one the benchmarked convs can reach.
    """
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        for _ in range(3):  # warm-up: clocks, cuBLAS heuristics, oneDNN primitive cache
            torch.mm(a, b)
        synchronize(device)
        best = min(time_once(lambda: torch.mm(a, b), device) for _ in range(10))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2.0 * n ** 3 / best
