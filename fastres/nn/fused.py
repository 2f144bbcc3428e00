"""conv+BN(+add)(+ReLU) over real nn.Conv2d / nn.BatchNorm2d modules, on the fused ops.

The blocks keep torchvision's submodules (so state_dict keys, load_state_dict, hooks,
SyncBatchNorm conversion and IntermediateLayerGetter keep working) and call these
functions instead of the modules. Whatever the fused path cannot honour exactly -- a
hook on a submodule, another norm layer, a non-zero padding mode, a replaced ReLU --
runs the modules themselves, so behaviour stays torchvision's. torchvision's
FrozenBatchNorm2d is eval-mode BatchNorm in every mode and folds like it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

from .. import ops
from ..layout import memory_format_of
from ..ops import dispatch as _dispatch
from .folding import folded_conv_bn, invalidate_all

_global_hook_dicts = [
    getattr(nn.modules.module, name, {})
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
]
_module_hook_attrs = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _module_hook_attrs)


def _no_global_hooks() -> bool:
    return not any(_global_hook_dicts)


def fusable_conv(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and not has_hooks(conv))


def is_frozen_bn(bn: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d (detection backbones): eval-mode BatchNorm whatever its mode."""
    return type(bn) is FrozenBatchNorm2d


def fusable_bn(bn: nn.Module) -> bool:
    # SyncBatchNorm and other norms are not BatchNorm2d: they run as modules. torchvision's
    # FrozenBatchNorm2d is eval-mode BatchNorm's arithmetic in every mode: it folds like one.
    if is_frozen_bn(bn):
        return not has_hooks(bn)
    return (isinstance(bn, nn.BatchNorm2d) and type(bn).forward is _BatchNorm.forward and not has_hooks(bn))


def fusable_relu(relu: nn.Module) -> bool:
    return type(relu) is nn.ReLU and not has_hooks(relu)


def fusable_pair(conv: nn.Module, bn: nn.Module) -> bool:
    return fusable_conv(conv) and fusable_bn(bn) and _no_global_hooks()


def uses_running_stats(bn: nn.Module) -> bool:
    if is_frozen_bn(bn):
        return True
    return not bn.training and bn.running_mean is not None and bn.running_var is not None


