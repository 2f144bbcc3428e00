"""The one place where fastres's fast-path kernels become PyTorch operators.

Each Triton launcher is wrapped in `torch.library.custom_op` (namespace `fastres`) with a
fake implementation (shapes, dtypes and memory formats only, for torch.compile and
torch.export) and its autograd formula. Convolution gradients use PyTorch's own
convolution backward; BatchNorm and ReLU gradients are fused Triton kernels.

The kernels are imported lazily: `triton` is optional at import time, and on a machine
without a GPU the kernels only run under `TRITON_INTERPRET=1`.
"""
from __future__ import annotations

import importlib
import os
from typing import List, Optional

import torch
from torch import Tensor

from ..layout import conv_output_size, empty_in_format_of as _empty_like_format, memory_format_of as _format_of

LIB = "fastres"


def _probe_triton() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return False, f"triton is not installed ({error})"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 before importing fastres to run the kernels on CPU)"


# Probed once: a plain constant is free to read on every call and under torch.compile.
TRITON_AVAILABLE, _TRITON_WHY_NOT = _probe_triton()


def triton_status() -> tuple[bool, str]:
    """(available, why not) for the Triton backend in this process."""
    return TRITON_AVAILABLE, _TRITON_WHY_NOT


def _kernel(name: str):
    """The Triton kernel module `name` (conv, batch_norm, add_relu), imported on first use."""
    return importlib.import_module(f"..kernels.triton.{name}", __package__)


def _conv_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> List[int]:
    return [x.shape[0], weight.shape[0], *conv_output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding,
                                                           dilation)]


def _relu_mask(grad: Tensor, y: Tensor, relu: bool) -> Tensor:
    return triton_relu_backward(grad, y) if relu else grad


# Backward formulas are traced by torch.compile, so every kernel they launch is an operator too.
@torch.library.custom_op(f"{LIB}::triton_relu_backward", mutates_args=())
def triton_relu_backward(grad: Tensor, y: Tensor) -> Tensor:
    """grad where y > 0, else 0."""
    return _kernel("add_relu").relu_backward(grad, y)


@triton_relu_backward.register_fake
def _(grad, y):
    return _empty_like_format(y, y.shape)


def _conv_grads(g: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
                needs_x: bool, needs_w: bool):
    if not (needs_x or needs_w):
        return None, None
    dx, dw, _ = torch.ops.aten.convolution_backward(
        g, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [needs_x, needs_w, False])
    return dx, dw


# ---------------------------------------------------------------- conv2d + epilogue

@torch.library.custom_op(f"{LIB}::triton_conv2d_act", mutates_args=())
def triton_conv2d_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                      dilation: List[int], groups: int, residual: Optional[Tensor], relu: bool,
                      config: str = "") -> Tensor:
    return _kernel("conv").conv2d_act(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups,
                                    residual, relu, config=config)


@triton_conv2d_act.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, residual, relu, config=""):
    return _empty_like_format(x, _conv_shape(x, weight, stride, padding, dilation))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, residual, relu, _config = inputs
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.relu, ctx.has_bias, ctx.has_residual = relu, bias is not None, residual is not None


def _conv_backward(ctx, grad):
    x, weight, y = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    g = _relu_mask(grad, y, ctx.relu)
    needs = ctx.needs_input_grad
    dx, dw = _conv_grads(g, x, weight, stride, padding, dilation, groups, needs[0], needs[1])
    dbias = g.sum((0, 2, 3), dtype=torch.float32).to(g.dtype) if ctx.has_bias and needs[2] else None
    dres = g if ctx.has_residual and needs[7] else None
    return dx, dw, dbias, None, None, None, None, dres, None, None


triton_conv2d_act.register_autograd(_conv_backward, setup_context=_conv_setup)


# ---------------------------------------------------------------- bottleneck tail

