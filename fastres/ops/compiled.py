"""The "cpp" backend: kernels of the compiled extension fastres._C (torch.ops.fastres.*).

Today it holds the CPU add+ReLU forward; ops it does not cover run the reference.
Its kernels have no autograd yet, so they run only when nothing needs a gradient.
"""
from __future__ import annotations

import torch


def _op(name: str):
    namespace = getattr(torch.ops, "fastres", None)
    try:
        return getattr(namespace, name) if namespace is not None else None
    except (AttributeError, RuntimeError):
        return None


def _no_grad_needed(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def add_relu_applies(x: torch.Tensor, residual: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and _op("add_relu") is not None and _no_grad_needed(x, residual)
            and not torch.compiler.is_compiling())


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastres.add_relu(x, residual)
