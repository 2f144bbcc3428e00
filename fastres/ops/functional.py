"""The public fused ops: check the arguments once, then run the chosen backend.

Each op names its exact semantics (DESIGN.md section 2). "torch" always runs the
reference; "auto" takes the fastest path that covers the call and falls back to the
reference for anything the fast paths do not cover.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import checks, compiled, onednn, reference, registry
from .backend import get_backend

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fast_cpu(x, weight, residual) -> bool:
    return get_backend() == "auto" and onednn.applies(x, weight, residual)


def _triton(x: torch.Tensor) -> bool:
    """Backend "triton" was chosen and its kernels cover x's device and dtype (else: the reference)."""
    if get_backend() != "triton" or x.dtype not in TRITON_DTYPES and not _autocast_dtype(x):
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and registry.TRITON_AVAILABLE)


def _compiled(x: torch.Tensor) -> bool:
    """Backend "cpp" was chosen and fastres._C has kernels for x's device."""
    return get_backend() == "cpp" and compiled.covers(x)


def _autocast_dtype(x: torch.Tensor):
    """The dtype autocast would run a convolution in, or None (custom ops are not autocast by torch).
    Like torch's autocast, float64 is never cast."""
    if x.dtype == torch.float64:
        return None
    try:
        enabled = torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4
        enabled = torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(x.device.type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_gpu_dtype() if x.is_cuda else torch.get_autocast_cpu_dtype()


def _cast(dtype, *tensors):
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def fold_bn(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps=1e-5):
    """Fold eval-mode BatchNorm into the preceding conv: returns (weight, bias) in fp32 (fp64 stays fp64).

    conv(x, weight, bias) == batch_norm(conv(x, conv_weight, conv_bias)) with running statistics.
    Differentiable with respect to every input.
    """
    checks.tensor(conv_weight, "conv_weight")
    if conv_weight.dim() < 2:
        raise ValueError(f"conv_weight must be at least 2-D (out_channels, in_channels, ...); got {tuple(conv_weight.shape)}")
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
    checks.tensor(x, "x", ndim=4)
    checks.tensor(weight, "weight", ndim=4)
    checks.same_place(weight, "weight", x, "x")
    stride = checks.pair(stride, "stride", minimum=1)
    padding = checks.pair(padding, "padding", minimum=0)
    dilation = checks.pair(dilation, "dilation", minimum=1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int; got {groups!r}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {weight.shape[1]} x groups={groups} = "
                         f"{weight.shape[1] * groups}")
    if weight.shape[0] % groups:
        raise ValueError(f"weight's {weight.shape[0]} output channels are not divisible by groups={groups}")
    checks.per_channel(bias, "bias", weight.shape[0], x, "x")
    checks.flag(relu, "relu")
    checks.residual(residual, checks.conv_output_shape(x, weight, stride, padding, dilation), x)
    if _triton(x):
        x, weight, bias, residual = _cast(_autocast_dtype(x) or x.dtype, x, weight, bias, residual)
        return registry.triton_conv2d_act(x, weight, bias, list(stride), list(padding), list(dilation), groups,
                                          residual, relu)
    if _compiled(x):
        x, weight, bias, residual = _cast(_autocast_dtype(x) or x.dtype, x, weight, bias, residual)
        return compiled.conv2d_act(x, weight, bias, stride, padding, dilation, groups, residual, relu)
    impl = onednn if _fast_cpu(x, weight, residual) else reference
    return impl.conv2d_act(x, weight, bias, stride, padding, dilation, groups, residual, relu)


def batch_norm_act(x, weight, bias, running_mean, running_var, *, training: bool, momentum: float = 0.1,
                   eps: float = 1e-5, residual: Optional[torch.Tensor] = None, relu: bool = True):
    """relu(batch_norm(x) + residual). In training, batch statistics are used and the running
    buffers (when given) are updated in place exactly as torch.nn.BatchNorm2d does with this momentum.
    """
    checks.tensor(x, "x", ndim=4)
    checks.flag(training, "training")
    checks.flag(relu, "relu")
    channels = x.shape[1]
    checks.per_channel(weight, "weight", channels, x, "x")
    checks.per_channel(bias, "bias", channels, x, "x")
    checks.per_channel(running_mean, "running_mean", channels, x, "x")
    checks.per_channel(running_var, "running_var", channels, x, "x")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if momentum is None or isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1] (the module turns momentum=None into 1/num_batches); "
                         f"got {momentum!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps must be a non-negative number; got {eps!r}")
    if training and x.numel() > 0 and x.numel() // channels <= 1:
        raise ValueError(f"x of shape {tuple(x.shape)} has one value per channel; training BatchNorm needs more than one")
    checks.residual(residual, x.shape, x)
    if _triton(x) and x.numel() > 0:
        (residual,) = _cast(x.dtype, residual)
        return registry.batch_norm_act(x, weight, bias, running_mean, running_var, residual, training,
                                       float(momentum), float(eps), relu)
    if _compiled(x) and x.numel() > 0:
        (residual,) = _cast(x.dtype, residual)
        return compiled.batch_norm_act(x, weight, bias, running_mean, running_var, residual, training,
                                       float(momentum), float(eps), relu)
    return reference.batch_norm_act(x, weight, bias, running_mean, running_var, training, float(momentum),
                                    float(eps), residual, relu)


def add_relu(x, residual):
    """relu(x + residual)."""
    checks.tensor(x, "x")
    if residual is None:
        raise TypeError("residual must be a torch.Tensor; got None")
    checks.residual(residual, x.shape, x)
    if _triton(x):
        return registry.triton_add_relu(x, residual)
    if _compiled(x) and x.numel() > 0:
        return compiled.add_relu(x, residual)
    return reference.add_relu(x, residual)


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
    if _triton(h):
        h, w3, x, wd, bias = _cast(_autocast_dtype(h) or h.dtype, h, w3, x, wd, bias)
        return registry.triton_bottleneck_tail(h, w3, x, wd, bias, list(stride), relu)
    if _compiled(h):
        h, w3, x, wd, bias = _cast(_autocast_dtype(h) or h.dtype, h, w3, x, wd, bias)
        return compiled.bottleneck_tail(h, w3, x, wd, bias, stride, relu)
    impl = onednn if _fast_cpu(h, w3, None) and onednn.applies(x, wd, None) else reference
    return impl.bottleneck_tail(h, w3, x, wd, bias, stride, relu)
