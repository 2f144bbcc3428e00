"""auto's measured choice (fastres/ops/tuner.py): timing with an injected timer, the correctness guard,
no side effects, the disk cache (round trip, corruption, unwritable, version key, concurrent writers),
and no timing where it must not happen (tracing, fake tensors, explicit backends, FASTRES_AUTOTUNE=0)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastres
from fastres import ops
from fastres.ops import dispatch, reference, tuner

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Measuring on, a private cache directory, a clean memory; fake implementations removed after."""
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))
    tuner.reset()
    added = []

    def add(op, name, run, covers=lambda call: None, **kw):
        dispatch.register(op, name, backend="test", covers=covers, run=run, **kw)
        added.append((op, name))

    yield add
    for op, name in added:
        dispatch.unregister(op, name)
    tuner.reset()


class Ran:
    """Which implementation ran last: the injected timer prices it."""
    last = None


def _marked(name, fn):
    def run(call, config):
        Ran.last = name if not config else f"{name}[{config}]"
        return fn(call)
    return run


def _ref_conv(call):
    return reference.conv2d_act(*call.positional())


def price_timer(prices, calls=None):
    def timer(fn, device):
        fn()
        if calls is not None:
            calls.append(Ran.last)
        return prices[Ran.last]
    return timer


def _conv_operands(seed=0, c=5, k=7, hw=(9, 11)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, c, *hw, generator=g)
    w = torch.randn(k, c, 3, 3, generator=g)
    b = torch.randn(k, generator=g)
    return x, w, b


def _conv(x, w, b):
    with torch.no_grad():
        return ops.conv2d_act(x, w, b, padding=1)


def _entry(op="conv2d_act"):
    entries = [e for e in fastres.tuning_report() if e["op"] == op]
    assert entries, fastres.tuning_report()
    return entries[-1]


def test_fastest_correct_candidate_wins(tuning):
    tuning("conv2d_act", "t_fast", _marked("t_fast", _ref_conv))
    tuning("conv2d_act", "t_slow", _marked("t_slow", _ref_conv))
    prices = {"t_fast": 1.0, "t_slow": 5.0, "reference": 3.0}
    ref = dispatch.reference("conv2d_act")
    with tuner.use_timer(price_timer(prices)), \
            _patched(ref, _marked("reference", _ref_conv)):
        x, w, b = _conv_operands()
        y = _conv(x, w, b)
        entry = _entry()
        assert entry["choice"] == "t_fast" and entry["source"] == "measured"
        assert entry["candidates"]["t_slow"] == 5.0 and entry["candidates"]["reference"] == 3.0
        torch.testing.assert_close(y, reference.conv2d_act(x, w, b, (1, 1), (1, 1), (1, 1), 1, None, True))
        # second call: remembered, not timed again
        prices.clear()
        _conv(x, w, b)
        assert _entry()["source"] == "measured"


def test_configs_are_candidates(tuning):
    tuning("conv2d_act", "t_cfg", _marked("t_cfg", _ref_conv), configs=lambda call: ["a", "b"])
    prices = {"t_cfg[a]": 4.0, "t_cfg[b]": 2.0, "reference": 3.0}
    ref = dispatch.reference("conv2d_act")
    with tuner.use_timer(price_timer(prices)), _patched(ref, _marked("reference", _ref_conv)):
        _conv(*_conv_operands())
    entry = _entry()
    assert (entry["choice"], entry["config"]) == ("t_cfg", "b")
    assert set(entry["candidates"]) == {"t_cfg[a]", "t_cfg[b]", "reference"}


