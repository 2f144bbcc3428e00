"""The seed-style report: burn-in steps, then timed steps, printed as
"Forward across 100 steps, X +/- Y sec / batch" (mean +/- standard deviation) and the same
for "Forward-backward". Forward is inference (eval, inference_mode); forward-backward is a
training-mode forward plus backward (no optimizer step), as in the classic convnet benchmarks."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, List, Tuple

import torch
from torch import nn

from .timing import Timing, synchronize, time_once

FULL = (10, 100)   # burn-in, timed steps
QUICK = (2, 10)    # CPU quick mode: a full report of resnet50 would take minutes per line


def format_line(what: str, timing: Timing) -> str:
    return f"{what} across {len(timing.seconds)} steps, {timing.mean:.6f} +/- {timing.spread:.6f} sec / batch"


def _steps(fn: Callable[[], object], device: torch.device, burn_in: int, steps: int, name: str) -> Timing:
    for _ in range(burn_in):
        fn()
    synchronize(device)
    return Timing(name, [time_once(fn, device) for _ in range(steps)])


def seed_report(model: nn.Module, x: torch.Tensor, *, burn_in: int = FULL[0], steps: int = FULL[1],
                context: Callable[[], ContextManager] = contextlib.nullcontext) -> Tuple[List[str], dict]:
    """Time `model` on `x` forward (eval) and forward-backward (train); `context` wraps every
    step (autocast, backend). Returns the two report lines and their figures. Leaves the model
    in train mode with gradients set."""
    def forward():
        with torch.inference_mode(), context():
            return model(x)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        with context():
            out = model(x)
        out.float().square().mean().backward()

    model.eval()
    fwd = _steps(forward, x.device, burn_in, steps, "forward")
    model.train()
    fwd_bwd = _steps(forward_backward, x.device, burn_in, steps, "forward-backward")
    lines = [format_line("Forward", fwd), format_line("Forward-backward", fwd_bwd)]
    figures = {"burn_in": burn_in, "steps": steps,
               "forward_s_mean": fwd.mean, "forward_s_std": fwd.spread,
               "forward_backward_s_mean": fwd_bwd.mean, "forward_backward_s_std": fwd_bwd.spread}
    return lines, figures
