"""The "cpp" backend: the compiled kernels of fastres._C (torch.ops.fastres.*).

Convolutions run on PyTorch's (cuDNN / oneDNN) without bias; the bias, residual and ReLU
then cost one fused pass (`batch_norm_apply` in its eval form: scale 1, shift = bias).
BatchNorm and add+ReLU run the compiled kernels, forward and backward. Autograd and fake
implementations come from fastres/ops/registry.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import registry


def covers(x: torch.Tensor) -> bool:
    """Whether fastres._C has kernels for x's device (CPU always; CUDA when built with it)."""
    if registry.COMPILED_BN is None:
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key("fastres::add_relu", "CUDA")


def _epilogue(y, bias, residual, relu):
    channels, dtype = y.shape[1], torch.float64 if y.dtype == torch.float64 else torch.float32
    identity_mean = torch.zeros(channels, device=y.device, dtype=dtype)
    identity_invstd = torch.ones(channels, device=y.device, dtype=dtype)
    return torch.ops.fastres.batch_norm_apply(y, None, bias, identity_mean, identity_invstd, residual, False, relu)


def conv2d_act(x, weight, bias, stride, padding, dilation, groups, residual, relu):
    return _epilogue(F.conv2d(x, weight, None, stride, padding, dilation, groups), bias, residual, relu)


def bottleneck_tail(h, w3, x, wd, bias, stride, relu):
    shortcut = F.conv2d(x, wd, None, stride)
    return _epilogue(F.conv2d(h, w3), bias, shortcut, relu)


def batch_norm_act(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu):
    return registry.batch_norm_act(x, weight, bias, running_mean, running_var, residual, training, momentum, eps,
                                   relu, family=registry.COMPILED_BN)


def add_relu(x, residual):
    return torch.ops.fastres.add_relu(x, residual)
