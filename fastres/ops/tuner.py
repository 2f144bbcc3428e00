"""`auto`'s measured choice: per call signature, time every covering implementation (and each of
its configurations) on the real call, check it against the reference, keep the fastest.

- When: the first call of a signature that is not under CUDA-graph capture, torch.compile /
  export tracing, TorchScript tracing, or on fake/meta tensors, with FASTRES_AUTOTUNE not "0".
  Elsewhere the choice comes from this process's memory, then the disk cache, then the static
  rank (`dispatch.static_choice`).
- How: each candidate runs once (warm-up, Triton compile) and is checked against the reference
  computed in float64 on copies of the inputs (relative Frobenius error, `TOLERANCE` per dtype;
  NaN where the reference has NaN and only there), a training call's on its gradients too (fixed
  random cotangents, `gradients`); a mismatch or an exception disqualifies it,
  with one warning naming it. Then it is timed (`timer`): on a GPU CUDA events between calls issued back
  to back (`pipelined_ms`: host work overlaps queued GPU work, as in a model), the host clock on the
  CPU; the median of up to `REPEATS` runs within `BUDGET_MS` per candidate. A call that records
  autograd (training) is timed forward + backward (`_forward_backward`): the implementations' backward
  kernels differ, and the backward is most of a training step. The static
  choice is kept unless another candidate is faster by more than `SWITCH_MARGIN` of its time (10%
  on the CPU, where a layer timed alone varies by several percent between runs and differs from its
  cost inside the model; 2% on CUDA, whose event timings are tighter). Without that margin,
  ResNet-50 at batch 8 on the 2-core machine picked the torch reference by 1-3% wins on a dozen
  layers and ran ~10% slower than its static choices (benchmarks/results/cpu-resnet50-bs8.md).
- No side effects: the trial runs get their own copies of what an op updates in place (training
  BN's running statistics), run without autograd and outside the forward context's in-place
  output reuse; afterwards the winner runs the real call.
- The disk cache: one JSON file per machine identity (device name and capability or CPU
  capability, torch / cuDNN / triton / fastres versions) under FASTRES_CACHE_DIR (default
  ~/.cache/fastres). Writes are atomic (write a temporary file, then rename, under a lock file);
  an unreadable or unwritable cache is ignored with one warning that names it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..layout import is_channels_last
from . import dispatch
from .dispatch import Call, Implementation

REPEATS = 7
BUDGET_MS = 200.0  # timing budget per candidate (after its warm-up run)
SWITCH_MARGIN = {"cpu": 0.10, "cuda": 0.02}  # how much faster than the static choice a winner must be
RULES = 5  # part of the disk cache's machine identity: choices made under other rules are not reused
# (5: NormConv training candidates include backward tiles, "forward|backward")
# Relative Frobenius error against the float64 reference that a candidate may have, by the dtype it
# computes in. fp32 allows TF32 where torch's switch allows it on CUDA (and Winograd F(4x4)'s ~5e-6).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
TF32_TOLERANCE = 2e-3

_lock = threading.RLock()
_memory: Dict[str, dict] = {}  # signature -> entry (this process)
_warned: set = set()


def autotune_enabled() -> bool:
    return os.environ.get("FASTRES_AUTOTUNE", "1") != "0"


# ------------------------------------------------------------------ signatures

def _layout(t: torch.Tensor) -> str:
    if is_channels_last(t):
        return "cl"
    if t.is_contiguous():
        return "c"
    return "s" + "x".join(map(str, t.stride()))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{_cuda_name(device.index if device.index is not None else torch.cuda.current_device())}"
    return device.type


_cuda_names: Dict[int, str] = {}


def _cuda_name(index: int) -> str:
    name = _cuda_names.get(index)
    if name is None:
        name = _cuda_names[index] = torch.cuda.get_device_name(index)
    return name


def _constant_at_trace_time(fn):
    """torch.compile runs fn while tracing and keeps its (constant) result, instead of tracing into it."""
    try:
        return torch._dynamo.assume_constant_result(fn)
    except AttributeError:  # pragma: no cover
        return fn


@_constant_at_trace_time
def _threads() -> int:
    return torch.get_num_threads()


def needs_grad(call: Call) -> bool:
    """Whether the call records autograd (a training call: its backward runs too)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in call.tensors().values())