@torch.library.custom_op(f"{LIB}::triton_bottleneck_tail", mutates_args=())
def triton_bottleneck_tail(h: Tensor, w3: Tensor, x: Tensor, wd: Tensor, bias: Optional[Tensor], stride: List[int],
                           relu: bool, config: str = "") -> Tensor:
    return _kernel("conv").conv2d_act(h, w3, bias, (1, 1), (0, 0), (1, 1), 1, None, relu,
                                    second=(x, wd, tuple(stride)), config=config)


@triton_bottleneck_tail.register_fake
def _(h, w3, x, wd, bias, stride, relu, config=""):
    return _empty_like_format(h, [h.shape[0], w3.shape[0], h.shape[2], h.shape[3]])


def _tail_setup(ctx, inputs, output):
    h, w3, x, wd, bias, stride, relu, _config = inputs
    ctx.save_for_backward(h, w3, x, wd, output if relu else None)
    ctx.stride, ctx.relu, ctx.has_bias = stride, relu, bias is not None


def _tail_backward(ctx, grad):
    h, w3, x, wd, y = ctx.saved_tensors
    g = _relu_mask(grad, y, ctx.relu)
    needs = ctx.needs_input_grad
    dh, dw3 = _conv_grads(g, h, w3, (1, 1), (0, 0), (1, 1), 1, needs[0], needs[1])
    dx, dwd = _conv_grads(g, x, wd, ctx.stride, (0, 0), (1, 1), 1, needs[2], needs[3])
    dbias = g.sum((0, 2, 3), dtype=torch.float32).to(g.dtype) if ctx.has_bias and needs[4] else None
    return dh, dw3, dx, dwd, dbias, None, None, None


triton_bottleneck_tail.register_autograd(_tail_backward, setup_context=_tail_setup)


# ---------------------------------------------------------------- NormConv (training)
#
# (y, mean, var) = conv2d(relu?(x * scale + shift)) and y's per-channel batch mean and biased
# variance: the previous BatchNorm's apply is this conv's prologue, the next BatchNorm's statistics
# its epilogue. Functional (the running buffers are updated by the caller, reference.finish_norm_conv:
# an operator that mutates cannot carry an autograd formula) and differentiable in all three
# outputs, so scale/shift made from the previous op's (mean, var) by plain torch ops chain the
# exact BatchNorm training gradient. The backward saves the RAW input x (never relu(bn(x))) and y
# (the next layer's input, saved there anyway) and recomputes the prologue.

def _prologue_args(scale: Optional[Tensor], shift: Optional[Tensor], relu: bool) -> Optional[tuple]:
    """The Triton kernels' `prologue` argument: fp32 contiguous scale/shift and the ReLU flag, or None."""
    return None if scale is None else (scale.float().contiguous(), shift.float().contiguous(), relu)


def _split_config(config: str) -> tuple:
    """A NormConv config, "forward" or "forward|backward" (conv.Config strings, "" = the heuristic's):
    the forward kernel's tiles and the wgrad / dgrad kernels' tiles."""
    forward, _, backward = config.partition("|")
    return forward, backward


@torch.library.custom_op(f"{LIB}::triton_norm_conv", mutates_args=())
def triton_norm_conv(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], relu: bool,
                     stride: List[int], padding: List[int], dilation: List[int], groups: int,
                     config: str = "") -> tuple[Tensor, Tensor, Tensor]:
    prologue = _prologue_args(scale, shift, relu)
    return _kernel("conv").conv2d_act(x, weight, None, tuple(stride), tuple(padding), tuple(dilation), groups, None,
                                    False, config=_split_config(config)[0], prologue=prologue, stats=True)


@triton_norm_conv.register_fake
def _(x, weight, scale, shift, relu, stride, padding, dilation, groups, config=""):
    return _fake_norm_conv(x, weight, stride, padding, dilation)


def _fake_norm_conv(x, weight, stride, padding, dilation):
    y = _empty_like_format(x, _conv_shape(x, weight, stride, padding, dilation))
    stats = x.new_empty((weight.shape[0],), dtype=_stats_dtype(x))
    return y, stats, torch.empty_like(stats)


