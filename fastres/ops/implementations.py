"""Every implementation of every fused op, with what it covers: the one table the dispatch reads.

One `register` per (op, implementation). `covers(call)` returns None when the implementation can
run the call (arguments are already checked), else a short reason. Static ranks (used where auto
cannot measure): the CPU fast path below the reference (it was measured faster on the CPUs in
benchmarks/results), GPU fast paths above it (a kernel nobody has timed on this GPU is never the
default), so unmeasured CUDA calls keep cuDNN through the reference.
"""
from __future__ import annotations

import torch

from . import compiled, onednn, reference, registry, winograd
from .dispatch import Call, autocast_dtype, cast, cast_parameters, register

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GPU_RANK = 200  # never a static choice on auto; explicit backends still take them


# ------------------------------------------------------------------ reference ("torch")

register("conv2d_act", "reference", backend="torch", covers=lambda call: None,
         run=lambda call, config: reference.conv2d_act(*call.positional()))
register("bottleneck_tail", "reference", backend="torch", covers=lambda call: None,
         run=lambda call, config: reference.bottleneck_tail(*call.positional()))
register("batch_norm_act", "reference", backend="torch", covers=lambda call: None,
         run=lambda call, config: reference.batch_norm_act(
             call.x, call.weight, call.bias, call.running_mean, call.running_var, call.training, call.momentum,
             call.eps, call.residual, call.relu, call.args.get("mean"), call.args.get("invstd")))
register("add_relu", "reference", backend="torch", covers=lambda call: None,
         run=lambda call, config: reference.add_relu(call.x, call.residual))


# ------------------------------------------------------------------ CPU fast path (oneDNN, Winograd)

def _onednn_covers(call: Call):
    if not onednn.applies(call.x, call.weight, call.residual):
        return "not covered: needs CPU float32 channels_last inference without autograd or autocast"
    return onednn.unsupported(call.x, call.weight, call.stride, call.padding, call.dilation, call.residual)


def _winograd_covers(tile: int):
    def covers(call: Call):
        why = _onednn_covers(call)
        if why is not None:
            return why
        if not winograd.covers(call.x, call.weight, call.stride, call.padding, call.dilation, call.groups, tile):
            return f"not covered: Winograd F({tile}x{tile},3x3) needs a 3x3 stride-1 pad-1 conv, C % 16 == 0, " \
                   f"K % 32 == 0{' and H, W multiples of 4' if tile == 4 else ''}"
        return None
    return covers


def _winograd_rank(tile: int):
    # Where measuring is off: the hand-set threshold of winograd.py, F(4x4) before F(2x2).
    return lambda call: (tile == 2) if winograd.enough_tiles(call.x) else 20


def _onednn_run(method: str):
    return lambda call, config: onednn.conv2d_act(*call.positional(), method=method)


register("conv2d_act", "onednn", backend="onednn", covers=_onednn_covers, run=_onednn_run("direct"), rank=10)
for _tile in (4, 2):
    register("conv2d_act", f"winograd{_tile}", backend="onednn", covers=_winograd_covers(_tile),
             run=_onednn_run(f"winograd{_tile}"), rank=_winograd_rank(_tile))


def _onednn_tail_covers(call: Call):
    if not (onednn.applies(call.h, call.w3, None) and onednn.applies(call.x, call.wd, None)):
        return "not covered: needs CPU float32 channels_last inference without autograd or autocast"
    return None


register("bottleneck_tail", "onednn", backend="onednn", covers=_onednn_tail_covers,
         run=lambda call, config: onednn.bottleneck_tail(*call.positional()), rank=10)


# ------------------------------------------------------------------ cuDNN's runtime-fused conv (torch)

def _cudnn_fused_covers(call: Call):
    x = call.x
    if x.device.type != "cuda" or not torch.backends.cudnn.is_available() or not torch.backends.cudnn.enabled:
        return "not covered: needs CUDA with cuDNN"
    if not call.relu:
        return "not covered: cuDNN's fused ops always apply ReLU"
    if torch.is_grad_enabled() and any(t.requires_grad for t in call.tensors().values()):
        return "not covered: no autograd formula (inference only)"
    if (autocast_dtype(x) or x.dtype) not in TRITON_DTYPES:
        return "not covered: float16, bfloat16 or float32 only"
    return None


