"""Parameter and multiply-add counts, the paper's convention (He et al. 2015, Table 1: ResNet-50
at 224x224 is 3.8 x 10^9 with the stride on the first 1x1 conv, torchvision's v1.5 4.09 x 10^9).

`count_macs` reuses the hook-based counter in fastres.models.flops (which the benchmarks use too) on a copy
of the model on the meta device, so counting ResNet-152 at 224x224 does no arithmetic at all.
"""
from __future__ import annotations

import copy
import itertools
from typing import Sequence

import torch
from torch import nn

from .flops import count_macs as _count_macs_of_forward

__all__ = ["count_params", "count_macs"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor once; buffers such as BN statistics not counted)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters())


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are meta tensors (no data copied)."""
    memo = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) in memo:
            continue
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> int:
    """Multiply-adds of the convolutions and fully connected layers in one forward of `model`
    on an input of `input_size` (whole batch). BN, ReLU, additions and pooling are not counted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(input_size, (tuple, list, torch.Size)) or len(input_size) == 0 \
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_size):
        raise ValueError(f"input_size must be a sequence of positive ints such as (1, 3, 224, 224); "
                         f"got {input_size!r}")
    clone = _meta_copy(model)
    # A hook on a module makes the fused blocks run their submodules one by one (on meta tensors,
    # shapes only): the counter's conv/linear hooks see every convolution.
    handles = [m.register_forward_hook(lambda *args: None) for m in clone.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        return _count_macs_of_forward(clone, torch.empty(tuple(input_size), device="meta"))
    finally:
        for handle in handles:
            handle.remove()