def _norm_conv_setup(ctx, inputs, output):
    x, weight, scale, shift, relu, stride, padding, dilation, groups = inputs[:9]
    y, mean, _ = output
    ctx.save_for_backward(x, weight, scale, shift, y, mean)
    ctx.conv, ctx.relu = (stride, padding, dilation, groups), relu
    ctx.set_materialize_grads(False)  # unused statistics cost nothing in the backward


def _output_grad_coefficients(gmean: Optional[Tensor], gvar: Optional[Tensor], y: Tensor,
                              mean: Tensor) -> tuple:
    """(a, b), per channel in the statistics' dtype, with d loss / d y = gy + a * y + b (a None without gvar)."""
    dtype = mean.dtype
    count = y.numel() // y.shape[1]
    a = (gvar * (2.0 / count)).to(dtype) if gvar is not None else None
    b = (gmean / count).to(dtype) if gmean is not None else torch.zeros_like(mean)
    return a, (b - a * mean if a is not None else b)


def norm_conv_output_grad(gy: Optional[Tensor], gmean: Optional[Tensor], gvar: Optional[Tensor], y: Tensor,
                          mean: Tensor, fused: bool = False) -> Tensor:
    """d loss / d y given the gradients of y, mean(y) and var(y) (biased, per channel):
    gy + gmean / count + gvar * 2 / count * (y - mean), computed as gy + a * y + b with per-channel a
    and b, rounded once into y's dtype. fused (the Triton family): one kernel pass reading gy and y and
    writing the result (triton_norm_conv_output_grad); else torch ops into ONE float32 buffer
    (addcmul reads y in its own dtype), three passes: a y-sized float32 temporary instead of the four
    of the plain formula (at ResNet-50's layer1, batch 256, each is 822 MB)."""
    if gmean is None and gvar is None:
        return gy if gy is not None else torch.zeros_like(y)
    a, b = _output_grad_coefficients(gmean, gvar, y, mean)
    if fused and a is not None:
        return triton_norm_conv_output_grad(gy, y, a, b)
    if a is None:  # gy + b: y is not read
        b = b.reshape(1, -1, 1, 1)
        return torch.zeros_like(y).add_(b) if gy is None else torch.add(gy, b, out=torch.empty_like(y))
    g = torch.addcmul(b.reshape(1, -1, 1, 1), y, a.reshape(1, -1, 1, 1))  # float32, y's memory format
    if gy is not None:
        g.add_(gy)
    return g.to(y.dtype)


