"""The one dispatch of the fused ops: implementations, what each covers, and which one runs.

Every op (`conv2d_act`, `bottleneck_tail`, `batch_norm_act`, `add_relu`, `norm_conv`) has a list of
implementations (registered in `implementations.py`). Each implementation names the explicit
backend it belongs to, a `covers(call)` predicate that returns None or the reason it cannot run
the call, a `run(call, config)` and, optionally, the configurations auto may time (Triton tiles).

- backend "torch": the reference.
- backend "triton" / "cpp": the covering implementation of that backend with the lowest rank, in
  its default configuration; anything not covered runs the reference.
- backend "auto": the tuner (`tuner.py`) times every covering (implementation, configuration) on
  the real call once per call signature, checks each against the reference and keeps the fastest;
  where it cannot measure (graph capture, tracing, fake tensors, FASTRES_AUTOTUNE=0) it uses the
  cached choice, else the covering implementation with the lowest static rank.

A forward context (`forward_context`) carries what a whole-model forward knows and a single op
does not (its input was checked finite; nobody else can see its activations), so the model layer
talks to no backend directly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakTensorKeyDictionary

from .backend import get_backend, use_backend

OPS = ("conv2d_act", "bottleneck_tail", "batch_norm_act", "add_relu", "norm_conv")
# The checked arguments of each op, in the reference's positional order (reference.py).
ARGUMENTS = {
    "conv2d_act": ("x", "weight", "bias", "stride", "padding", "dilation", "groups", "residual", "relu"),
    "bottleneck_tail": ("h", "w3", "x", "wd", "bias", "stride", "relu"),
    "batch_norm_act": ("x", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                       "residual", "relu", "mean", "invstd"),
    "add_relu": ("x", "residual"),
    "norm_conv": ("x", "weight", "scale", "shift", "relu", "stride", "padding", "dilation", "groups",
                  "running_mean", "running_var", "momentum", "eps"),
}
# Arguments an implementation updates in place (the tuner gives each trial run its own copies).
MUTATED = {"batch_norm_act": ("running_mean", "running_var"), "norm_conv": ("running_mean", "running_var")}


class Call:
    """One op call's checked arguments, by name (`call.x`, `call.stride`, ...)."""

    __slots__ = ("op", "args")

    def __init__(self, op: str, args: Dict[str, object]):
        self.op = op
        self.args = args

    def __getattr__(self, name: str):
        if name.startswith("__") or name in Call.__slots__:
            raise AttributeError(name)
        try:
            return self.args[name]
        except KeyError:
            raise AttributeError(name) from None

    def positional(self) -> list:
        return [self.args[name] for name in ARGUMENTS[self.op]]

    def replace(self, **changes) -> "Call":
        return Call(self.op, {**self.args, **changes})

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in self.args.items() if isinstance(v, torch.Tensor)}

    @property
    def lead(self) -> torch.Tensor:
        """The activation that decides device and dtype (x, or h for the bottleneck tail)."""
        return self.args["h"] if self.op == "bottleneck_tail" else self.args["x"]


Covers = Callable[[Call], Optional[str]]


@dataclasses.dataclass(frozen=True)
class Implementation:
    op: str
    name: str  # unique per op: "reference", "onednn", "winograd4", "cudnn_fused", "triton", ...
    backend: str  # the explicit backend that runs it: "torch", "triton", "cpp"; "onednn" (auto only)
    covers: Covers
    run: Callable[[Call, str], torch.Tensor]
    configs: Optional[Callable[[Call], Sequence[str]]] = None  # tunable; "" is the default configuration
    rank: Union[int, Callable[[Call], int]] = 100  # static choice order (lower first); reference is 100
    in_auto: Optional[Covers] = None  # auto's extra condition (None: whatever covers() covers)

    def rank_for(self, call: Call) -> int:
        return self.rank(call) if callable(self.rank) else self.rank

    def configs_for(self, call: Call) -> List[str]:
        return list(self.configs(call)) if self.configs is not None else [""]


_IMPLS: Dict[str, List[Implementation]] = {op: [] for op in OPS}


def register(op: str, name: str, *, backend: str, covers: Covers, run, configs=None, rank=100,
             in_auto: Optional[Covers] = None) -> Implementation:
    """Add (or replace, by name) one implementation of `op`."""
    if op not in _IMPLS:
        raise ValueError(f"op must be one of {list(OPS)}; got {op!r}")
    impl = Implementation(op, name, backend, covers, run, configs, rank, in_auto)
    _IMPLS[op] = [i for i in _IMPLS[op] if i.name != name] + [impl]
    forget_selections()
    return impl