def signature(call: Call) -> str:
    """A readable key of everything a choice may depend on."""
    lead = call.lead
    parts = [call.op, _device_name(lead.device)]
    if lead.device.type == "cpu":
        parts.append(f"threads={_threads()}")
    parts.append("grad" if needs_grad(call) else "nograd")
    autocast = dispatch.autocast_dtype(lead)
    if autocast is not None:
        parts.append(f"autocast={str(autocast).replace('torch.', '')}")
    for name, value in call.args.items():
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}={str(value.dtype).replace('torch.', '')}[{'x'.join(map(str, value.shape))}]"
                         f"{_layout(value)}")
        elif value is None:
            parts.append(f"{name}=-")
        elif isinstance(value, (tuple, list)):
            parts.append(f"{name}={'x'.join(map(str, value))}")
        else:
            parts.append(f"{name}={value}")
    return " ".join(parts)


# ------------------------------------------------------------------ when measuring is possible

def _is_fake(t: torch.Tensor) -> bool:
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, (FakeTensor, FunctionalTensor)) or type(t) is not torch.Tensor and \
        not isinstance(t, torch.nn.Parameter)


def can_measure(call: Call) -> Optional[str]:
    """None, or why this call must not be timed."""
    if not autotune_enabled():
        return "FASTRES_AUTOTUNE=0"
    if torch.compiler.is_compiling():
        return "tracing (torch.compile/export)"
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return "TorchScript"
    if any(_is_fake(t) for t in call.tensors().values()):
        return "fake or meta tensors"
    lead = call.lead
    if lead.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "CUDA-graph capture"
    if lead.numel() == 0:
        return "empty input"
    return None


# ------------------------------------------------------------------ timing and checking

