"""From a timing to the figures every benchmark row reports: ms per call, img/s, achieved
TFLOP/s, % of the device's measured peak, peak memory."""
from __future__ import annotations

from typing import Optional


def figures(*, median_s: float, spread_s: float, images: int, flops: Optional[float],
            peak_flops: Optional[float], peak_memory: Optional[int]) -> dict:
    """flops: work of one timed call (None where it is not a matmul-class op); peak_flops: the
    device's measured peak in the same dtype; peak_memory: bytes, or None where not measured."""
    tflops = flops / median_s / 1e12 if flops else None
    return {
        "ms_median": median_s * 1e3,
        "ms_spread": spread_s * 1e3,
        "img_per_s": images / median_s,
        "tflops": tflops,
        "pct_of_peak": 100.0 * tflops * 1e12 / peak_flops if tflops is not None and peak_flops else None,
        "peak_memory_mib": peak_memory / 2 ** 20 if peak_memory is not None else None,
    }


def cell(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    """A table cell: n/a for a figure that was not (or cannot be) measured."""
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"
