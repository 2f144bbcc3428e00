"""The "torch" backend: each fused op written as the plain PyTorch chain it replaces.

This is the numerical reference for every fast path, the fallback for anything a fast
path does not cover, and autograd-complete by construction. Arguments are already checked.
In-place epilogues act on a freshly made tensor only, so they never touch caller data and
autograd stays valid (convolution's backward does not need its output).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def epilogue_(y: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """y += residual; relu(y) -- in place on a tensor this module just produced."""
    if residual is not None:
        y = y.add_(residual)
    return torch.relu_(y) if relu else y


def conv2d_act(x, weight, bias, stride, padding, dilation, groups, residual, relu):
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return epilogue_(y, residual, relu)


def batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu,
                   mean=None, invstd=None):
    if mean is None:
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    else:  # x's batch statistics given (differentiable where they came from x, e.g. norm_conv's outputs)
        dtype = torch.promote_types(stats_dtype(x), mean.dtype)
        scale = invstd.to(dtype) if weight is None else invstd.to(dtype) * weight.to(dtype)
        shift = -mean.to(dtype) * scale if bias is None else bias.to(dtype) - mean.to(dtype) * scale
        # x * scale promotes to dtype without a copy of x, so autograd saves x itself (in a chain, the
        # norm_conv output it holds anyway) rather than an x-sized copy in dtype
        y = (x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)).to(x.dtype)
    return epilogue_(y, residual, relu)


def add_relu(x, residual):
    return torch.relu_(x + residual)


def bottleneck_tail(h, w3, x, wd, bias, stride, relu):
    shortcut = F.conv2d(x, wd, None, stride)
    return conv2d_act(h, w3, bias, 1, 0, 1, 1, shortcut, relu)


def fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps):
    # Fold in at least fp32 so fp16/bf16 models do not lose the scale's precision.
    dtype = torch.promote_types(conv_weight.dtype, torch.float32)
    inv_std = torch.rsqrt(running_var.to(dtype) + eps)
    scale = inv_std if bn_weight is None else bn_weight.to(dtype) * inv_std
    shift = -running_mean.to(dtype) * scale
    if conv_bias is not None:
        shift = shift + conv_bias.to(dtype) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(dtype)
    weight = conv_weight.to(dtype) * scale.reshape(-1, 1, 1, 1)
    return weight, shift


# ------------------------------------------------------------------ NormConv (training)

def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-channel statistics are fp32, fp64 for fp64 activations."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def prologue(x, scale, shift, relu):
    """relu?(x * scale[c] + shift[c]), computed in the statistics' precision, stored in x's dtype."""
    dtype = torch.promote_types(stats_dtype(x), scale.dtype)
    # one x-sized temporary in dtype: x * scale promotes without a copy of x, the rest is in place on it
    # (autograd-valid: the product's backward needs x and scale, not the product)
    z = (x * scale.to(dtype).reshape(1, -1, 1, 1)).add_(shift.to(dtype).reshape(1, -1, 1, 1))
    return (z.relu_() if relu else z).to(x.dtype)


def norm_conv_stats(x, weight, scale, shift, relu, stride, padding, dilation, groups):
    """(y, mean, var): y = conv2d(relu?(x * scale + shift)) (x itself when scale is None) and y's
    per-channel batch mean and biased variance. All three are differentiable."""
    a = x if scale is None else prologue(x, scale, shift, relu)
    y = F.conv2d(a, weight, None, stride, padding, dilation, groups)
    var, mean = torch.var_mean(y.to(stats_dtype(y)), dim=(0, 2, 3), correction=0)
    return y, mean, var


def update_running_(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """The running buffers as nn.BatchNorm2d updates them (unbiased variance), on the device."""
    if running_mean is None:
        return
    with torch.no_grad():
        running_mean.mul_(1.0 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
        unbiased = var.detach() * (count / max(count - 1, 1))
        running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def finish_norm_conv(y, mean, var, running_mean, running_var, momentum, eps):
    """(y, mean, invstd) of an implementation's (y, mean, var); the running buffers updated."""
    update_running_(running_mean, running_var, mean, var, y.numel() // y.shape[1], momentum)
    return y, mean, torch.rsqrt(var + eps)


def norm_conv(x, weight, scale, shift, relu, stride, padding, dilation, groups, running_mean, running_var,
              momentum, eps):
    y, mean, var = norm_conv_stats(x, weight, scale, shift, relu, stride, padding, dilation, groups)
    return finish_norm_conv(y, mean, var, running_mean, running_var, momentum, eps)
