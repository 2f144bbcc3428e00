"""Float64 references of the ops (and the op tests' comparison against them, at tests/helpers.py's
"op" tolerances; an implementation's outputs and gradients against the "torch" backend's in float64,
at the "grad" tolerances for gradients)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastres

from helpers import TOLERANCE as _TOLERANCE

TOLERANCE = _TOLERANCE["op"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = None, what: str = "") -> None:
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-6)
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max error {error:.3g} > {TOLERANCE[dtype]:.1g} x {scale:.3g}"


def conv2d_act(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, residual=None, relu=True):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, dilation,
                 groups)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def bottleneck_tail(h, w3, x, wd, bias, stride, relu):
    shortcut = F.conv2d(x.double()[:, :, ::stride, ::stride], wd.double())
    return conv2d_act(h, w3, bias, residual=shortcut, relu=relu)


def random_bn_state(channels: int, generator: torch.Generator, dtype=torch.float32):
    """(weight, bias, running_mean, running_var), never the defaults."""
    def uniform(low, high):
        return (torch.rand(channels, generator=generator, dtype=torch.float64) * (high - low) + low).to(dtype)
    weight, var = uniform(0.5, 1.5), uniform(0.5, 2.0)
    bias = (torch.randn(channels, generator=generator, dtype=torch.float64) * 0.1).to(dtype)
    mean = (torch.randn(channels, generator=generator, dtype=torch.float64) * 0.1).to(dtype)
    return weight, bias, mean, var


def grads(fn, inputs):
    """fn(*inputs) on fresh leaf copies, and the gradients of a fixed random weighting of its output."""
    inputs = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(out)
    (out.double() * weight.double()).sum().backward()
    return out, [t.grad if t is not None else None for t in inputs]


def compare_with_torch_backend(fn, inputs, dtype):
    """fn on the "triton" backend against fn on the "torch" backend in float64: output and gradients."""
    with fastres.use_backend("triton"):
        out, grads_ = grads(fn, inputs)
    with fastres.use_backend("torch"):
        ref_out, ref_grads = grads(fn, [t.double() if t is not None else None for t in inputs])
    assert_close(out, ref_out, dtype, "output")
    for index, (g, ref) in enumerate(zip(grads_, ref_grads)):
        if ref is not None:
            error = (g.double() - ref).abs().max().item()
            scale = ref.abs().max().item() + 1e-12
            assert error <= _TOLERANCE["grad"][dtype] * scale, \
                f"grad of input {index}: {error:.3g} vs scale {scale:.3g}"