def unregister(op: str, name: str) -> None:
    """Remove one implementation (tests, plug-ins)."""
    _IMPLS[op] = [i for i in _IMPLS[op] if i.name != name]
    forget_selections()


def implementations(op: str) -> List[Implementation]:
    """Every registered implementation of `op` (the reference first)."""
    if op not in _IMPLS:
        raise ValueError(f"op must be one of {list(OPS)}; got {op!r}")
    return sorted(_IMPLS[op], key=lambda i: (i.name != "reference", i.name))


def implementation(op: str, name: str) -> Implementation:
    for impl in _IMPLS.get(op, ()):
        if impl.name == name:
            return impl
    raise ValueError(f"{op} has no implementation {name!r}; it has {[i.name for i in implementations(op)]}")


def coverage(call: Call) -> Dict[str, Optional[str]]:
    """name -> None (covers the call) or why not, for every implementation of call.op."""
    out = {}
    for impl in implementations(call.op):
        try:
            out[impl.name] = impl.covers(call)
        except Exception as error:  # a broken predicate must not break the op
            out[impl.name] = f"covers() raised {type(error).__name__}: {error}"
    return out


def reference(op: str) -> Implementation:
    return implementation(op, "reference")


def static_choice(call: Call, candidates: Sequence[Implementation]) -> Implementation:
    """The lowest (rank, name). A plain loop: torch 2.11's dynamo cannot trace min(key=lambda)."""
    best, best_key = None, None
    for impl in candidates:
        key = (impl.rank_for(call), impl.name)
        if best is None or key < best_key:
            best, best_key = impl, key
    return best


def select(call: Call) -> Tuple[Implementation, str]:
    """The (implementation, configuration) that runs `call` on the current backend: the reference on
    "torch" or where nothing else covers the call, the static choice of a named backend, the tuner's
    measured choice on "auto" (measured on the first call of a signature, remembered after)."""
    op = call.op
    backend = get_backend()
    if backend == "torch":
        return reference(op), ""
    if backend != "auto":
        covering = [impl for impl in _IMPLS[op] if impl.backend == backend and _covered(impl, call)]
        return (static_choice(call, covering), "") if covering else (reference(op), "")
    from . import tuner  # imported late: it needs the registry filled

    signature = None
    key = None if torch.compiler.is_compiling() else _selection_key(call)
    if key is not None:
        remembered = _selections.get(key)
        if remembered is not None:
            return remembered
        signature = tuner.signature(call)
    covering = [impl for impl in _IMPLS[op] if impl.name != "reference" and _covered(impl, call, auto=True)]
    chosen = tuner.choose(call, [reference(op)] + covering, signature) if covering else (reference(op), "")
    if key is not None and (not covering or tuner.remembers(signature)):
        _selections[key] = chosen
    return chosen


# auto's selections, remembered per call key: once the tuner remembers a signature's choice (measured,
# or from the disk cache), a call with the same key selects the same thing, skipping every
# implementation's covers() and the signature itself. The key holds everything the signature is made
# of (finer: strides rather than the layout's name) and the state a covers() may read beyond it, as
# plain values: a dict lookup, where formatting the signature string took ~15-25 us a call on the 2-core
# CPU (host time that a launch-bound GPU forward pays per op). Anything that changes the table
# (register, unregister) or the tuner's memory (tuner.reset) forgets them all. Fake tensors, tensor
# subclasses and tracing never use or fill it.
_selections: Dict[tuple, Tuple["Implementation", str]] = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _selection_key(call: Call) -> Optional[tuple]:
    """The call's key in _selections, or None where selections are not remembered (fake, meta or
    subclassed tensors)."""
    key = [call.op]
    for value in call.args.values():
        if isinstance(value, torch.Tensor):
            if type(value) not in _PLAIN or value.device.type == "meta":
                return None
            key.append((value.dtype, value.shape, value.stride(), value.device, value.requires_grad,
                        value.is_inference()))
        else:
            key.append(tuple(value) if isinstance(value, list) else value)
    device = call.lead.device.type
    autocast = torch.is_autocast_enabled(device)
    key += (current_context(), torch.is_grad_enabled(), autocast, autocast and torch.get_autocast_dtype(device),
            torch.get_num_threads(), torch.backends.cudnn.enabled, torch.backends.cudnn.allow_tf32,
            torch.are_deterministic_algorithms_enabled(),
            device == "cuda" and torch.cuda.is_current_stream_capturing(),
            os.environ.get("FASTRES_CUDNN_GRAPHS"), os.environ.get("FASTRES_WINOGRAD"))
    return tuple(key)


def forget_selections() -> None:
    _selections.clear()


def dispatch(op: str, args: Dict[str, object]) -> torch.Tensor:
    """Run op on the current backend (see the module docstring)."""
    call = Call(op, args)
    impl, config = select(call)
    return impl.run(call, config)


