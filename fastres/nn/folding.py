"""Eval-time BatchNorm folding with a cache that must never serve stale weights.

The folded (weight, bias) of a conv+BN pair are cached per conv module and keyed on
every input tensor's identity, storage, version counter, dtype and device, BN's eps,
and a global generation. Version counters see in-place edits made through autograd-
visible ops (`copy_` in load_state_dict, `mul_` under no_grad, non-fused optimizers);
replacements (`.to()`, `.half()`, `param.data = t`) change the storage. Four updates
bypass version counters, so they bump the generation instead: optimizer steps (fused
optimizers write parameters without a version bump; a global step hook catches every
optimizer), BatchNorm's running-statistic update (done inside the kernel: fastres's
training BN path and train()/eval() switches of fastres modules bump the generation),
module conversions, and DistributedDataParallel's buffer broadcast before each forward
(it preserves the version counters on purpose; its `_sync_buffers` is wrapped here). The entry keeps
the folded-from tensors alive, so a freed storage cannot come back at the same address and fake a match.

Not detectable: in-place edits through `.data` (PyTorch gives `.data` a fresh version
counter). After such edits call `clear_fold_cache()`, or set FASTRES_FOLD_CACHE=0 to fold
on every forward. When gradients must flow to the conv or BN parameters (eval-mode
fine-tuning with frozen statistics) the fold is recomputed inside autograd every call.
"""
from __future__ import annotations

import functools
import os
import threading
import weakref
from typing import Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..ops import fold_bn

_cache: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_generation = 0
_enabled = os.environ.get("FASTRES_FOLD_CACHE", "1") != "0"


def invalidate_all() -> None:
    """Make every cached fold stale (cheap: entries are rebuilt lazily on their next use)."""
    global _generation
    _generation += 1


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    invalidate_all()


register_optimizer_step_post_hook(_after_optimizer_step)


def _invalidate_after_ddp_buffer_sync() -> None:
    """DDP copies rank 0's buffers into every replica under _unsafe_preserve_version_counter, so
    a replica's folds of its own statistics would look current: make them stale after each sync."""
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    sync = getattr(ddp, "_sync_buffers", None)
    if sync is None or getattr(sync, "_fastres_invalidates", False):
        return

    @functools.wraps(sync)
    def _sync_buffers(self, *args, **kwargs):
        try:
            return sync(self, *args, **kwargs)
        finally:
            invalidate_all()

    _sync_buffers._fastres_invalidates = True
    ddp._sync_buffers = _sync_buffers


_invalidate_after_ddp_buffer_sync()


def _tensor_key(t: Optional[torch.Tensor]):
    if t is None:
        return None
    return (id(t), t.data_ptr(), t._version, t.dtype, t.device, t.shape)


def _inputs(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm):
    return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)


def _cacheable(tensors) -> bool:
    if not _enabled or torch.compiler.is_compiling():
        return False  # traced graphs fold once at trace time; version counters are not traceable
    present = [t for t in tensors if t is not None]
    if any(t.is_inference() for t in present):
        return False  # inference tensors have no version counter to watch
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def folded_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm,
                   memory_format: torch.memory_format = torch.contiguous_format):
    """(weight, bias) of conv followed by eval-mode bn, in the conv weight's dtype and `memory_format`."""
    tensors = _inputs(conv, bn)
    if not _cacheable(tensors):
        return _fold(conv, bn, memory_format)
    key = (_generation, tuple(_tensor_key(t) for t in tensors), float(bn.eps))
    entry = _cache.get(conv)
    if entry is None or entry[0] != key:
        # Holding the source tensors keeps their storage (and so their address) from being reused.
        entry = (key, {}, tuple(t.detach() for t in tensors if t is not None))
        with _lock:
            _cache[conv] = entry
    variants = entry[1]
    folded = variants.get(memory_format)
    if folded is None:
        # Normal (not inference-mode) tensors, so their version counters can key later caches.
        with torch.inference_mode(False), torch.no_grad():
            folded = variants[memory_format] = _fold(conv, bn, memory_format)
    return folded


def _fold(conv, bn, memory_format):
    weight, bias = fold_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    dtype = conv.weight.dtype
    return weight.to(dtype).contiguous(memory_format=memory_format), bias.to(dtype)


def clear_fold_cache() -> None:
    """Drop every cached fold (they are rebuilt on the next eval forward)."""
    with _lock:
        _cache.clear()
    invalidate_all()