def _default_timer(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of fn() (already warmed up)."""
    if device.type == "cuda":
        return pipelined_ms(fn, lambda: torch.cuda.Event(enable_timing=True))
    times: List[float] = []
    spent = 0.0
    while len(times) < REPEATS and (len(times) < 3 or spent < BUDGET_MS):
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms
    times.sort()
    return times[len(times) // 2]


def pipelined_ms(fn: Callable[[], object], event: Callable[[], object]) -> float:
    """Median milliseconds per fn() on a GPU, the calls issued back to back with an event between each two
    and one synchronisation at the end, as a model issues its layers: a call's host work (argument
    checks, casts, the launches) overlaps the GPU work queued before it, so a GPU-bound call is timed by
    its GPU time and a launch-bound one by its host time. Timing each call from an idle GPU counted the
    host work in full even where the model hides it. One call timed alone first sizes the run: up to
    REPEATS calls within BUDGET_MS, at least three."""
    start, end = event(), event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    alone = max(start.elapsed_time(end), 1e-3)
    n = max(3, min(REPEATS, int(BUDGET_MS / alone)))
    marks = [event() for _ in range(n + 1)]
    marks[0].record()
    for i in range(n):
        fn()
        marks[i + 1].record()
    marks[-1].synchronize()
    times = sorted(marks[i].elapsed_time(marks[i + 1]) for i in range(n))
    return times[len(times) // 2]


timer: Callable[[Callable[[], object], torch.device], float] = _default_timer


@contextlib.contextmanager
def use_timer(fn):
    """Replace the timer (tests): fn(run, device) -> milliseconds."""
    global timer
    saved, timer = timer, fn
    try:
        yield
    finally:
        timer = saved


def tolerance(call: Call) -> float:
    lead = call.lead
    dtype = dispatch.autocast_dtype(lead) or lead.dtype
    if call.op in ("conv2d_act", "bottleneck_tail", "norm_conv"):
        weight = call.w3 if call.op == "bottleneck_tail" else call.weight
        if weight.dtype in (torch.float16, torch.bfloat16):
            dtype = weight.dtype
        if dtype == torch.float32 and lead.device.type == "cuda" and torch.backends.cudnn.allow_tf32:
            return TF32_TOLERANCE
    return TOLERANCE.get(dtype, 1e-2)


def _copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _trial_call(call: Call) -> Call:
    mutated = dispatch.MUTATED.get(call.op, ())
    return call.replace(**{name: _copy(call.args[name]) for name in mutated if call.args.get(name) is not None})


def _float64_call(call: Call) -> Call:
    return call.replace(**{name: value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else value
                           for name, value in call.args.items()})


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the finite reference values; inf if the non-finite pattern differs."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        return math.inf
    finite = torch.isfinite(ref)
    if not bool(torch.equal(torch.isnan(out), torch.isnan(ref))) or \
            not bool(torch.equal(out[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)])):
        return math.inf
    diff = torch.linalg.vector_norm((out - ref)[finite])
    scale = torch.linalg.vector_norm(ref[finite])
    return float(diff / scale) if float(scale) > 0 else float(diff)


def _forward_backward(impl: Implementation, call: Call, config: str) -> Callable[[], None]:
    """One training use of `call` on `impl`: forward, then backward from fixed cotangents (ones) of
    every differentiable output, into private leaf copies of the tensors that require grad -- what
    a training step pays for the op. The implementations' backward kernels differ (Triton's or
    cuDNN's fused wgrad/dgrad, torch's), so a forward-only timing would choose blind."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in call.tensors().items() if t.requires_grad}
    base = call.replace(**leaves)
    cotangents: List[torch.Tensor] = []

    def run() -> None:
        with torch.enable_grad():
            out = impl.run(_trial_call(base), config)
            outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            if not cotangents:
                cotangents.extend(torch.ones_like(o) for o in outs)
            if outs:
                torch.autograd.backward(outs, cotangents)
        for leaf in leaves.values():
            leaf.grad = None
    return run


def gradients(run: Callable[[Call], object], call: Call, names: Sequence[str]) -> List[Optional[torch.Tensor]]:
    """The gradients of `call`'s tensors `names` (private leaf copies; running buffers copied too) after
    run(call) and a backward from fixed random cotangents (seeded, drawn in float64) of every output that
    requires grad: what a training step's backward computes, comparable across implementations and with
    the float64 reference (whose call may carry no requires_grad flags: `names` says which)."""
    leaves = {name: call.args[name].detach().clone().requires_grad_() for name in names}
    with torch.enable_grad():
        out = run(_trial_call(call.replace(**leaves)))
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs:
            generator = torch.Generator(device=outs[0].device).manual_seed(0)
            cotangents = [torch.randn(o.shape, generator=generator, device=o.device, dtype=torch.float64).to(o.dtype)
                          for o in outs]
            torch.autograd.backward(outs, cotangents)
    return [leaves[name].grad for name in names]


def _gradients_error(got: List[Optional[torch.Tensor]], expected: List[Optional[torch.Tensor]]) -> float:
    """The worst relative_error over the gradients (a missing one counts as zeros)."""
    worst = 0.0
    for a, b in zip(got, expected):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        worst = max(worst, relative_error(a, b))
    return worst


def _outputs_error(out, expected) -> float:
    """relative_error of an op's output, or the worst over its outputs (norm_conv: y, mean, invstd)."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(expected):
            return math.inf
        return max(relative_error(o, e) for o, e in zip(out, expected))
    return relative_error(out, expected)


def _buffers_error(trial: Call, ref_call: Call) -> float:
    worst = 0.0
    for name in dispatch.MUTATED.get(trial.op, ()):
        a, b = trial.args.get(name), ref_call.args.get(name)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            worst = max(worst, relative_error(a, b))
    return worst


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


@contextlib.contextmanager
def _isolated():
    """Trial runs: no autograd, no in-place reuse of the forward's activations."""
    context = dispatch.current_context()
    with torch.no_grad(), dispatch.forward_context(input_finite=context.input_finite, private_activations=False):
        yield