def test_static_choice_is_kept_unless_beaten_by_the_margin(tuning):
    # t_static ranks first; t_near is faster by less than the CPU margin, t_far by more
    margin = tuner.SWITCH_MARGIN["cpu"]
    tuning("conv2d_act", "t_static", _marked("t_static", _ref_conv), rank=0)
    tuning("conv2d_act", "t_other", _marked("t_other", _ref_conv))
    ref = dispatch.reference("conv2d_act")
    for hw, other, expected in (((9, 11), 3.0 * (1 - margin / 2), "t_static"),
                                ((7, 13), 3.0 * (1 - 2 * margin), "t_other")):
        prices = {"t_static": 3.0, "t_other": other, "reference": 9.0}
        with tuner.use_timer(price_timer(prices)), _patched(ref, _marked("reference", _ref_conv)):
            _conv(*_conv_operands(hw=hw))
        entry = _entry()
        assert entry["source"] == "measured" and entry["choice"] == expected, entry
        assert entry["candidates"]["t_other"] == pytest.approx(other)


@pytest.mark.skipif(not fastres.ops.onednn.INPLACE_AVAILABLE, reason="this torch has no in-place oneDNN conv")
def test_in_place_residual_is_timed_in_place_on_a_private_copy(tuning, monkeypatch):
    # A residual this block's fast path made may be overwritten by the next conv (the CPU path's
    # in-place add). Its trials must time that form, on a copy: the caller's residual must reach
    # the real call intact.
    from fastres.ops import onednn

    calls = []

    class Spy:
        def __getattr__(self, name):
            attr = getattr(torch.ops.mkldnn, name)
            if name == "_convolution_pointwise_":
                calls.append("in place")
            return attr

    monkeypatch.setattr(onednn, "_mkldnn", Spy())
    g = torch.Generator().manual_seed(3)
    cl = torch.channels_last
    x = torch.randn(2, 16, 9, 11, generator=g).to(memory_format=cl)
    w1 = torch.randn(24, 16, 1, 1, generator=g)
    w2 = torch.randn(24, 16, 1, 1, generator=g)
    b = torch.randn(24, generator=g)
    with torch.no_grad(), dispatch.forward_context(private_activations=True):
        # made here by the CPU fast path, hence reusable (called directly: through auto, a measured
        # choice of the reference for this first conv would make nothing reusable)
        residual = onednn.conv2d_act(x, w1, b, (1, 1), (0, 0), (1, 1), 1, None, False)
        before = residual.clone()
        calls.clear()
        y = ops.conv2d_act(x, w2, b, residual=residual)
    entry = _entry()
    assert entry["source"] == "measured" and "onednn" in entry["candidates"], entry
    assert calls.count("in place") >= 2, calls  # the trials' check and timing, then maybe the real call
    expected = reference.conv2d_act(x.double(), w2.double(), b.double(), (1, 1), (0, 0), (1, 1), 1,
                                    before.double(), True)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_wrong_candidate_is_rejected_with_one_warning(tuning):
    tuning("conv2d_act", "t_wrong", _marked("t_wrong", lambda call: _ref_conv(call) * 1.01))
    ref = dispatch.reference("conv2d_act")
    prices = {"t_wrong": 0.1, "reference": 3.0}
    with tuner.use_timer(price_timer(prices)), _patched(ref, _marked("reference", _ref_conv)):
        with pytest.warns(RuntimeWarning, match="t_wrong.*disagrees"):
            y = _conv(*_conv_operands())
    entry = _entry()
    assert entry["choice"] == "reference"
    assert entry["candidates"]["t_wrong"].startswith("rejected: error")
    x, w, b = _conv_operands()
    torch.testing.assert_close(y, reference.conv2d_act(x, w, b, (1, 1), (1, 1), (1, 1), 1, None, True))


def test_crashing_candidate_is_rejected(tuning):
    def boom(call, config):
        raise RuntimeError("no kernel image for this device")
    tuning("conv2d_act", "t_crash", boom)
    with pytest.warns(RuntimeWarning, match="t_crash.*failed"):
        _conv(*_conv_operands())
    assert "no kernel image" in _entry()["candidates"]["t_crash"]


def test_nan_pattern_must_match(tuning):
    tuning("conv2d_act", "t_drops_nan", _marked("t_drops_nan", lambda call: torch.nan_to_num(_ref_conv(call))))
    x, w, b = _conv_operands()
    x[0, 0, 4, 4] = float("nan")
    with pytest.warns(RuntimeWarning, match="t_drops_nan"):
        y = _conv(x, w, b)
    assert torch.isnan(y).any()
    assert _entry()["candidates"]["t_drops_nan"].startswith("rejected")