@torch.library.custom_op(f"{LIB}::triton_norm_conv_output_grad", mutates_args=())
def triton_norm_conv_output_grad(gy: Optional[Tensor], y: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """gy + a[c] * y + b[c] in y's dtype and memory format, fp32 arithmetic, one pass: the BatchNorm
    apply kernel with y as its input, (a, b) as its scale and shift and gy as its residual."""
    y, gy = _collapsible(y, y, gy)
    return _kernel("batch_norm").batch_norm_act_apply(y, a.float().contiguous(), b.float().contiguous(), gy, False)


@triton_norm_conv_output_grad.register_fake
def _(gy, y, a, b):
    return _empty_like_format(y, y.shape)


def _norm_conv_backward(ctx, gy, gmean, gvar):
    """One formula for both NormConv ops; the fused kernels of the op's family where they cover the call
    (Triton's wgrad/dgrad kernels, cuDNN's backward graphs), torch's conv backward part by part elsewhere."""
    from . import reference
    x, weight, scale, shift, y, mean = ctx.saved_tensors
    conv = ctx.conv
    needs = ctx.needs_input_grad
    family = getattr(ctx, "family", "torch")
    g = norm_conv_output_grad(gy, gmean, gvar, y, mean, fused=family == "triton")
    has_prologue = scale is not None
    need_da = needs[0] or (has_prologue and (needs[2] or needs[3]))
    dw = fused = None  # fused: (dx, d scale, d shift) from one kernel through the prologue
    if family == "triton":
        tiles = getattr(ctx, "backward_config", "")
        if needs[1]:
            dw = triton_norm_conv_wgrad(g, x, weight, scale, shift, ctx.relu, *conv, tiles)
        if need_da and _kernel("conv_backward").covers(x, weight, *conv) is None:
            fused = triton_norm_conv_dgrad(g, x, weight, scale, shift, ctx.relu, *conv, tiles)
    elif family == "cudnn":  # cuDNN's fused backward graphs, per part where it has one
        from . import compiled
        if needs[1]:
            dw = compiled.cudnn_norm_conv_wgrad(g, x, weight, scale, shift, ctx.relu, *conv)
        if has_prologue and ctx.relu and need_da:
            gz_sums = compiled.cudnn_norm_conv_dgrad_drelu(g, x, weight, scale, shift, *conv)
            if gz_sums is not None:
                gz, dscale, dshift = gz_sums
                fused = ((gz.float() * scale.float().reshape(1, -1, 1, 1)).to(x.dtype), dscale, dshift)
    needs_dw = needs[1] and dw is None
    if (fused is None and need_da) or needs_dw:
        a = reference.prologue(x, scale, shift, ctx.relu) if has_prologue else x
        da, dw_plain = _conv_grads(g, a, weight, *conv, need_da and fused is None, needs_dw)
        dw = dw if dw is not None else dw_plain
        if fused is None and need_da:
            fused = _prologue_backward(da, a, x, scale, ctx.relu) if has_prologue else (da, None, None)
    if fused is None:
        return None, dw, None, None, None, None, None, None, None, None
    dx, dscale, dshift = fused
    if not has_prologue:
        return dx if needs[0] else None, dw, None, None, None, None, None, None, None, None
    return (dx if needs[0] else None, dw, dscale.to(scale.dtype) if needs[2] else None,
            dshift.to(shift.dtype) if needs[3] else None, None, None, None, None, None, None)


def _prologue_backward(da: Tensor, a: Tensor, x: Tensor, scale: Tensor, relu: bool) -> tuple:
    """(dx, d scale, d shift) from the gradient of a = relu?(x * scale + shift): torch's formula."""
    from . import reference
    dtype = torch.promote_types(reference.stats_dtype(x), scale.dtype)
    # x-sized temporaries: gz in the statistics' precision, then one product for d scale; gz becomes dx
    # in place (da is this formula's own temporary)
    gz = da.to(dtype)
    if relu:
        gz.masked_fill_(torch.logical_not(a > 0), 0.0)  # NaN in a: no gradient, as torch's ReLU backward
    dscale = (gz * x).sum((0, 2, 3), dtype=dtype)
    dshift = gz.sum((0, 2, 3))
    return gz.mul_(scale.to(dtype).reshape(1, -1, 1, 1)).to(x.dtype), dscale, dshift


# The reference's (y, mean, var) under the same autograd formula: a chain whose tuner picks the
# reference for some convs holds what a fused chain holds (the raw x, y, mean), not autograd's record of
# the torch ops (the prologue's output and a float32 copy of y for var_mean: a ResNet-50 training step
# chained on it was counted at +100% against torchvision, and at 466a8cb the H200 measured +43% with
# auto choosing between it and Triton per conv).
@torch.library.custom_op(f"{LIB}::reference_norm_conv", mutates_args=())
def reference_norm_conv(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], relu: bool,
                        stride: List[int], padding: List[int], dilation: List[int],
                        groups: int) -> tuple[Tensor, Tensor, Tensor]:
    from . import reference
    return reference.norm_conv_stats(x, weight, scale, shift, relu, stride, padding, dilation, groups)


@reference_norm_conv.register_fake
def _(x, weight, scale, shift, relu, stride, padding, dilation, groups):
    return _fake_norm_conv(x, weight, stride, padding, dilation)


def _reference_norm_conv_backward(ctx, gy, gmean, gvar):
    return _norm_conv_backward(ctx, gy, gmean, gvar)[:9]  # no `config` argument


