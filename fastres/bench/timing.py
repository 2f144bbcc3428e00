"""Honest wall-clock timing: warm-up, device synchronisation, interleaved rounds, median and spread."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Timing:
    name: str
    seconds: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seconds)

    @property
    def spread(self) -> float:
        """Standard deviation across rounds (0 for a single round)."""
        return statistics.stdev(self.seconds) if len(self.seconds) > 1 else 0.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: CUDA events around it on a GPU (the call's own queue time is not
    counted, the kernels are), wall clock on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def time_round_robin(candidates: Dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 2,
                     rounds: int = 5, blocks: int = 3, on_step: Optional[Callable[[str], None]] = None
                     ) -> Dict[str, Timing]:
    """Time each candidate `rounds` times in `blocks` interleaved blocks of consecutive calls.

    Interleaving the blocks spreads slow drift of the machine (clock, other load) over every
    candidate; consecutive calls inside a block, each block after an untimed call, keep each
    candidate's caches and allocator as warm as in real repeated use (call-by-call
    interleaving measured every model slower on the CPU, by different amounts).
    """
    timings = {name: Timing(name) for name in candidates}
    blocks = max(1, min(blocks, rounds))
    for block in range(blocks):
        per_block = rounds // blocks + (1 if block < rounds % blocks else 0)
        for name, fn in candidates.items():
            for _ in range(warmup if block == 0 else 1):
                fn()
            synchronize(device)
            for _ in range(per_block):
                timings[name].seconds.append(time_once(fn, device))
                if on_step:
                    on_step(name)
    return timings