def _cudnn_fused_run(call: Call, config: str):
    dtype = autocast_dtype(call.x) or call.x.dtype
    x, residual = cast(dtype, call.x, call.residual)
    weight, bias = cast_parameters(dtype, call.weight, call.bias)
    fmt = torch.channels_last if registry._format_of(x) == torch.channels_last else torch.contiguous_format
    weight = weight.contiguous(memory_format=fmt)
    args = (list(call.stride), list(call.padding), list(call.dilation), call.groups)
    if residual is None:
        return torch.cudnn_convolution_relu(x, weight, bias, *args)
    return torch.cudnn_convolution_add_relu(x, weight, residual.contiguous(memory_format=fmt), 1.0, bias, *args)


register("conv2d_act", "cudnn_fused", backend="cudnn", covers=_cudnn_fused_covers, run=_cudnn_fused_run,
         rank=GPU_RANK)


# ------------------------------------------------------------------ "cpp": fastres._C

def _cpp_covers(call: Call):
    if not compiled.covers(call.lead):
        return "not covered: fastres._C has no kernels for this device"
    if call.op in ("batch_norm_act", "add_relu") and call.x.numel() == 0:
        return "not covered: empty input"
    return None


def _cpp_conv(call: Call, config: str):
    dtype = autocast_dtype(call.x) or call.x.dtype
    x, residual = cast(dtype, call.x, call.residual)
    weight, bias = cast_parameters(dtype, call.weight, call.bias)
    return compiled.conv2d_act(x, weight, bias, call.stride, call.padding, call.dilation, call.groups, residual,
                               call.relu)


def _cpp_tail(call: Call, config: str):
    dtype = autocast_dtype(call.h) or call.h.dtype
    h, x = cast(dtype, call.h, call.x)
    w3, wd, bias = cast_parameters(dtype, call.w3, call.wd, call.bias)
    return compiled.bottleneck_tail(h, w3, x, wd, bias, call.stride, call.relu)


def _given_stats(call: Call):
    """(mean, invstd) given to batch_norm_act (x's batch statistics, computed by whoever made x), or None."""
    mean = call.args.get("mean")
    return None if mean is None else (mean.detach(), call.args["invstd"].detach())


def _cpp_bn(call: Call, config: str):
    (residual,) = cast(call.x.dtype, call.residual)
    return compiled.batch_norm_act(call.x, call.weight, call.bias, call.running_mean, call.running_var, residual,
                                   call.training, call.momentum, call.eps, call.relu, stats=_given_stats(call))


def _cuda_only(call: Call):
    """auto's extra condition for the GPU fast paths: on the CPU the Triton kernels run in the interpreter
    (a test vehicle), and the cpp CPU kernels are not torchvision's arithmetic (CPU training is bitwise
    torchvision's on auto), so there they run only when asked for by name."""
    return None if call.lead.device.type == "cuda" else "auto uses it on CUDA only"


register("conv2d_act", "cpp", backend="cpp", covers=_cpp_covers, run=_cpp_conv, rank=GPU_RANK, in_auto=_cuda_only)


# cuDNN graphs of fastres._C: conv + bias + residual + ReLU as one graph (inference, no autograd).
# Rank GPU_RANK - 1: the explicit "cpp" backend prefers it on CUDA where cuDNN has an engine.
def _cudnn_graph_dtype(call: Call):
    return autocast_dtype(call.lead) or call.lead.dtype


def _cudnn_graph_common(call: Call):
    if call.lead.device.type != "cuda" or not compiled.cudnn_graphs_built():
        return "not covered: needs CUDA and fastres._C built with the cuDNN graphs"
    if torch.is_grad_enabled() and any(t.requires_grad for t in call.tensors().values()):
        return "not covered: no autograd formula (inference only)"
    if _cudnn_graph_dtype(call) not in TRITON_DTYPES:
        return "not covered: float16, bfloat16 or float32 only"
    return None


def _cudnn_graph_covers(call: Call):
    why = _cudnn_graph_common(call)
    if why is not None:
        return why
    dtype = _cudnn_graph_dtype(call)
    (x, residual), (weight, bias) = cast(dtype, call.x, call.residual), cast_parameters(dtype, call.weight, call.bias)
    if not compiled.cudnn_graph_covers(x, weight, bias, call.stride, call.padding, call.dilation, call.groups,
                                       residual, call.relu):
        return "not covered: cuDNN has no engine for this graph (or groups > 1)"
    return None