def _residual_overwritten(call: Call) -> bool:
    """Whether the real call may write its output over its residual (the CPU path's in-place
    residual add, onednn.reusable_activations): its trials must then time that form too."""
    from . import onednn

    residual = call.args.get("residual") if call.op == "conv2d_act" else None
    return isinstance(residual, torch.Tensor) and onednn.residual_reusable(residual, call.x)


def _with_private_residual(call: Call) -> Call:
    """call on a copy of its residual that the trial may overwrite (never the caller's tensor)."""
    from . import onednn

    return call.replace(residual=onednn.reusable_copy(call.residual))


def measure(call: Call, candidates: Sequence[Implementation]) -> Tuple[Optional[Tuple[str, str]], Dict[str, object]]:
    """Time and check every (implementation, configuration); returns ((name, config) of the fastest --
    the static choice where nothing beats it by SWITCH_MARGIN --, candidates report: "name[config]" ->
    milliseconds or the reason it was rejected)."""
    report: Dict[str, object] = {}
    device = call.lead.device
    in_place = _residual_overwritten(call)  # asked before _isolated() turns the reuse off
    grad = needs_grad(call)  # asked before _isolated() turns autograd off
    from . import onednn

    with _isolated(), onednn.reusable_activations(True) if in_place else contextlib.nullcontext():
        ref_call = _trial_call(_float64_call(call))
        expected = dispatch.reference(call.op).run(ref_call, "")
        tol = tolerance(call)
        # A training call's candidates are checked on their gradients too: a wrong backward would train
        # silently wrong, and the implementations' backward kernels are their own.
        names = [name for name, t in call.tensors().items() if t.requires_grad] if grad else []
        expected_grads = gradients(lambda c: dispatch.reference(call.op).run(c, ""), _float64_call(call), names) \
            if names else None
        best, best_ms = None, math.inf
        static = dispatch.static_choice(call, candidates)
        static_best, static_ms = None, math.inf  # the static implementation's fastest configuration
        for impl in candidates:
            for config in impl.configs_for(call):
                label = impl.name if not config else f"{impl.name}[{config}]"
                try:
                    trial = _trial_call(call)
                    if in_place:
                        trial = _with_private_residual(trial)
                    out = impl.run(trial, config)
                    err = max(_outputs_error(out, expected), _buffers_error(trial, ref_call))
                    if not err <= tol:
                        report[label] = f"rejected: error {err:.3g} > tolerance {tol:.3g}"
                        _warn_once(f"fastres auto: {call.op} implementation {label!r} disagrees with the reference "
                                   f"(relative error {err:.3g} > {tol:.3g}); it is not used for {signature(call)}")
                        continue
                    del out
                    if expected_grads is not None:
                        err = _gradients_error(gradients(lambda c, impl=impl, config=config: impl.run(c, config),
                                                         call, names), expected_grads)
                        if not err <= tol:
                            report[label] = f"rejected: gradient error {err:.3g} > tolerance {tol:.3g}"
                            _warn_once(f"fastres auto: {call.op} implementation {label!r} computes gradients that "
                                       f"disagree with the reference (relative error {err:.3g} > {tol:.3g}); it is "
                                       f"not used for {signature(call)}")
                            continue
                    # In place: every timed run overwrites one private copy (the values change, the
                    # work does not), made outside the timed region.
                    timed = _with_private_residual(call) if in_place else call
                    if grad:  # a training call costs its forward and its backward: time both (the
                        # gradient check above has run them once: the backward's kernels are compiled)
                        run = _forward_backward(impl, timed, config)
                    else:
                        def run(impl=impl, timed=timed, config=config):
                            return impl.run(_trial_call(timed), config)
                    ms = timer(run, device)
                except Exception as error:  # a broken kernel is rejected, never used
                    report[label] = f"rejected: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    _warn_once(f"fastres auto: {call.op} implementation {label!r} failed ({report[label]}); "
                               f"it is not used for this signature")
                    continue
                report[label] = round(float(ms), 4)
                if ms < best_ms:
                    best, best_ms = (impl.name, config), ms
                if impl.name == static.name and ms < static_ms:
                    static_best, static_ms = (impl.name, config), ms
    if static_best is not None and best_ms > static_ms * (1.0 - SWITCH_MARGIN.get(device.type, 0.02)):
        best = static_best
    return best, report