reference_norm_conv.register_autograd(_reference_norm_conv_backward, setup_context=_norm_conv_setup)


def _triton_norm_conv_setup(ctx, inputs, output):
    _norm_conv_setup(ctx, inputs, output)
    ctx.family = "triton"  # the backward runs Triton's wgrad and dgrad kernels (prologue recomputed)
    ctx.backward_config = _split_config(inputs[9] if len(inputs) > 9 else "")[1]  # their tiles


# The backward's kernels are operators too (torch.compile traces the backward formula).
@torch.library.custom_op(f"{LIB}::triton_norm_conv_wgrad", mutates_args=())
def triton_norm_conv_wgrad(grad: Tensor, x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                           relu: bool, stride: List[int], padding: List[int], dilation: List[int],
                           groups: int, config: str = "") -> Tensor:
    """d weight of conv2d(relu?(x * scale + shift)), the prologue recomputed from the raw x as it is loaded;
    config: the tiles ("" = the heuristic's)."""
    prologue = _prologue_args(scale, shift, relu)
    return _kernel("conv_backward").conv2d_wgrad(grad, x, weight, tuple(stride), tuple(padding), tuple(dilation),
                                               groups, prologue, config=config)


@triton_norm_conv_wgrad.register_fake
def _(grad, x, weight, scale, shift, relu, stride, padding, dilation, groups, config=""):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{LIB}::triton_norm_conv_dgrad", mutates_args=())
def triton_norm_conv_dgrad(grad: Tensor, x: Tensor, weight: Tensor, scale: Optional[Tensor],
                           shift: Optional[Tensor], relu: bool, stride: List[int], padding: List[int],
                           dilation: List[int], groups: int, config: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """(dx, d scale, d shift) through the prologue in the dgrad's epilogue (dReLU, gz * scale, the sums of
    gz * x and gz); without a prologue (dx, empty, empty). config: the tiles ("" = the heuristic's)."""
    prologue = _prologue_args(scale, shift, relu)
    out = _kernel("conv_backward").conv2d_dgrad(grad, x, weight, tuple(stride), tuple(padding), tuple(dilation),
                                              groups, prologue, config=config)
    if prologue is None:
        return out, x.new_empty((0,), dtype=torch.float32), x.new_empty((0,), dtype=torch.float32)
    return out


@triton_norm_conv_dgrad.register_fake
def _(grad, x, weight, scale, shift, relu, stride, padding, dilation, groups, config=""):
    sums = x.shape[1] if scale is not None else 0
    return (_empty_like_format(x, x.shape), x.new_empty((sums,), dtype=torch.float32),
            x.new_empty((sums,), dtype=torch.float32))


triton_norm_conv.register_autograd(_norm_conv_backward, setup_context=_triton_norm_conv_setup)


def _cudnn_norm_conv_impl(x, weight, scale, shift, relu, stride, padding, dilation, groups):
    y, total, squares = torch.ops.fastres.cudnn_conv_genstats(x, weight, scale, shift, relu, list(stride),
                                                              list(padding), list(dilation), groups)
    count = y.numel() // y.shape[1]
    mean = total.double() / count  # the sums are fp32; their difference is taken in fp64
    var = (squares.double() / count - mean * mean).clamp_min(0.0)
    return y, mean.float(), var.float()


def _cudnn_norm_conv_setup(ctx, inputs, output):
    _norm_conv_setup(ctx, inputs, output)
    ctx.family = "cudnn"  # the backward tries cuDNN's wgrad and dgrad + dReLU + dBN-weight graphs


def _register_cudnn_norm_conv():
    """The cuDNN-graph twin of triton_norm_conv (fastres._C's cudnn_conv_genstats): the same autograd
    formula, its weight gradient and its gradient through the prologue's ReLU as cuDNN graphs where
    cuDNN has them (cudnn_conv_wgrad, cudnn_conv_dgrad_drelu), the torch formula part by part elsewhere."""
    op = torch.library.custom_op(f"{LIB}::cudnn_norm_conv", mutates_args=())(_cudnn_norm_conv_op)
    op.register_fake(lambda x, weight, scale, shift, relu, stride, padding, dilation, groups:
                     _fake_norm_conv(x, weight, stride, padding, dilation))
    op.register_autograd(_norm_conv_backward, setup_context=_cudnn_norm_conv_setup)
    return op


def _cudnn_norm_conv_op(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], relu: bool,
                        stride: List[int], padding: List[int], dilation: List[int],
                        groups: int) -> tuple[Tensor, Tensor, Tensor]:
    return _cudnn_norm_conv_impl(x, weight, scale, shift, relu, stride, padding, dilation, groups)