def _cudnn_graph_run(call: Call, config: str):
    dtype = _cudnn_graph_dtype(call)
    (x, residual), (weight, bias) = cast(dtype, call.x, call.residual), cast_parameters(dtype, call.weight, call.bias)
    return compiled.cudnn_conv2d_act(x, weight, bias, call.stride, call.padding, call.dilation, call.groups,
                                     residual, call.relu)


def _cudnn_tail_covers(call: Call):
    why = _cudnn_graph_common(call)
    if why is not None:
        return why
    dtype = _cudnn_graph_dtype(call)
    (h, x), (w3, wd, bias) = cast(dtype, call.h, call.x), cast_parameters(dtype, call.w3, call.wd, call.bias)
    if not compiled.cudnn_tail_covers(h, w3, x, wd, bias, call.stride, call.relu):
        return "not covered: cuDNN has no engine for one of the tail's two graphs"
    return None


def _cudnn_tail_run(call: Call, config: str):
    dtype = _cudnn_graph_dtype(call)
    (h, x), (w3, wd, bias) = cast(dtype, call.h, call.x), cast_parameters(dtype, call.w3, call.wd, call.bias)
    return compiled.cudnn_bottleneck_tail(h, w3, x, wd, bias, call.stride, call.relu)


register("conv2d_act", "cudnn_graph", backend="cpp", covers=_cudnn_graph_covers, run=_cudnn_graph_run,
         rank=GPU_RANK - 1, in_auto=_cuda_only)
register("bottleneck_tail", "cudnn_graph", backend="cpp", covers=_cudnn_tail_covers, run=_cudnn_tail_run,
         rank=GPU_RANK - 1, in_auto=_cuda_only)
register("bottleneck_tail", "cpp", backend="cpp", covers=_cpp_covers, run=_cpp_tail, rank=GPU_RANK, in_auto=_cuda_only)
register("batch_norm_act", "cpp", backend="cpp", covers=_cpp_covers, run=_cpp_bn, rank=GPU_RANK, in_auto=_cuda_only)
register("add_relu", "cpp", backend="cpp", covers=_cpp_covers,
         run=lambda call, config: compiled.add_relu(call.x, call.residual), rank=GPU_RANK, in_auto=_cuda_only)


# ------------------------------------------------------------------ "triton"

def _triton_covers(call: Call):
    x = call.lead
    if not registry.TRITON_AVAILABLE:
        return f"not covered: {registry.triton_status()[1]}"
    if x.dtype not in TRITON_DTYPES and autocast_dtype(x) is None:
        return "not covered: float16, bfloat16 or float32 only"
    if x.device.type not in ("cuda", "cpu"):
        return f"not covered: device {x.device.type}"
    if call.op == "batch_norm_act" and x.numel() == 0:
        return "not covered: empty input"
    return None


def _triton_conv(call: Call, config: str):
    dtype = autocast_dtype(call.x) or call.x.dtype
    x, residual = cast(dtype, call.x, call.residual)
    weight, bias = cast_parameters(dtype, call.weight, call.bias)  # a stable cast: packed once, not per call
    return registry.triton_conv2d_act(x, weight, bias, list(call.stride), list(call.padding), list(call.dilation),
                                      call.groups, residual, call.relu, config)


def _triton_tail(call: Call, config: str):
    dtype = autocast_dtype(call.h) or call.h.dtype
    h, x = cast(dtype, call.h, call.x)
    w3, wd, bias = cast_parameters(dtype, call.w3, call.wd, call.bias)
    return registry.triton_bottleneck_tail(h, w3, x, wd, bias, list(call.stride), call.relu, config)


def _triton_conv_configs(call: Call):
    return registry._kernel("conv").configs(call.x, call.weight, call.stride, call.padding, call.dilation, call.groups)


def _triton_tail_configs(call: Call):
    return registry._kernel("conv").configs(call.h, call.w3, second_channels=call.wd.shape[1])


def _triton_bn(call: Call, config: str):
    (residual,) = cast(call.x.dtype, call.residual)
    return registry.batch_norm_act(call.x, call.weight, call.bias, call.running_mean, call.running_var, residual,
                                   call.training, call.momentum, call.eps, call.relu, stats=_given_stats(call))