# ------------------------------------------------------------------ the choice

def choose(call: Call, candidates: Sequence[Implementation], key: Optional[str] = None) -> Tuple[Implementation, str]:
    """The (implementation, configuration) that runs `call` on backend auto (`key`: its signature, where
    the caller has it)."""
    if len(candidates) == 1 and len(candidates[0].configs_for(call)) == 1:
        return candidates[0], ""
    key = signature(call) if key is None else key
    by_name = {impl.name: impl for impl in candidates}
    if torch.compiler.is_compiling():
        # torch.compile traces this code once: the traced graph holds the remembered or cached choice
        # of the same signature (an eager call measured it), else the static one.
        name, config = _traced_choice(call.op, key, tuple(by_name), dispatch.static_choice(call, candidates).name)
        return by_name[name], config
    with _lock:
        entry = _memory.get(key)
    if entry is not None and entry["choice"] in by_name:
        return by_name[entry["choice"]], entry["config"]
    why_not = can_measure(call)
    cached = disk_cache().get(key)
    if cached is not None and cached.get("choice") in by_name:
        entry = dict(cached, source="cache")
    elif why_not is None:
        choice, report = measure(call, candidates)
        if choice is None:  # everything failed, even the reference's twin: keep the reference
            choice = ("reference", "")
        entry = {"choice": choice[0], "config": choice[1], "candidates": report, "source": "measured"}
        disk_cache().put(key, {k: entry[k] for k in ("choice", "config", "candidates")})
    else:
        # Static choices are not remembered: they are cheap, and a later eager call may measure.
        impl = dispatch.static_choice(call, candidates)
        report = {i.name: f"not measured: {why_not}" for i in candidates}
        _record(key, call, {"choice": impl.name, "config": "", "candidates": report, "source": "default"},
                remember=False)
        return impl, ""
    _record(key, call, entry)
    return by_name[entry["choice"]], entry.get("config", "")


@_constant_at_trace_time
def _traced_choice(op: str, key: str, names: tuple, static: str) -> tuple:
    with _lock:
        entry = _memory.get(key)
    source = "measured" if entry is not None else "cache"
    if entry is None or entry["choice"] not in names:
        entry = disk_cache().get(key)
    if entry is not None and entry.get("choice") in names:
        choice, config = entry["choice"], entry.get("config", "")
    else:
        choice, config, source = static, "", "default"
    candidates = {n: "not measured: tracing (torch.compile/export)" for n in names}
    with _lock:
        _report[key] = {"op": op, "signature": key, "choice": choice, "config": config, "source": source,
                        "candidates": candidates}
    return choice, config


def _record(key: str, call: Call, entry: dict, remember: bool = True) -> None:
    full = {"op": call.op, "signature": key, "choice": entry["choice"], "config": entry.get("config", ""),
            "source": entry["source"], "candidates": dict(entry.get("candidates", {}))}
    with _lock:
        if remember:
            _memory[key] = full
        _report[key] = full


_report: Dict[str, dict] = {}


def tuning_report() -> List[dict]:
    """One dict per signature seen in this process: op, signature, choice (implementation name),
    config, source ("measured", "cache" or "default") and candidates (name -> median ms, or why not)."""
    with _lock:
        return [dict(v, candidates=dict(v["candidates"])) for v in _report.values()]


def remembers(key: str) -> bool:
    """Whether this process remembers a choice for the signature `key` (measured or from the disk cache;
    static choices are not remembered, so a later eager call may still measure)."""
    with _lock:
        return key in _memory


