"""The "cpp" backend: the compiled kernels of fastres._C (torch.ops.fastres.*).

Convolutions run on PyTorch's (cuDNN / oneDNN) without bias; the bias, residual and ReLU
then cost one fused pass (`batch_norm_act_apply` in its eval form: scale 1, shift = bias).
BatchNorm and add+ReLU run the compiled kernels, forward and backward. Autograd and fake
implementations come from fastres/ops/registry.py.
"""
from __future__ import annotations

import os

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
    return torch.ops.fastres.batch_norm_act_apply(y, None, bias, identity_mean, identity_invstd, residual, False, relu)


def conv2d_act(x, weight, bias, stride, padding, dilation, groups, residual, relu):
    return _epilogue(F.conv2d(x, weight, None, stride, padding, dilation, groups), bias, residual, relu)


def bottleneck_tail(h, w3, x, wd, bias, stride, relu):
    shortcut = F.conv2d(x, wd, None, stride)
    return _epilogue(F.conv2d(h, w3), bias, shortcut, relu)


def batch_norm_act(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu,
                   stats=None):
    return registry.batch_norm_act(x, weight, bias, running_mean, running_var, residual, training, momentum, eps,
                                   relu, stats=stats, family=registry.COMPILED_BN)


def add_relu(x, residual):
    return torch.ops.fastres.add_relu(x, residual)


# ---------------------------------------------------------------- cuDNN graphs (fastres._C)

def cudnn_graphs_built() -> bool:
    """Whether fastres._C has the cuDNN graph kernels (FASTRES_WITH_CUDNN_GRAPHS) and they are not
    switched off at run time (FASTRES_CUDNN_GRAPHS=0: every cuDNN graph is then "not covered" and
    the other implementations run; the GPU check sets it when its cuDNN probe crashes)."""
    return (registry.COMPILED_BN is not None and os.environ.get("FASTRES_CUDNN_GRAPHS") != "0"
            and torch._C._dispatch_has_kernel_for_dispatch_key("fastres::cudnn_conv_bias_act", "CUDA"))


_GRAPH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cudnn_graph_covers(x, weight, bias, stride, padding, dilation, groups, residual, relu) -> bool:
    """Whether one cuDNN graph runs relu(conv(x, weight) + bias + residual) for this signature.
    cuDNN builds (and caches) the plan to answer; never under tracing (fake tensors cannot ask)."""
    if not (x.device.type == "cuda" and cudnn_graphs_built() and x.dtype in _GRAPH_DTYPES
            and weight.dtype == x.dtype and groups == 1):
        return False
    if torch.compiler.is_compiling() or isinstance(x, torch._subclasses.FakeTensor):
        return False
    return bool(torch.ops.fastres.cudnn_conv_bias_act_supported(
        x, weight, bias, residual, list(stride), list(padding), list(dilation), groups, relu))


def cudnn_conv2d_act(x, weight, bias, stride, padding, dilation, groups, residual, relu):
    return torch.ops.fastres.cudnn_conv_bias_act(x, weight, bias, residual, list(stride), list(padding),
                                                 list(dilation), groups, relu)


def cudnn_tail_covers(h, w3, x, wd, bias, stride, relu) -> bool:
    """The bottleneck tail as two graphs: the projection conv alone, then conv3 + bias with the
    projection as its residual (+ ReLU)."""
    n, _, p, q = h.shape
    shortcut = torch.empty((n, wd.shape[0], p, q), dtype=h.dtype, device=h.device,
                           memory_format=registry._format_of(h))
    return (cudnn_graph_covers(x, wd, None, stride, (0, 0), (1, 1), 1, None, False)
            and cudnn_graph_covers(h, w3, bias, (1, 1), (0, 0), (1, 1), 1, shortcut, relu))


def cudnn_bottleneck_tail(h, w3, x, wd, bias, stride, relu):
    shortcut = cudnn_conv2d_act(x, wd, None, stride, (0, 0), (1, 1), 1, None, False)
    return cudnn_conv2d_act(h, w3, bias, (1, 1), (0, 0), (1, 1), 1, shortcut.to(h.dtype), relu)


def cudnn_conv_bn_stats(x, weight, stride, padding, dilation, groups, prologue=None):
    """NormConv training, forward: y = conv(relu(x * scale + shift)) (prologue = (scale, shift,
    relu) or None) with y's per-channel (sum, sum of squares) from the conv's epilogue. None
    where cuDNN has no engine for it (fall back per layer)."""
    scale, shift, prologue_relu = prologue if prologue is not None else (None, None, False)
    args = (x, weight, scale, shift, prologue_relu, list(stride), list(padding), list(dilation), groups)
    if not (x.device.type == "cuda" and cudnn_graphs_built()) or not torch.ops.fastres.cudnn_conv_genstats_supported(
            *args):
        return None
    return torch.ops.fastres.cudnn_conv_genstats(*args)


def cudnn_norm_conv_wgrad(grad, x, weight, scale, shift, relu, stride, padding, dilation, groups):
    """NormConv backward, weight gradient: wgrad(grad, relu?(x * scale + shift)) with the prologue
    recomputed from the saved raw x inside cuDNN's kernel (relu(bn(x)) is never materialised).
    None where cuDNN has no engine for it."""
    args = (grad, x, list(weight.shape), scale, shift, relu, list(stride), list(padding), list(dilation), groups)
    if not (x.device.type == "cuda" and cudnn_graphs_built()) or not torch.ops.fastres.cudnn_conv_wgrad_supported(
            *args):
        return None
    return torch.ops.fastres.cudnn_conv_wgrad(*args)


def cudnn_norm_conv_dgrad_drelu(grad, x, weight, scale, shift, stride, padding, dilation, groups):
    """NormConv backward through its ReLU prologue: (gz, sum(gz * x), sum(gz)) with gz = dgrad(grad, W)
    masked where x * scale + shift <= 0, one cuDNN kernel (dgrad + dReLU + the per-channel sums).
    None where cuDNN has no engine for it."""
    args = (grad, weight, x, scale.float(), shift.float(), list(stride), list(padding), list(dilation), groups)
    if not (x.device.type == "cuda" and cudnn_graphs_built()) or \
            not torch.ops.fastres.cudnn_conv_dgrad_drelu_supported(*args):
        return None
    return torch.ops.fastres.cudnn_conv_dgrad_drelu(*args)


def batch_norm_finalize(sum, sqsum, count, weight, bias, running_mean, running_var, momentum, eps):
    """(mean, invstd, scale, shift) from genstats' sums; running buffers updated in place."""
    return torch.ops.fastres.batch_norm_finalize(sum, sqsum, count, weight, bias, running_mean, running_var,
                                                 momentum, eps)