def fast_path_covers(op: str, args: Dict[str, object]) -> bool:
    """Whether the current backend runs `op` on something other than the reference for these
    arguments: a named backend where one of its implementations covers them, "auto" where its measured
    choice (forward + backward for a training call) is not the reference. A model takes a fused chain,
    e.g. NormConv, only there; elsewhere its unfused path, which the reference's cost stands for."""
    return select(Call(op, args))[0].name != "reference"


def _covered(impl: Implementation, call: Call, auto: bool = False) -> bool:
    try:
        return impl.covers(call) is None and not (auto and impl.in_auto is not None and impl.in_auto(call))
    except Exception:
        return False


# ------------------------------------------------------------------ the forward context

_context = threading.local()


@dataclasses.dataclass(frozen=True)
class ForwardContext:
    input_finite: bool = False  # the model checked its input finite (weights are checked where packed)
    private_activations: bool = False  # no one but this forward can see the blocks' activations


NO_CONTEXT = ForwardContext()


def current_context() -> ForwardContext:
    return getattr(_context, "value", NO_CONTEXT)


_context_hooks: List[Callable[[ForwardContext], contextlib.AbstractContextManager]] = []


def selection_state() -> tuple:
    """What this thread's selections depend on besides the call itself: (backend, forward context)."""
    return get_backend(), current_context()


@contextlib.contextmanager
def replaying(state: tuple) -> Iterator[None]:
    """Select as under `state` (a selection_state()): a recomputed segment reruns in the backward, which
    may run outside the `use_backend` and forward context its forward ran in, and must take the same
    implementations or its saved tensors differ. The context hooks are not re-entered: a rerun is not a
    new forward."""
    backend, context = state
    saved = current_context()
    _context.value = context
    try:
        with use_backend(backend):
            yield
    finally:
        _context.value = saved


def on_forward_context(hook: Callable[[ForwardContext], contextlib.AbstractContextManager]) -> None:
    """A backend that keeps per-forward state (the CPU path's in-place reuse) enters hook(context)
    for the duration of every forward context."""
    _context_hooks.append(hook)


@contextlib.contextmanager
def forward_context(*, input_finite: bool = False, private_activations: bool = False) -> Iterator[ForwardContext]:
    """What a whole-network forward knows about its activations, for the backends (this thread)."""
    value = ForwardContext(input_finite, private_activations)
    saved = current_context()
    _context.value = value
    try:
        with contextlib.ExitStack() as stack:
            for hook in _context_hooks:
                stack.enter_context(hook(value))
            yield value
    finally:
        _context.value = saved


def preferred_memory_format(x: torch.Tensor, training: bool) -> Optional[torch.memory_format]:
    """The activation layout a network forward should convert its input to, or None to keep it:
    channels_last where the CPU fast path would run (float32 CPU inference on backend auto)."""
    from . import onednn

    if (not training and isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype == torch.float32 and onednn.AVAILABLE and get_backend() == "auto"):
        return torch.channels_last
    return None


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a convolution in, or None. Like torch, float64 is never cast.
    (Custom ops are not autocast by torch: the implementations that are custom ops cast themselves.)"""
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


def cast(dtype: Optional[torch.dtype], *tensors):
    return [t if t is None or dtype is None or t.dtype == dtype else t.to(dtype) for t in tensors]


_casts = WeakTensorKeyDictionary()  # parameter -> ((version, dtype), its cast), while the parameter lives


def cast_parameters(dtype: Optional[torch.dtype], *tensors):
    """cast() for weights and biases: one that records no gradient is cast once per (version, dtype) and
    the copy kept while it lives -- under autocast a folded or frozen float32 weight was otherwise cast
    on every call, a kernel launch and a copy each time (and for the Triton conv a repack). A fresh cast,
    as cast(), where the cast must be in the autograd graph, for an inference tensor (no version counter
    to key on), under tracing or fake tensors, and for a first cast during CUDA-graph capture."""
    out = []
    for t in tensors:
        if t is None or dtype is None or t.dtype == dtype:
            out.append(t)
            continue
        if (torch.is_grad_enabled() and t.requires_grad) or t.is_inference() or torch.compiler.is_compiling() \
                or isinstance(t, FakeTensor) or t.device.type == "meta":
            out.append(t.to(dtype))
            continue
        key = (t._version, dtype)
        hit = _casts.get(t)
        if hit is None or hit[0] != key:
            with torch.inference_mode(False):  # kept across modes: a normal tensor, never an inference one
                cast_t = t.detach().to(dtype)
            if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                out.append(cast_t)
                continue
            hit = _casts[t] = (key, cast_t)
        out.append(hit[1])
    return out