def test_default_timer_is_bounded(monkeypatch):
    runs = []
    ms = tuner._default_timer(lambda: runs.append(1), torch.device("cpu"))
    assert len(runs) == tuner.REPEATS and ms >= 0
    runs.clear()
    monkeypatch.setattr(tuner, "BUDGET_MS", 0.0)
    tuner._default_timer(lambda: runs.append(1), torch.device("cpu"))
    assert len(runs) == 3  # past the budget: the minimum of three runs, no more


@pytest.mark.parametrize("host_ms,gpu_ms,expected", [(0.5, 2.0, 2.0), (0.4, 0.1, 0.4)])
def test_gpu_timing_overlaps_host_work_as_a_model_does(host_ms, gpu_ms, expected, monkeypatch):
    """pipelined_ms on a simulated GPU queue (events complete when the GPU reaches them): a GPU-bound call
    is timed by its GPU time, not GPU plus the host's launch work as when each call started from an idle
    GPU (that gave 2.5 here), and a launch-bound one by its host time; the run stays within the budget."""
    clock = {"host": 0.0, "gpu": 0.0}
    calls = []

    def fn():
        calls.append(1)
        clock["host"] += host_ms
        clock["gpu"] = max(clock["gpu"], clock["host"]) + gpu_ms

    class Event:
        def record(self):
            self.t = clock["gpu"] = max(clock["gpu"], clock["host"])

        def elapsed_time(self, other):
            return other.t - self.t

        def synchronize(self):
            clock["host"] = max(clock["host"], self.t)

    assert tuner.pipelined_ms(fn, Event) == pytest.approx(expected)
    assert len(calls) == 1 + tuner.REPEATS  # one alone to size the run, then the timed ones
    calls.clear()
    monkeypatch.setattr(tuner, "BUDGET_MS", 0.0)
    assert tuner.pipelined_ms(fn, Event) == pytest.approx(expected)
    assert len(calls) == 1 + 3


def test_training_batch_norm_measures_without_side_effects(tuning):
    def bn(call):
        return reference.batch_norm_act(call.x, call.weight, call.bias, call.running_mean, call.running_var,
                                        call.training, call.momentum, call.eps, call.residual, call.relu)
    tuning("batch_norm_act", "t_bn", _marked("t_bn", bn))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 5, 7, generator=g)
    weight, bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    mean, var = torch.zeros(6), torch.ones(6)
    mean_ref, var_ref = mean.clone(), var.clone()
    y = ops.batch_norm_act(x, weight, bias, mean, var, training=True, momentum=0.1)
    y_ref = torch.relu(torch.nn.functional.batch_norm(x, mean_ref, var_ref, weight, bias, True, 0.1, 1e-5))
    assert _entry("batch_norm_act")["source"] == "measured"
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(mean, mean_ref, rtol=0, atol=0)  # updated exactly once
    torch.testing.assert_close(var, var_ref, rtol=0, atol=0)


def test_explicit_backends_and_autotune_off_do_not_time(tuning, monkeypatch):
    tuning("conv2d_act", "t_alt", _marked("t_alt", _ref_conv))

    def no_timing(fn, device):
        raise AssertionError("timed")
    with tuner.use_timer(no_timing):
        with fastres.use_backend("torch"):
            _conv(*_conv_operands(1))
        monkeypatch.setenv("FASTRES_AUTOTUNE", "0")
        _conv(*_conv_operands(2))
    assert _entry()["source"] == "default"
    assert all(str(v).startswith("not measured: FASTRES_AUTOTUNE=0") for v in _entry()["candidates"].values())