CUDNN_NORM_CONV = None  # registered with fastres._C's operators (register_compiled_ops)


# ---------------------------------------------------------------- batch norm + residual + ReLU
#
# Both fast backends provide the same five operators with the same schemas: the Triton ones
# below (fastres::triton_*) and the compiled ones of fastres._C (fastres::batch_norm_act_stats, ...,
# defined in csrc/registration.cpp). Their fake implementations and autograd formulas are
# registered here once for both.
#
# Statistics and apply are two operators, because an operator that mutates (the running
# statistics) cannot carry an autograd formula: the statistics op updates the buffers and has
# no gradient of its own; the apply op takes (mean, invstd) as inputs and its backward is
# BatchNorm's full gradient (in training it accounts for the statistics' dependence on x).

def _collapsible(like: Tensor, *tensors: Optional[Tensor]) -> list:
    """The tensors as the per-channel Triton kernels address them (N, C, H*W with one H*W stride): as they
    are where they already can be, else copied into `like`'s memory format; None stays None."""
    bn = _kernel("batch_norm")
    return [t if t is None or bn.collapsible(t) else t.contiguous(memory_format=_format_of(like)) for t in tensors]


def _scale_shift(weight, bias, mean, invstd):
    scale = invstd * weight.float() if weight is not None else invstd
    shift = -mean * scale
    return scale, shift + bias.float() if bias is not None else shift


@torch.library.custom_op(f"{LIB}::triton_batch_norm_act_stats", mutates_args=("running_mean", "running_var"))
def triton_batch_norm_act_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                            momentum: float, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, invstd) of the batch in fp32; updates the running buffers in place (no host sync)."""
    bn = _kernel("batch_norm")
    (x,) = _collapsible(x, x)
    mean, invstd, _, _ = bn.batch_norm_act_stats(x, None, None, running_mean, running_var, momentum, eps)
    return mean, invstd


@torch.library.custom_op(f"{LIB}::triton_batch_norm_act_apply", mutates_args=())
def triton_batch_norm_act_apply(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                            invstd: Tensor, residual: Optional[Tensor], training: bool, relu: bool) -> Tensor:
    """relu((x - mean) * invstd * weight + bias + residual) in x's dtype and memory format."""
    bn = _kernel("batch_norm")
    x, residual = _collapsible(x, x, residual)
    scale, shift = _scale_shift(weight, bias, mean, invstd)
    return bn.batch_norm_act_apply(x, scale, shift, residual, relu)