for _op, _run in (("conv2d_act", _triton_conv), ("bottleneck_tail", _triton_tail), ("batch_norm_act", _triton_bn),
                  ("add_relu", lambda call, config: registry.triton_add_relu(call.x, call.residual))):
    register(_op, "triton", backend="triton", covers=_triton_covers, run=_run, rank=GPU_RANK, in_auto=_cuda_only,
             configs={"conv2d_act": _triton_conv_configs, "bottleneck_tail": _triton_tail_configs}.get(_op))


# ------------------------------------------------------------------ norm_conv (NormConv training)
#
# Every implementation returns (y, mean, var) from a functional, differentiable operator; the
# running buffers and invstd are then made the same way for all (reference.finish_norm_conv).

def _norm_conv_dtype(call: Call):
    return autocast_dtype(call.x) or call.x.dtype


def _norm_conv_finish(call: Call, out):
    y, mean, var = out
    return reference.finish_norm_conv(y, mean, var, call.running_mean, call.running_var, call.momentum, call.eps)


def _norm_conv_operands(call: Call):
    x, weight = cast(_norm_conv_dtype(call), call.x, call.weight)
    return x, weight, call.scale, call.shift, call.relu, list(call.stride), list(call.padding), list(call.dilation), \
        call.groups


def _reference_norm_conv(call: Call, config: str):
    """torch's ops under NormConv's own autograd formula (registry.reference_norm_conv: what a chain holds
    does not depend on which implementation the tuner picks per conv); under torch.compile the torch ops
    themselves, whose saved tensors the compiler's partitioner chooses."""
    if torch.compiler.is_compiling():
        return reference.norm_conv(*call.positional())
    return _norm_conv_finish(call, registry.reference_norm_conv(*_norm_conv_operands(call)))


register("norm_conv", "reference", backend="torch", covers=lambda call: None, run=_reference_norm_conv)


def _triton_norm_conv(call: Call, config: str):
    return _norm_conv_finish(call, registry.triton_norm_conv(*_norm_conv_operands(call), config))


def _triton_norm_conv_configs(call: Call):
    """The forward's tiles; for a training call also the default forward with each larger backward tile
    ("|" + tiles: conv_backward.backward_configs), so auto's forward + backward timing picks those too."""
    forward = registry._kernel("conv").configs(call.x, call.weight, call.stride, call.padding, call.dilation,
                                               call.groups, prologue=call.scale is not None)
    from . import tuner  # imported late, as dispatch does: it needs the registry filled
    if not tuner.needs_grad(call):
        return forward
    backward = registry._kernel("conv_backward").backward_configs(call.x, call.weight, call.groups)
    return forward + ["|" + tiles for tiles in backward]


register("norm_conv", "triton", backend="triton", covers=_triton_covers, run=_triton_norm_conv,
         configs=_triton_norm_conv_configs, rank=GPU_RANK, in_auto=_cuda_only)


def _cudnn_norm_conv_covers(call: Call):
    if call.x.device.type != "cuda" or not compiled.cudnn_graphs_built() or registry.CUDNN_NORM_CONV is None:
        return "not covered: needs CUDA and fastres._C built with the cuDNN graphs"
    if _norm_conv_dtype(call) not in TRITON_DTYPES:
        return "not covered: float16, bfloat16 or float32 only"
    if torch.compiler.is_compiling() or isinstance(call.x, torch._subclasses.FakeTensor):
        return "not covered: cuDNN must be asked outside tracing"
    x, weight, scale, shift, relu, stride, padding, dilation, groups = _norm_conv_operands(call)
    if groups != 1 or not torch.ops.fastres.cudnn_conv_genstats_supported(x, weight, scale, shift, relu, stride,
                                                                          padding, dilation, groups):
        return "not covered: cuDNN has no engine for this conv + statistics graph (or groups > 1)"
    return None


register("norm_conv", "cudnn_graph", backend="cpp", covers=_cudnn_norm_conv_covers,
         run=lambda call, config: _norm_conv_finish(call, registry.CUDNN_NORM_CONV(*_norm_conv_operands(call))),
         rank=GPU_RANK - 1, in_auto=_cuda_only)