def test_tracing_and_fake_tensors_do_not_time(tuning):
    tuning("conv2d_act", "t_alt", _marked("t_alt", _ref_conv))

    def no_timing(fn, device):
        raise AssertionError("timed")
    x, w, b = _conv_operands(4)
    with tuner.use_timer(no_timing):
        compiled = torch.compile(lambda x: ops.conv2d_act(x, w, b, padding=1), fullgraph=True, backend="eager")
        with torch.no_grad():
            y = compiled(x)
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode() as mode, torch.no_grad():
            fx, fw, fb = (mode.from_tensor(t) for t in (x, w, b))
            ops.conv2d_act(fx, fw, fb, padding=1)
    sources = {e["source"] for e in fastres.tuning_report()}
    assert sources == {"default"}
    torch.testing.assert_close(y, reference.conv2d_act(x, w, b, (1, 1), (1, 1), (1, 1), 1, None, True))


def test_compiled_call_uses_the_eager_choice(tuning):
    traced = []

    def alt(call, config):
        traced.append(torch.compiler.is_compiling())
        if not torch.compiler.is_compiling():  # the timer reads it; torch 2.11's dynamo can't trace the setattr
            Ran.last = "t_alt"
        return _ref_conv(call)
    tuning("conv2d_act", "t_alt", alt)
    ref = dispatch.reference("conv2d_act")
    prices = {"t_alt": 1.0, "reference": 2.0}
    x, w, b = _conv_operands(5)
    with tuner.use_timer(price_timer(prices)), _patched(ref, _marked("reference", _ref_conv)):
        _conv(x, w, b)  # eager: measures, t_alt wins
    assert _entry()["choice"] == "t_alt"
    traced.clear()
    compiled = torch.compile(lambda x: ops.conv2d_act(x, w, b, padding=1), fullgraph=True, backend="eager")
    with torch.no_grad():
        compiled(x)
    assert traced == [True]  # the traced graph holds t_alt
    assert _entry()["source"] == "measured" and _entry()["choice"] == "t_alt"


@pytest.mark.parametrize("junk", ["{not json", json.dumps([1, 2]), json.dumps({"entries": 3})])
def test_corrupted_cache_is_ignored_with_a_warning(tuning, junk):
    x, w, b = _conv_operands(6)
    call = dispatch.Call("conv2d_act", dict(x=x, weight=w, bias=b, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                                            groups=1, residual=None, relu=True))
    path = tuner.disk_cache().path_for(x.device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(junk)
    tuning("conv2d_act", "t_alt", _marked("t_alt", _ref_conv))
    with pytest.warns(RuntimeWarning, match="cache.*" + os.path.basename(path)):
        _conv(x, w, b)
    assert _entry()["source"] == "measured"
    assert tuner.signature(call) in json.load(open(path))["entries"]  # rewritten whole


def test_unwritable_cache_is_ignored_with_a_warning(tuning, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(blocker / "sub"))
    tuner.reset()
    tuning("conv2d_act", "t_alt", _marked("t_alt", _ref_conv))
    with pytest.warns(RuntimeWarning, match="cannot write the tuning cache"):
        y = _conv(*_conv_operands(7))
    assert y.shape == (3, 7, 9, 11)


def test_machine_identity_keys_the_file(tuning, monkeypatch):
    before = tuner.disk_cache().path_for(torch.device("cpu"))
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert tuner.disk_cache().path_for(torch.device("cpu")) != before
    assert "torch" in tuner.machine_identity(torch.device("cpu"))


_CHILD = textwrap.dedent("""
    import sys, torch, fastres
    from fastres import ops
    from fastres.ops import dispatch, reference, tuner
    dispatch.register("conv2d_act", "t_child", backend="test", covers=lambda call: None,
                      run=lambda call, config: reference.conv2d_act(*call.positional()))
    order = {"t_child": 1.0, "reference": 2.0}
    names = iter(["reference", "t_child"])
    tuner.timer = lambda fn, device: (fn(), order[next(names)])[1]
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 4, 6, 6, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    with torch.no_grad():
        ops.conv2d_act(x, w, None, padding=1)
    e = [e for e in fastres.tuning_report() if e["op"] == "conv2d_act"][-1]
    print(e["source"], e["choice"])
""")


def _child(cache_dir, code=_CHILD):
    env = dict(os.environ, FASTRES_CACHE_DIR=str(cache_dir), FASTRES_AUTOTUNE="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_cache_round_trip_across_processes(tmp_path):
    assert _child(tmp_path) == ["measured", "t_child"]
    assert _child(tmp_path) == ["cache", "t_child"]


_WRITER = textwrap.dedent("""
    import sys
    from fastres.ops import tuner
    path, who = sys.argv[1], sys.argv[2]
    for i in range(40):
        tuner._atomic_merge(path, {f"{who}-{i}": {"choice": "reference", "config": "", "candidates": {}}})
""")


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "tuning-x.json")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, path, who]) for who in ("a", "b", "c")]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    entries = json.load(open(path))["entries"]
    assert len(entries) == 120


