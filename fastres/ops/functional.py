"""The public fused ops: check the arguments once, then run the chosen backend.

Each op names its exact semantics (docs/design.md, "The ops"). Which implementation runs is
decided in one place, `dispatch.py` (the table of implementations is `implementations.py`).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import checks, implementations, reference  # noqa: F401  (implementations fills the dispatch table)
from .dispatch import dispatch

def fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=1e-5):
    """Fold eval-mode BatchNorm into the preceding conv: returns (weight, bias) in fp32 (fp64 stays fp64).

    conv(x, weight, bias) == batch_norm(conv(x, conv_weight, conv_bias)) with running statistics.
    Differentiable with respect to every input.
    """
    checks.tensor(conv_weight, "conv_weight")
    if conv_weight.dim() < 2:
        raise ValueError("conv_weight must be at least 2-D (out_channels, in_channels, ...); "
                         f"got {tuple(conv_weight.shape)}")
    channels = conv_weight.shape[0]
    checks.per_channel(conv_bias, "conv_bias", channels, conv_weight, "conv_weight")
    checks.per_channel(bn_weight, "bn_weight", channels, conv_weight, "conv_weight")
    checks.per_channel(bn_bias, "bn_bias", channels, conv_weight, "conv_weight")
    if running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required to fold BatchNorm (eval mode uses them)")
    checks.per_channel(running_mean, "running_mean", channels, conv_weight, "conv_weight")
    checks.per_channel(running_var, "running_var", channels, conv_weight, "conv_weight")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps must be a non-negative number; got {eps!r}")
    weight, bias = reference.fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, float(eps))
    return weight.reshape(conv_weight.shape), bias


def conv2d_act(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
               residual: Optional[torch.Tensor] = None, relu: bool = True):
    """relu(conv2d(x, weight, bias) + residual); residual and ReLU optional. Same memory format out as in."""
    stride, padding, dilation = checks.conv_args(x, weight, stride, padding, dilation, groups)
    checks.per_channel(bias, "bias", weight.shape[0], x, "x")
    checks.flag(relu, "relu")
    checks.residual(residual, checks.conv_output_shape(x, weight, stride, padding, dilation), x)
    return dispatch("conv2d_act", dict(x=x, weight=weight, bias=bias, stride=stride, padding=padding,
                                       dilation=dilation, groups=groups, residual=residual, relu=relu))


def batch_norm_act(x, weight, bias, running_mean, running_var, *, training: bool, momentum: float = 0.1,
                   eps: float = 1e-5, residual: Optional[torch.Tensor] = None, relu: bool = True,
                   mean: Optional[torch.Tensor] = None, invstd: Optional[torch.Tensor] = None):
    """relu(batch_norm(x) + residual). In training, batch statistics are used and the running
    buffers (when given) are updated in place exactly as torch.nn.BatchNorm2d does with this momentum.

    mean, invstd (training only, both or neither): x's batch statistics, already computed -- e.g. by
    the norm_conv that produced x, in its epilogue --, so the statistics pass is skipped; the running
    buffers must then be None (whoever computed the statistics updated them). The gradient is BN's full
    training gradient either way.
    """
    checks.tensor(x, "x", ndim=4)
    checks.flag(training, "training")
    checks.flag(relu, "relu")
    channels = x.shape[1]
    checks.per_channel(weight, "weight", channels, x, "x")
    checks.per_channel(bias, "bias", channels, x, "x")
    checks.per_channel(running_mean, "running_mean", channels, x, "x")
    checks.per_channel(running_var, "running_var", channels, x, "x")
    checks.batch_norm_args(running_mean, running_var, momentum, eps)
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if training and x.numel() > 0 and x.numel() // channels <= 1:
        raise ValueError(f"x of shape {tuple(x.shape)} has one value per channel; "
                         "training BatchNorm needs more than one")
    checks.residual(residual, x.shape, x)
    if (mean is None) != (invstd is None):
        raise ValueError("mean and invstd must be given together or both be None")
    if mean is not None:
        if not training:
            raise ValueError("mean and invstd are batch statistics: they need training=True")
        if running_mean is not None or running_var is not None:
            raise ValueError("with mean and invstd given, running_mean and running_var must be None (whoever "
                             "computed the batch statistics updates them)")
        checks.per_channel(mean, "mean", channels, x, "x")
        checks.per_channel(invstd, "invstd", channels, x, "x")
    return dispatch("batch_norm_act", dict(x=x, weight=weight, bias=bias, running_mean=running_mean,
                                           running_var=running_var, training=training, momentum=float(momentum),
                                           eps=float(eps), residual=residual, relu=relu, mean=mean, invstd=invstd))


def add_relu(x, residual):
    """relu(x + residual)."""
    checks.tensor(x, "x")
    if residual is None:
        raise TypeError("residual must be a torch.Tensor; got None")
    checks.residual(residual, x.shape, x)
    return dispatch("add_relu", dict(x=x, residual=residual))


def bottleneck_tail(h, w3, x, wd, bias=None, *, stride=1, relu: bool = True):
    """relu(conv1x1(h, w3) + conv1x1(x[:, :, ::s, ::s], wd) + bias): a Bottleneck's conv3 and its
    projection shortcut (both with BN folded) as one op."""
    checks.tensor(h, "h", ndim=4)
    checks.tensor(x, "x", ndim=4)
    checks.tensor(w3, "w3", ndim=4)
    checks.tensor(wd, "wd", ndim=4)
    checks.same_place(x, "x", h, "h")
    checks.same_place(w3, "w3", h, "h")
    checks.same_place(wd, "wd", h, "h")
    stride = checks.pair(stride, "stride", minimum=1)
    if tuple(w3.shape[2:]) != (1, 1) or tuple(wd.shape[2:]) != (1, 1):
        raise ValueError(f"w3 and wd must be 1x1 conv weights; got {tuple(w3.shape)} and {tuple(wd.shape)}")
    if w3.shape[0] != wd.shape[0]:
        raise ValueError(f"w3 and wd must have the same output channels; got {w3.shape[0]} and {wd.shape[0]}")
    if w3.shape[1] != h.shape[1]:
        raise ValueError(f"h has {h.shape[1]} channels but w3 expects {w3.shape[1]}")
    if wd.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but wd expects {wd.shape[1]}")
    strided = ((x.shape[2] - 1) // stride[0] + 1, (x.shape[3] - 1) // stride[1] + 1)
    if x.shape[0] != h.shape[0] or strided != tuple(h.shape[2:]):
        raise ValueError(f"x[:, :, ::{stride[0]}, ::{stride[1]}] has batch/spatial {(x.shape[0],) + strided} but h has "
                         f"{(h.shape[0],) + tuple(h.shape[2:])}; expected them equal")
    checks.per_channel(bias, "bias", w3.shape[0], h, "h")
    checks.flag(relu, "relu")
    return dispatch("bottleneck_tail", dict(h=h, w3=w3, x=x, wd=wd, bias=bias, stride=stride, relu=relu))


def norm_conv(x, weight, stride=1, padding=0, dilation=1, groups=1, *, scale: Optional[torch.Tensor] = None,
              shift: Optional[torch.Tensor] = None, relu: bool = False, running_mean: Optional[torch.Tensor] = None,
              running_var: Optional[torch.Tensor] = None, momentum: float = 0.1, eps: float = 1e-5):
    """NormConv (training): y = conv2d(relu?(x * scale[c] + shift[c]), weight) -- the previous BatchNorm's
    apply as this conv's prologue (scale/shift None: x itself) -- and (mean, invstd) of y per output
    channel from the batch, as the next BatchNorm uses them; its running buffers (when given) are
    updated in place as torch.nn.BatchNorm2d does with this momentum. Returns (y, mean, invstd); all
    three are differentiable (mean/invstd in fp32, fp64 for fp64 x). No bias: BatchNorm follows."""
    stride, padding, dilation = checks.conv_args(x, weight, stride, padding, dilation, groups)
    checks.flag(relu, "relu")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together or both be None")
    if scale is None and relu:
        raise ValueError("relu=True applies to the prologue: it needs scale and shift")
    checks.per_channel(scale, "scale", x.shape[1], x, "x")
    checks.per_channel(shift, "shift", x.shape[1], x, "x")
    out_channels = weight.shape[0]
    checks.per_channel(running_mean, "running_mean", out_channels, x, "x")
    checks.per_channel(running_var, "running_var", out_channels, x, "x")
    checks.batch_norm_args(running_mean, running_var, momentum, eps)
    out_shape = checks.conv_output_shape(x, weight, stride, padding, dilation)
    if out_shape[0] * out_shape[2] * out_shape[3] <= 1:
        raise ValueError(f"the conv output {tuple(out_shape)} has at most one value per channel; "
                         "batch statistics need more than one")
    return dispatch("norm_conv", dict(x=x, weight=weight, scale=scale, shift=shift, relu=relu, stride=stride,
                                      padding=padding, dilation=dilation, groups=groups, running_mean=running_mean,
                                      running_var=running_var, momentum=float(momentum), eps=float(eps)))