def _momentum_factor(bn: _BatchNorm) -> float:
    """The running-statistics factor of this forward, counting the batch as nn.BatchNorm2d does."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average, as torch does it
            factor = 1.0 / float(bn.num_batches_tracked)
    return factor


def batch_norm_act(bn: _BatchNorm, y: torch.Tensor, *, residual: Optional[torch.Tensor] = None,
                   relu: bool = True, stats: Optional[tuple] = None) -> torch.Tensor:
    """bn(y) (+ residual) (+ ReLU) with nn.BatchNorm2d's exact semantics, buffers included. stats: y's
    batch statistics (mean, invstd) for a training bn, already computed by conv_bn_stats (which also
    updated bn's buffers and batch count): only the apply runs."""
    if stats is not None:
        return ops.batch_norm_act(y, bn.weight, bn.bias, None, None, training=True, eps=bn.eps, residual=residual,
                                  relu=relu, mean=stats[0], invstd=stats[1])
    factor = _momentum_factor(bn)
    use_batch_stats = bn.training or bn.running_mean is None
    track = not bn.training or bn.track_running_stats
    out = ops.batch_norm_act(
        y, bn.weight, bn.bias, bn.running_mean if track else None, bn.running_var if track else None,
        training=use_batch_stats, momentum=factor, eps=bn.eps, residual=residual, relu=relu)
    if use_batch_stats and track and bn.running_mean is not None:
        # The kernels update the running buffers without bumping their version counters (and
        # bumping them would trip autograd, which saved them): make cached folds stale instead.
        invalidate_all()
    return out


def conv_bn_act(conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor, *, residual: Optional[torch.Tensor] = None,
                relu: bool = True) -> torch.Tensor:
    """relu(bn(conv(x)) + residual): folded into one fused conv in eval, BN on batch statistics in training."""
    if not fusable_pair(conv, bn):
        y = bn(conv(x))
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
    if uses_running_stats(bn):
        weight, bias = folded_conv_bn(conv, bn, memory_format_of(x))
        return ops.conv2d_act(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                              residual=residual, relu=relu)
    return batch_norm_act(bn, conv(x), residual=residual, relu=relu)


# ---------------------------------------------------------------- NormConv chain (training)

def norm_conv_chain_pair(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether (conv, bn) can run as one NormConv step: a fusable pair, no conv bias, BN in training."""
    return fusable_pair(conv, bn) and isinstance(bn, _BatchNorm) and conv.bias is None and bn.training


def norm_conv_chain_applies(pairs, x: torch.Tensor) -> bool:
    """Whether a training block of (conv, bn) pairs runs as a NormConv chain: every pair fusable and in
    training, and a non-reference norm_conv implementation covers the first conv (elsewhere -- the CPU
    default, backend "torch" -- the block keeps its phase-A path unchanged)."""
    if not all(norm_conv_chain_pair(conv, bn) for conv, bn in pairs):
        return False
    if x.numel() == 0:  # an empty batch: the module path returns an empty result like torch
        return False
    conv, bn = pairs[0]
    return _dispatch.fast_path_covers("norm_conv", dict(
        x=x, weight=conv.weight, scale=None, shift=None, relu=False, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, running_mean=bn.running_mean, running_var=bn.running_var,
        momentum=0.1, eps=bn.eps))


def conv_bn_stats(conv: nn.Conv2d, bn: Optional[_BatchNorm], x: torch.Tensor, prologue: Optional[tuple] = None,
                  reruns: Optional[dict] = None):
    """(y, mean, invstd): y = conv(relu?(x * scale + shift)) (prologue = (scale, shift, relu), the previous
    BN's apply) with the batch statistics of y for `bn`, whose running buffers and batch count are updated
    as nn.BatchNorm2d does. bn=None: statistics only, nothing updated. reruns: the memo of a recomputed
    segment (`recomputed`): its first run updates bn's buffers and notes the momentum used; a rerun (the
    backward's) uses the same momentum on scratch copies, so the buffers are updated once and the rerun
    takes the same implementation (same dispatch signature) and so recomputes the same y."""
    scale, shift, relu = prologue if prologue is not None else (None, None, False)
    track = bn is not None and bn.track_running_stats and bn.running_mean is not None
    running_mean, running_var = (bn.running_mean, bn.running_var) if track else (None, None)
    if reruns is not None and bn is not None and id(bn) in reruns:
        factor = reruns[id(bn)]
        if track:
            running_mean, running_var = torch.zeros_like(running_mean), torch.ones_like(running_var)
            track = False
    else:
        factor = _momentum_factor(bn) if bn is not None else 0.0
        if reruns is not None and bn is not None:
            reruns[id(bn)] = factor
    out = ops.norm_conv(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups, scale=scale,
                        shift=shift, relu=relu, running_mean=running_mean, running_var=running_var, momentum=factor,
                        eps=bn.eps if bn is not None else 1e-5)
    if track:
        invalidate_all()
    return out


# What a recomputed segment may cost: multiply-adds per recomputed output element. At <= 64 (a 1x1 conv
# from 64 channels, a BN apply, a max-pool) the recompute is memory-bound on the GPUs fastres targets
# (H100: ~800 TFLOP/s bf16 against ~3 TB/s, ~130 MACs per byte moved), so it costs about one more read of
# its inputs and write of its output, while its output is not held from the forward to the backward.
RECOMPUTE_MAX_MACS = 64


def cheap_to_recompute(conv: nn.Conv2d) -> bool:
    """Whether one output element of conv costs at most RECOMPUTE_MAX_MACS multiply-adds."""
    kh, kw = conv.kernel_size
    return kh * kw * conv.in_channels // conv.groups <= RECOMPUTE_MAX_MACS


def recomputed(fn, *tensors: torch.Tensor):
    """fn(reruns, *tensors), holding for the backward only `tensors` (which the caller keeps anyway) and
    running fn again in the backward for whatever its backward needs (torch.utils.checkpoint,
    non-reentrant). `reruns` is a memo fn passes to conv_bn_stats so that BN buffers are updated once.
    Both runs select implementations as the forward did (the backend and forward context are captured
    with it: a backward outside `fastres.use_backend` reruns on the same kernels; torch's checkpoint
    restores autocast itself). Plain call (nothing recomputed) without gradients, and under torch.compile,
    whose partitioner chooses what to save and what to recompute on its own."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return fn(None, *tensors)
    import torch.utils.checkpoint as checkpoint
    reruns: dict = {}
    state = _dispatch.selection_state()

    def run(*args):
        with _dispatch.replaying(state):
            return fn(reruns, *args)
    return checkpoint.checkpoint(run, *tensors, use_reentrant=False, preserve_rng_state=False)


def bn_prologue(bn: _BatchNorm, mean: torch.Tensor, invstd: torch.Tensor, relu: bool = True) -> tuple:
    """(scale, shift, relu) of training BN with these batch statistics: the next conv's prologue.
    Plain (differentiable) per-channel torch ops, so the gradient reaches mean and invstd."""
    scale = invstd * bn.weight if bn.weight is not None else invstd
    shift = -mean * scale
    return scale, shift + bn.bias if bn.bias is not None else shift, relu