def test_model_forward_measures_on_the_cpu_and_matches(tuning):
    # the real CPU candidates (reference, oneDNN direct, Winograd) with the real timer
    torch.manual_seed(0)
    model = fastres.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        y = model(x)
        with fastres.use_backend("torch"):
            expected = model(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    report = fastres.tuning_report()
    measured = [e for e in report if e["source"] == "measured"]
    assert measured, report
    for e in measured:
        assert e["choice"] in e["candidates"] or any(k.startswith(e["choice"]) for k in e["candidates"])
        assert all(isinstance(v, float) or v.startswith(("rejected", "not")) for v in e["candidates"].values())


class _patched:
    """Temporarily swap an implementation's run (frozen dataclass: replace it in the table)."""

    def __init__(self, impl, run):
        self.impl, self.run = impl, run

    def __enter__(self):
        dispatch.register(self.impl.op, self.impl.name, backend=self.impl.backend, covers=self.impl.covers,
                          run=self.run, configs=self.impl.configs, rank=self.impl.rank, in_auto=self.impl.in_auto)

    def __exit__(self, *exc):
        dispatch.register(self.impl.op, self.impl.name, backend=self.impl.backend, covers=self.impl.covers,
                          run=self.impl.run, configs=self.impl.configs, rank=self.impl.rank,
                          in_auto=self.impl.in_auto)
        warnings.resetwarnings()


def test_tuning_table_names_the_winner_and_margin():
    from fastres.bench.tuning import tuning_table
    rows = tuning_table([{"op": "conv2d_act", "signature": "conv2d_act cpu x=float32[1x2x3x4]c", "choice": "winograd4",
                          "config": "", "source": "measured",
                          "candidates": {"onednn": 2.0, "winograd4": 1.0, "winograd2": "rejected: error 1 > 0.1"}}])
    assert rows[2].startswith("| conv2d_act |") and "| winograd4 | measured |" in rows[2]
    assert "winograd4 1.000, onednn 2.000" in rows[2] and "2.00x" in rows[2] and "rejected" in rows[2]
    assert "no choices" in tuning_table([])[0]


class _without:
    """Temporarily remove an implementation (e.g. the interpreter-run Triton one: slow, and not what
    a test prices)."""

    def __init__(self, op, name):
        self.impl = dispatch.implementation(op, name)

    def __enter__(self):
        dispatch.unregister(self.impl.op, self.impl.name)

    def __exit__(self, *exc):
        i = self.impl
        dispatch.register(i.op, i.name, backend=i.backend, covers=i.covers, run=i.run, configs=i.configs,
                          rank=i.rank, in_auto=i.in_auto)


def _counting_backward(monkeypatch):
    calls = []
    real = torch.autograd.backward

    def backward(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.autograd, "backward", backward)
    return calls


def test_training_calls_are_timed_forward_and_backward(tuning, monkeypatch):
    """A call that records autograd is timed with its backward (the implementations' backward kernels
    differ); an inference call is not; the caller's tensors get no gradient from the trials."""
    tuning("conv2d_act", "other", _marked("other", _ref_conv))
    ref = dispatch.reference("conv2d_act")
    backwards = _counting_backward(monkeypatch)
    timed = []

    def timer(fn, device):
        before = len(backwards)
        fn()
        timed.append((Ran.last, len(backwards) - before))
        return {"reference": 2.0, "other": 1.0}[Ran.last]

    x, w, b = _conv_operands(seed=3)
    w.requires_grad_()
    with tuner.use_timer(timer), _patched(ref, _marked("reference", _ref_conv)):
        y = ops.conv2d_act(x, w, b, padding=1)
        assert w.grad is None  # the trials' gradients went to private copies
        assert sorted(name for name, _ in timed) == ["other", "reference"]
        assert all(n == 1 for _, n in timed), timed  # one backward per timed run
        entry = _entry()
        assert " grad " in entry["signature"] and entry["choice"] == "other"
        y.sum().backward()
        assert w.grad is not None
        timed.clear()
        tuner.reset()
        with torch.no_grad():
            ops.conv2d_act(x, w, b, padding=1)
        assert sorted(name for name, _ in timed) == ["other", "reference"]
        assert all(n == 0 for _, n in timed), timed


def _wrong_backward_conv(call):
    """The reference conv's exact output with a gradient 1.5 times too large."""
    y = _ref_conv(call)
    return y + (0.5 * y - (0.5 * y).detach())


def test_a_wrong_backward_is_rejected_for_training_calls_only(tuning):
    """A training call's candidates are checked on their gradients against the float64 reference: one
    whose forward is exact and whose backward is wrong is rejected there (with a warning naming it), and
    is chosen where no backward runs."""
    tuning("conv2d_act", "t_badgrad", _marked("t_badgrad", _wrong_backward_conv))
    ref = dispatch.reference("conv2d_act")
    prices = {"t_badgrad": 0.1, "reference": 3.0}
    x, w, b = _conv_operands(seed=5)
    w.requires_grad_()
    with tuner.use_timer(price_timer(prices)), _patched(ref, _marked("reference", _ref_conv)):
        with pytest.warns(RuntimeWarning, match="t_badgrad.*gradients that disagree"):
            y = ops.conv2d_act(x, w, b, padding=1)
        entry = _entry()
        assert " grad " in entry["signature"] and entry["choice"] == "reference"
        assert entry["candidates"]["t_badgrad"].startswith("rejected: gradient error")
        y.sum().backward()
        torch.testing.assert_close(w.grad, torch.func.grad(lambda w: reference.conv2d_act(
            x, w, b, (1, 1), (1, 1), (1, 1), 1, None, True).sum())(w.detach()))
        with torch.no_grad():
            ops.conv2d_act(x, w, b, padding=1)
        assert _entry()["choice"] == "t_badgrad"  # forward only: its forward is exact and fastest


@pytest.mark.parametrize("winner", ["reference", "fused"])
def test_norm_conv_chain_follows_the_measured_choice(tuning, winner):
    """auto takes a block's NormConv chain only where its measured choice for the block's first conv
    (forward + backward) is a fused implementation; where the reference wins, the block keeps its
    unfused path."""
    from fastres.nn import fused

    ref = dispatch.reference("norm_conv")
    tuning("norm_conv", "fused", _marked("fused", lambda call: ref.run(call, "")))
    prices = {"reference": 1.0, "fused": 2.0} if winner == "reference" else {"reference": 2.0, "fused": 1.0}

    def timer(fn, device):
        Ran.last = None
        fn()
        return prices.get(Ran.last, 1e9)  # anything else (e.g. Triton in the interpreter) never wins

    conv, bn = torch.nn.Conv2d(5, 7, 3, padding=1, bias=False), torch.nn.BatchNorm2d(7)
    x = torch.randn(3, 5, 9, 11, requires_grad=True)
    others = [_without("norm_conv", i.name) for i in dispatch.implementations("norm_conv")
              if i.name not in ("reference", "fused")]
    with tuner.use_timer(timer), _patched(ref, _marked("reference", lambda call: ref.run(call, ""))):
        for other in others:
            other.__enter__()
        try:
            applies = fused.norm_conv_chain_applies([(conv, bn)], x)
        finally:
            for other in others:
                other.__exit__()
    assert applies == (winner == "fused")
    entry = _entry("norm_conv")
    assert entry["source"] == "measured" and entry["choice"] == ("reference" if winner == "reference" else "fused")
    assert " grad " in entry["signature"]
    assert bn.num_batches_tracked.item() == 0  # measuring did not touch the module's buffers


def test_remembered_selection_skips_covers_until_the_state_changes(tuning):
    """Once the tuner remembers a signature's choice, the next call of that signature in the same state
    selects it without asking any covers(); a change covers() may read (here determinism and the
    forward context), a register() or a tuner reset asks again."""
    asked = []

    def covers(call):
        asked.append(1)
        return None

    tuning("conv2d_act", "counted", _marked("counted", _ref_conv), covers=covers)
    ref = dispatch.reference("conv2d_act")
    prices = {"reference": 2.0, "counted": 1.0}
    x, w, b = _conv_operands(seed=5)
    with tuner.use_timer(price_timer(prices)), _patched(ref, _marked("reference", _ref_conv)):
        _conv(x, w, b)
        assert Ran.last == "counted" and len(asked) == 1
        for _ in range(3):
            _conv(x, w, b)
        assert Ran.last == "counted" and len(asked) == 1  # remembered: covers() not asked again
        _conv(x[:2], w, b)  # another signature
        assert len(asked) == 2
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            _conv(x, w, b)
        finally:
            torch.use_deterministic_algorithms(was)
        assert len(asked) == 3
        with dispatch.forward_context(input_finite=True):
            _conv(x, w, b)
        assert len(asked) == 4
        _conv(x, w, b)
        assert len(asked) == 4
        tuner.reset()
        _conv(x, w, b)
        assert len(asked) == 5


def test_fake_tensors_never_fill_the_remembered_selections(tuning):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b = _conv_operands(seed=6)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _conv(torch.empty_like(x), w, b)
    assert not dispatch._selections


def test_selection_key_tells_apart_whatever_the_signature_does(monkeypatch):
    """auto's remembered selections are found by a key of plain values, not the signature string: two
    calls with one key must have one signature (or a remembered choice would run a call it was not
    measured for). Each variant changes one thing the signature or a covers() reads."""
    x, w, b = _conv_operands(seed=7)

    def conv_call(x=x, w=w, b=b, stride=[1, 1]):
        return dispatch.Call("conv2d_act", dict(x=x, weight=w, bias=b, stride=stride, padding=[1, 1],
                                                dilation=[1, 1], groups=1, residual=None, relu=True))

    def keyed(call):
        return dispatch._selection_key(call), tuner.signature(call), dispatch.current_context()

    seen = [keyed(conv_call()), keyed(conv_call())]  # the same call twice: one key
    seen.append(keyed(conv_call(x=x.double(), w=w.double(), b=b.double())))
    seen.append(keyed(conv_call(x=x.contiguous(memory_format=torch.channels_last))))
    seen.append(keyed(conv_call(x=x[:2])))
    seen.append(keyed(conv_call(stride=[2, 1])))
    seen.append(keyed(conv_call(w=w.detach().requires_grad_())))
    with torch.no_grad():
        seen.append(keyed(conv_call(w=w.detach().requires_grad_())))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen.append(keyed(conv_call()))
    with torch.inference_mode():
        seen.append(keyed(conv_call(x=x.clone())))
    with dispatch.forward_context(input_finite=True):
        seen.append(keyed(conv_call()))
    monkeypatch.setenv("FASTRES_WINOGRAD", "0")
    seen.append(keyed(conv_call()))
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        seen.append(keyed(conv_call()))
    finally:
        torch.set_num_threads(threads)
    keys = [key for key, _, _ in seen]
    assert keys[0] == keys[1] and len(set(keys)) == len(keys) - 1, keys
    signature_of = {}
    for key, signature, context in seen:
        assert signature_of.setdefault(key, (signature, context)) == (signature, context)

    class Sub(torch.Tensor):
        pass
    assert dispatch._selection_key(conv_call(x=x.as_subclass(Sub))) is None  # never remembered
    assert dispatch._selection_key(conv_call(x=torch.empty(x.shape, device="meta"))) is None
