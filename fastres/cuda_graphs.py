"""CUDA graphs for small-batch inference: `fastres.cudagraph(model, example)`.

At small batch sizes a forward's time can be dominated by the host launching one kernel per
op; a CUDA graph captures the whole forward once and replays it as one launch (the speed-up
has not been measured here: no GPU yet). A graph
replays fixed addresses, so the wrapper owns a static input (each call copies into it) and a
static output, and one graph serves one input shape, dtype, device and memory format.

The graph also bakes in the addresses of the BN-folded weights from fastres's fold cache
(fastres/nn/folding.py). To never replay stale numbers each call compares a fingerprint of
the model's tensors with the one taken at capture and captures again when it differs; see
`GraphedInference`.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Tuple

import torch
from torch import nn

from .layout import is_channels_last
from .nn import folding
from .ops.backend import get_backend

__all__ = ["GraphedInference", "cudagraph"]


def _memory_format_name(t: torch.Tensor) -> str:
    if is_channels_last(t):
        return "channels_last"
    return "contiguous" if t.is_contiguous() else "strided"


_version_of = operator.attrgetter("_version")


def _tensors_and_modes(model: nn.Module) -> Tuple[List[torch.Tensor], Tuple[bool, ...]]:
    """Every parameter and buffer, fetched fresh (a replaced tensor must be seen), and every
    module's training flag. A plain walk of the `_modules` dicts: nn.Module.modules() or
    named_parameters() + named_buffers() cost 2-4x more (generators, name strings)."""
    seen = set()
    stack = [model]
    modes = []
    tensors: List[torch.Tensor] = []
    while stack:
        module = stack.pop()
        if module is None or id(module) in seen:
            continue  # None: an optional child left empty; seen: shared (or cyclic) submodules
        seen.add(id(module))
        modes.append(module.training)
        tensors += module._parameters.values()
        tensors += module._buffers.values()
        stack += module._modules.values()
    return [t for t in tensors if t is not None], tuple(modes)


def _fingerprint(tensors: List[torch.Tensor], modes: Tuple[bool, ...]) -> tuple:
    # id() is sound because the wrapper keeps the captured tensors alive (an id cannot be
    # reused); data_ptr sees `param.data = t`; _version sees copy_/mul_/load_state_dict; the
    # fold generation sees fused optimizer steps, running-stat updates, train()/.to().
    # map() over C getters: ~3x faster than building one tuple per tensor.
    return (folding._generation, get_backend(), modes, list(map(id, tensors)),
            list(map(torch.Tensor.data_ptr, tensors)), list(map(_version_of, tensors)))


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    for name, module in model.named_modules():
        if module.training:
            where = "model" if not name else f"model.{name}"
            raise ValueError(f"{where} is in training mode; a CUDA graph here is for inference: call model.eval() "
                             f"first (training BatchNorm would update running statistics "
                             f"inside the graph)")
    return model


def _check_device(model: nn.Module, example: torch.Tensor) -> None:
    if example.device.type != "cuda":
        raise ValueError(f"example is on {example.device}; CUDA graphs need a CUDA tensor (and the model on "
                         f"the same device), e.g. example.cuda()")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device != example.device:
            raise ValueError(f"model's {name} is on {t.device} but example is on {example.device}; "
                             f"expected the same device (model.to(example.device))")


class GraphedInference:
    """`model(x)` (eval mode, no autograd) replayed from a CUDA graph captured for one input shape.

    Made by `fastres.cudagraph(model, example, ...)`; call it like the model: `graphed(x)`.

    Each call checks that x has exactly the captured shape, dtype and device (a different
    batch size needs its own graph: make one wrapper per shape), copies x into the static
    input (any memory format is accepted; the graph keeps the example's), replays, and returns
    a fresh copy of the output (`copy_output=True`) or the static output tensor itself, which
    the next call overwrites (`copy_output=False`: saves one small copy when each result is
    consumed before the next call). Outputs never require grad.

    No stale weights: with `check_weights=True` each call compares a fingerprint of the model
    with the one taken at capture: for every parameter and buffer its identity, data_ptr and
    version counter, every module's training flag, fastres's fold-cache generation (bumped by
    optimizer steps, training-mode BatchNorm, train()/eval() and .to() of fastres modules,
    anywhere in the process) and the current fastres backend. On a mismatch it warms up and
    captures again, then replays (`captures` counts). The check walks the module tree on the
    host: measured 0.2-0.25 ms per call for resnet50 (320 tensors, 151 modules), 0.1 ms for
    resnet18, on one core of a loaded 2-core CPU (named_parameters() + named_buffers() alone
    took ~1.1 ms). That is host latency added to each call; `check_weights=False` skips it
    when nothing changes the model, or when another model trains in the same process (its
    optimizer steps bump the generation: every call would capture again). Without the check
    the graph keeps reading the tensors it captured: a weight changed in place is seen where
    the graph reads it directly (the fc layer) but not through the folded conv+BN weights,
    so the numbers are wrong until `recapture()`; a backend switch or model.train() is
    still seen.
    Not detectable (as for the fold cache): in-place edits through `.data` (`p.data.mul_(2)`):
    call `recapture()` after them. Hooks added or submodules' attributes changed after capture
    are not seen either: recapture() after such changes.

    A capture records what the model ran under the settings then in force (autocast, cuDNN
    and TF32 flags); captures happen at construction and in a call that finds the model
    changed, so keep those settings the same for every call. One wrapper is not meant for concurrent
    calls from several threads. Calls from another
    stream than the previous call's are ordered after it (no host synchronisation).
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, *, warmup: int = 3, copy_output: bool = True,
                 check_weights: bool = True) -> None:
        _check_model(model)
        if not isinstance(example, torch.Tensor):
            raise TypeError(f"example must be a torch.Tensor (an input of the shape, dtype and device to capture "
                            f"for); got {type(example).__name__}")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            # At least one: first calls compile/autotune kernels and fill the fold cache,
            # none of which may happen during capture.
            raise ValueError(f"warmup must be an int >= 1; got {warmup!r}")
        for flag_name, flag in (("copy_output", copy_output), ("check_weights", check_weights)):
            if not isinstance(flag, bool):
                raise TypeError(f"{flag_name} must be a bool; got {type(flag).__name__}")
        _check_device(model, example)

        self.model = model
        self.example_shape = example.shape
        self.example_dtype = example.dtype
        self.device = example.device
        self.memory_format = _memory_format_name(example)
        self.warmup = warmup
        self.copy_output = copy_output
        self.check_weights = check_weights
        self.captures = 0

        with torch.cuda.device(self.device):
            # Allocated outside the graph's pool, with the example's strides (clone keeps them).
            self._static_input = example.detach().clone()
            # Warm-up and capture share one side stream: per-stream lazy state (cuBLAS
            # workspaces, cuDNN handles) is then created in the warm-up, not in the capture.
            self._stream = torch.cuda.Stream(device=self.device)
            self._last_stream = torch.cuda.current_stream(self.device)
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._static_output: Optional[torch.Tensor] = None
        self._kept_alive: tuple = ()
        self._fingerprint: Optional[tuple] = None
        self._capture()

    # ------------------------------------------------------------------ capture

    def recapture(self) -> None:
        """Fold the model's BatchNorms again and capture a new graph (after `.data` edits, new
        hooks, or anything else the per-call check cannot see)."""
        # The fold cache cannot see `.data` edits either: make its entries stale so the
        # warm-up re-folds from the current weights (cheap: entries rebuild lazily).
        folding.invalidate_all()
        self._capture()

    def _capture(self) -> None:
        _check_model(self.model)
        _check_device(self.model, self._static_input)
        # Drop the previous graph first so its private pool can be released before the new
        # one allocates (a static output the caller still holds keeps its own block alive).
        self._graph = self._static_output = self._fingerprint = None
        self._kept_alive = ()
        x = self._static_input
        # no_grad, not inference_mode: the fold cache keys on version counters, which
        # inference tensors lack (a caller inside inference_mode is switched out of it).
        with torch.cuda.device(self.device), torch.inference_mode(False), torch.no_grad():
            caller = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(caller)  # the warm-up reads the static input written on the caller's stream
            with torch.cuda.stream(self._stream):
                # Lazy work happens here, outside the capture: Triton compilation, cuDNN and
                # cuBLAS setup, and the fold cache filling (the folded weights are then
                # ordinary allocations that the graph only reads).
                for _ in range(self.warmup):
                    out = self.model(x)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"fastres.cudagraph supports models that return one tensor; the model "
                                    f"returned {type(out).__name__}")
                del out
            caller.wait_stream(self._stream)

            graph = torch.cuda.CUDAGraph()
            # pool=None: a fresh private pool for this capture, never shared with an earlier
            # graph, whose static output the caller may still hold (copy_output=False).
            with torch.cuda.graph(graph, stream=self._stream):
                static_output = self.model(x)
        tensors, modes = _tensors_and_modes(self.model)
        # The graph reads these by address: keep them alive while it exists, so freed memory
        # can never be replayed even when a change goes unnoticed (check_weights=False). The
        # fold-cache entries hold the folded weights; an eager forward after a change
        # replaces them in the cache, and without this reference they would be freed.
        entries = [folding._cache.get(m) for m in self.model.modules()]
        self._kept_alive = (tensors, [e for e in entries if e is not None])
        self._fingerprint = _fingerprint(tensors, modes)
        self._graph, self._static_output = graph, static_output
        self._last_stream = torch.cuda.current_stream(self.device)
        self.captures += 1

    # ------------------------------------------------------------------ call

    def _check_input(self, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor; got {type(x).__name__}")
        if x.shape != self.example_shape or x.dtype != self.example_dtype or x.device != self.device:
            raise ValueError(
                f"input has shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}; this graph was captured "
                f"for shape {tuple(self.example_shape)}, dtype {self.example_dtype}, device {self.device}. "
                f"A different shape (batch size included) needs its own graph: fastres.cudagraph(model, x)")
        return x

    def _stale(self) -> bool:
        if self._graph is None:
            return True  # the last capture failed (its error was raised): try again
        if self.check_weights:
            return _fingerprint(*_tensors_and_modes(self.model)) != self._fingerprint
        # Without the weight check, still the two cheap things that change what runs.
        return self.model.training or get_backend() != self._fingerprint[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        with torch.cuda.device(self.device), torch.no_grad():
            if self._stale():
                self._capture()
            stream = torch.cuda.current_stream(self.device)
            if stream != self._last_stream:
                # The previous call's replay may still be reading the static input.
                stream.wait_stream(self._last_stream)
                self._last_stream = stream
            self._static_input.copy_(x)
            self._graph.replay()
            return self._static_output.clone() if self.copy_output else self._static_output

    def __repr__(self) -> str:
        return (f"GraphedInference({type(self.model).__name__}, input {tuple(self.example_shape)} "
                f"{self.example_dtype} {self.memory_format} on {self.device}, captures={self.captures}, "
                f"copy_output={self.copy_output}, check_weights={self.check_weights})")


def cudagraph(model: nn.Module, example: torch.Tensor, *, warmup: int = 3, copy_output: bool = True,
              check_weights: bool = True) -> GraphedInference:
    """Capture `model(example)` (eval mode, no autograd) as a CUDA graph; returns a callable
    `GraphedInference` that computes `model(x)` by replaying it, for inputs of exactly
    `example`'s shape, dtype and device.

        model = fastres.resnet50(weights="DEFAULT").cuda().eval()
        x = torch.randn(1, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
        graphed = fastres.cudagraph(model, x)
        logits = graphed(x)          # == model(x), one graph launch

    `warmup` eager forwards run first on a side stream (kernel compilation, autotuning and the
    BN-fold cache must not happen inside the capture). `copy_output=False` returns the static
    output tensor, overwritten by the next call. `check_weights=True` re-captures when the
    model's weights change (see `GraphedInference`).

    Raises TypeError if model is not an nn.Module or example not a tensor, ValueError if the
    model (or a submodule) is in training mode, example is not on a CUDA device, or a
    parameter or buffer is on another device than example.
    """
    return GraphedInference(model, example, warmup=warmup, copy_output=copy_output, check_weights=check_weights)
