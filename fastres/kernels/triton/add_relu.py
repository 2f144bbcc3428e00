"""relu(x + residual) and its backward, elementwise over the common storage order.

Both operands are brought to x's memory format first (a no-op for the usual matching
layouts), so one flat loop covers NCHW and channels_last. The backward needs only the
output: d x = d residual = dy where y > 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...layout import memory_format_of


@triton.jit
def add_relu_kernel(x_ptr, r_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = x + r
    # where(s < 0) rather than maximum: on the GPU max() drops NaN, torch.relu keeps it.
    tl.store(y_ptr + offs, tl.where(s < 0, 0.0, s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def relu_backward_kernel(dy_ptr, y_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    tl.store(dx_ptr + offs, tl.where(y > 0, dy, 0.0).to(dx_ptr.dtype.element_ty), mask=mask)


def _block(t: torch.Tensor) -> int:
    return 4096 if t.device.type == "cpu" else 1024


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    fmt = memory_format_of(x)
    x, residual = x.contiguous(memory_format=fmt), residual.contiguous(memory_format=fmt)
    y = torch.empty_like(x, memory_format=fmt)
    n = x.numel()
    if n:
        add_relu_kernel[(triton.cdiv(n, _block(x)),)](x, residual, y, n, BLOCK=_block(x))
    return y


def relu_backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dy masked by y > 0, in y's memory format."""
    fmt = memory_format_of(y)
    dy = dy.contiguous(memory_format=fmt)
    dx = torch.empty_like(y, memory_format=fmt)
    n = y.numel()
    if n:
        relu_backward_kernel[(triton.cdiv(n, _block(y)),)](dy, y, dx, n, BLOCK=_block(y))
    return dx