@torch.library.custom_op(f"{LIB}::triton_batch_norm_act_backward", mutates_args=())
def triton_batch_norm_act_backward(grad: Tensor, y: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor,
                               invstd: Tensor, training: bool, relu: bool, need_residual_grad: bool,
                               need_param_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    bn = _kernel("batch_norm")
    scale = invstd * weight.float() if weight is not None else invstd
    grad, x = _collapsible(x, grad, x)
    dx, dres, dweight, dbias = bn.batch_norm_act_backward(grad, y, x, mean, invstd, scale, relu=relu, training=training,
                                           need_dres=need_residual_grad, need_param_grads=need_param_grads)
    # Unused outputs come back as empty tensors: operators cannot return None.
    return dx, dres if dres is not None else x.new_empty(0), dweight, dbias


@torch.library.custom_op(f"{LIB}::triton_add_relu", mutates_args=())
def triton_add_relu(x: Tensor, residual: Tensor) -> Tensor:
    return _kernel("add_relu").add_relu(x, residual)


def _stats_dtype(x: Tensor) -> torch.dtype:
    """Per-channel statistics are fp32, fp64 for fp64 activations."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_stats(x, running_mean, running_var, momentum, eps):
    stats = x.new_empty((x.shape[1],), dtype=_stats_dtype(x))
    return stats, stats.clone()


def _fake_apply(x, weight, bias, mean, invstd, residual, training, relu):
    return _empty_like_format(x, x.shape)


def _fake_backward(grad, y, x, weight, mean, invstd, training, relu, need_residual_grad, need_param_grads):
    channels = x.shape[1]
    dres = _empty_like_format(x, x.shape) if need_residual_grad else x.new_empty(0)
    return (_empty_like_format(x, x.shape), dres, x.new_empty((channels,), dtype=_stats_dtype(x)),
            x.new_empty((channels,), dtype=_stats_dtype(x)))


def _fake_add_relu(x, residual):
    return _empty_like_format(x, x.shape)


def _fake_relu_backward(grad, y):
    return _empty_like_format(y, y.shape)


def _bn_setup(ctx, inputs, output):
    x, weight, bias, mean, invstd, residual, training, relu = inputs
    # y is read by the backward for its ReLU mask only: without ReLU it is not kept (a projection shortcut's
    # BN output is the block's residual, added and dead before the backward).
    ctx.save_for_backward(x, weight, output if relu else None, mean, invstd)
    ctx.training, ctx.relu = training, relu
    ctx.has_residual, ctx.has_weight, ctx.has_bias = residual is not None, weight is not None, bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _bn_backward_using(backward_op):
    def backward(ctx, grad):
        x, weight, y, mean, invstd = ctx.saved_tensors
        y = y if y is not None else x  # not read without ReLU
        needs = ctx.needs_input_grad
        need_res = ctx.has_residual and needs[5]
        need_params = (ctx.has_weight and needs[1]) or (ctx.has_bias and needs[2])
        dx, dres, dweight, dbias = backward_op(grad, y, x, weight, mean, invstd, ctx.training, ctx.relu, need_res,
                                               need_params)
        return (dx if needs[0] else None,
                dweight.to(weight.dtype) if ctx.has_weight and needs[1] else None,
                dbias.to(ctx.bias_dtype) if ctx.has_bias and needs[2] else None,
                None, None, dres if need_res else None, None, None)
    return backward


def _add_relu_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _add_relu_backward_using(relu_backward_op):
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        g = relu_backward_op(grad, y)
        return g, g
    return backward


def _fake_winograd(x, packed_weight, bias, residual, relu, isa="auto"):
    n, _, h, w = x.shape
    return x.new_empty((n, packed_weight.shape[1] * packed_weight.shape[3], h, w)).contiguous(
        memory_format=torch.channels_last)


def _register_family(prefix: str, relu_backward_op, backward_op) -> None:
    """Fake implementations and autograd for one backend's BN / add+ReLU operators."""
    for name, fake in (("batch_norm_act_stats", _fake_stats), ("batch_norm_act_apply", _fake_apply),
                       ("batch_norm_act_backward", _fake_backward), ("add_relu", _fake_add_relu),
                       ("relu_backward", _fake_relu_backward)):
        if prefix == "triton_" and name == "relu_backward":
            continue  # registered with its definition above
        torch.library.register_fake(f"{LIB}::{prefix}{name}", fake)
    torch.library.register_autograd(f"{LIB}::{prefix}batch_norm_act_apply", _bn_backward_using(backward_op),
                                    setup_context=_bn_setup)
    torch.library.register_autograd(f"{LIB}::{prefix}add_relu", _add_relu_backward_using(relu_backward_op),
                                    setup_context=_add_relu_setup)


_register_family("triton_", triton_relu_backward, triton_batch_norm_act_backward)
TRITON_BN = (triton_batch_norm_act_stats, triton_batch_norm_act_apply)
COMPILED_BN = None  # (stats, apply) of fastres._C, once it is loaded


def register_compiled_ops() -> None:
    """Called once fastres._C has loaded: give its operators fake implementations and autograd."""
    global COMPILED_BN, CUDNN_NORM_CONV
    ops = torch.ops.fastres
    _register_family("", ops.relu_backward, ops.batch_norm_act_backward)
    torch.library.register_fake(f"{LIB}::conv3x3_winograd", _fake_winograd)  # inference only: no autograd
    COMPILED_BN = (ops.batch_norm_act_stats, ops.batch_norm_act_apply)
    # cuDNN graphs (csrc/cuda/cudnn_graphs.cpp): inference / statistics ops, no autograd formula
    # (the dispatch covers them only without autograd). The `_supported` twins ask cuDNN, which no
    # fake tensor can answer: they have no fake implementation (call them outside tracing).
    torch.library.register_fake(f"{LIB}::cudnn_conv_bias_act", _fake_cudnn_conv_bias_act)
    torch.library.register_fake(f"{LIB}::cudnn_conv_genstats", _fake_cudnn_conv_genstats)
    if hasattr(ops, "cudnn_conv_wgrad"):  # (a stale build without the backward graphs has no schema)
        torch.library.register_fake(f"{LIB}::cudnn_conv_wgrad", _fake_cudnn_conv_wgrad)
        torch.library.register_fake(f"{LIB}::cudnn_conv_dgrad_drelu", _fake_cudnn_conv_dgrad_drelu)
    torch.library.register_fake(f"{LIB}::batch_norm_finalize", _fake_batch_norm_finalize)
    if CUDNN_NORM_CONV is None:
        CUDNN_NORM_CONV = _register_cudnn_norm_conv()


def _fake_cudnn_conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    return _empty_like_format(x, _conv_shape(x, weight, stride, padding, dilation))


def _fake_cudnn_conv_genstats(x, weight, scale, shift, prologue_relu, stride, padding, dilation, groups):
    y = _empty_like_format(x, _conv_shape(x, weight, stride, padding, dilation))
    stats = x.new_empty((weight.shape[0],), dtype=torch.float32)
    return y, stats, torch.empty_like(stats)


def _fake_cudnn_conv_wgrad(grad, x, weight_size, scale, shift, prologue_relu, stride, padding, dilation, groups):
    return _empty_like_format(x, tuple(weight_size))


def _fake_cudnn_conv_dgrad_drelu(grad, weight, x, scale, shift, stride, padding, dilation, groups):
    sums = x.new_empty((x.shape[1],), dtype=torch.float32)
    return _empty_like_format(x, tuple(x.shape)), sums, torch.empty_like(sums)


def _fake_batch_norm_finalize(sum, sqsum, count, weight, bias, running_mean, running_var, momentum, eps):
    dtype = torch.float64 if sum.dtype == torch.float64 else torch.float32
    return tuple(sum.new_empty(sum.shape, dtype=dtype) for _ in range(4))


def batch_norm_act(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu, *,
                   stats=None, family=TRITON_BN):
    """BatchNorm (+ residual) (+ ReLU) on one backend's operators; autograd through the apply op (in
    training, BN's full gradient). stats: x's batch statistics (mean, invstd), already computed."""
    stats_op, apply_op = family
    if stats is not None:
        mean, invstd = (t.to(_stats_dtype(x)).contiguous() for t in stats)
    elif training:
        mean, invstd = stats_op(x.detach(), running_mean, running_var, momentum, eps)
    else:
        dtype = _stats_dtype(x)
        mean, invstd = running_mean.to(dtype), torch.rsqrt(running_var.to(dtype) + eps)
    return apply_op(x, weight, bias, mean, invstd, residual, training, relu)