def reset(memory: bool = True) -> None:
    """Forget this process's choices (tests; the disk cache stays)."""
    global _disk
    with _lock:
        if memory:
            _memory.clear()
            _report.clear()
        _disk = None
        _warned.clear()
    dispatch.forget_selections()


# ------------------------------------------------------------------ the disk cache

def cache_dir() -> str:
    return os.environ.get("FASTRES_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastres")


def machine_identity(device: Optional[torch.device] = None) -> str:
    """Device name and capability (or CPU capability) and the versions choices depend on."""
    from .. import __version__

    parts = []
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        parts += [_cuda_name(index), f"sm{major}{minor}"]
    else:
        import platform

        parts += ["cpu", platform.machine(), torch.backends.cpu.get_cpu_capability()]
    parts.append(f"torch{torch.__version__}")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if cudnn:
        parts.append(f"cudnn{cudnn}")
    try:
        import triton

        parts.append(f"triton{triton.__version__}")
    except ImportError:
        pass
    parts.append(f"fastres{__version__}")
    parts.append(f"rules{RULES}")
    return " ".join(parts)


class DiskCache:
    """signature -> {choice, config, candidates} for one machine identity, in one JSON file per device."""

    def __init__(self):
        self._entries: Dict[str, Dict[str, dict]] = {}  # path -> entries

    def path_for(self, device: torch.device) -> str:
        identity = machine_identity(device)
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", identity)[:80].strip("-")
        digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
        return os.path.join(cache_dir(), f"tuning-{slug}-{digest}.json")

    def _device_of(self, key: str) -> torch.device:
        return torch.device("cuda") if " cuda:" in f" {key.split(' ', 2)[1]}" else torch.device("cpu")

    def _load(self, path: str) -> Dict[str, dict]:
        entries = self._entries.get(path)
        if entries is None:
            entries = self._entries[path] = self._read(path)
        return entries

    def _read(self, path: str) -> Dict[str, dict]:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
                raise ValueError("not a fastres tuning cache (no 'entries' object)")
            return {k: v for k, v in data["entries"].items() if isinstance(v, dict) and "choice" in v}
        except FileNotFoundError:
            return {}
        except Exception as error:
            _warn_once(f"fastres: ignoring the tuning cache {path}: {type(error).__name__}: {error}")
            return {}

    def get(self, key: str) -> Optional[dict]:
        if not autotune_enabled() and os.environ.get("FASTRES_CACHE_DIR") is None:
            pass  # measuring off still reads a shipped cache
        try:
            return self._load(self.path_for(self._device_of(key))).get(key)
        except Exception as error:  # never an exception for the user
            _warn_once(f"fastres: ignoring the tuning cache: {type(error).__name__}: {error}")
            return None

    def put(self, key: str, entry: dict) -> None:
        path = None
        try:
            path = self.path_for(self._device_of(key))
            entries = self._load(path)
            entries[key] = entry
            _atomic_merge(path, {key: entry})
        except Exception as error:
            _warn_once(f"fastres: cannot write the tuning cache {path or cache_dir()}: "
                       f"{type(error).__name__}: {error}")


def _atomic_merge(path: str, new: Dict[str, dict]) -> None:
    """Read the file, add `new`, write it back atomically, all under an exclusive lock file (two
    processes at once lose no entry and never leave a half-written file)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    with open(path + ".lock", "a+") as lock:
        try:
            import fcntl

            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX: atomic rename still prevents corruption
            pass
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            entries = data.get("entries", {}) if isinstance(data, dict) else {}
            if not isinstance(entries, dict):
                entries = {}
        except Exception:
            entries = {}
        entries.update(new)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tuning-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"format": 1, "identity": os.path.basename(path), "entries": entries}, f, indent=1,
                          sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


_disk: Optional[DiskCache] = None


def disk_cache() -> DiskCache:
    global _disk
    if _disk is None:
        _disk = DiskCache()
    return _disk
