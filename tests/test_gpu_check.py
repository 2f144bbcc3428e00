"""The prepared GPU check (python -m fastres.bench.gpu_check): its dry run end to end on this
machine's device, and the time-boxing a lent GPU's short loan depends on (a cut-off or failing
stage keeps everything recorded before it, later stages still run, the exit code says so)."""
import json
import os
import time

import pytest
import torch

from fastres.bench import gpu_check


def _load(out):
    with open(os.path.join(out, "gpu_check.json"), encoding="utf-8") as f:
        return json.load(f)


def test_dry_run_every_stage_passes(tmp_path):
    out = str(tmp_path / "check")
    assert gpu_check.main(["--out", out, "--dry-run", "--budget-s", "240"]) == 0
    record = _load(out)
    assert record["dry_run"] is True
    assert list(record["stages"]) == [name for name, _ in gpu_check.STAGES]
    for name, stage in record["stages"].items():
        assert stage["status"] == "passed", (name, stage.get("reason"), stage.get("traceback"))
    env = record["stages"]["environment"]["results"]
    assert env["copy_bandwidth_gb_s"] > 0 and env["info"]["torch"]
    correctness = record["stages"]["correctness"]["results"]
    assert correctness["done_cases"] == correctness["planned_cases"] > 0
    statuses = {row["status"] for row in correctness["rows"]}
    assert "passed" in statuses and "failed" not in statuses
    assert {row["op"] for row in correctness["rows"]} >= {"conv2d_act", "batch_norm_act", "norm_conv"}
    # NormConv's backward is checked too (the cuDNN wgrad / dgrad graphs have run nowhere else)
    graded = [r for r in correctness["rows"] if r["op"] == "norm_conv" and r["status"] == "passed"]
    assert any("grad_error" in r for r in graded), graded
    assert all(0 <= r["grad_error"] <= r["tolerance"] for r in graded if "grad_error" in r)
    assert record["stages"]["tuner"]["results"]["report"], "the tuner chose nothing for a whole model"
    cases = record["stages"]["models"]["results"]["cases"]
    assert {c["impl"] for c in cases} >= {"fastres", "torchvision eager"}
    # the Triton NormConv chain's training step runs forced (the interpreter here), beside auto's
    assert any(c["impl"] == "fastres backend=triton (NormConv chain, Triton)" and c["status"] == "passed"
               and c["mode"].startswith("training") for c in cases), cases
    assert isinstance(record["stages"]["models"]["results"]["training_choices"], list)
    assert all(c["status"] in ("passed", "skipped") for c in cases), cases
    markdown = open(os.path.join(out, "gpu_check.md"), encoding="utf-8").read()
    for heading in ("| stage | status |", "## Models", "## Correctness", "fastres.bench.gpu_check",
                    "| resnet18 | 2 | fastres backend=triton (NormConv chain, Triton) |"):  # read against eager
        assert heading in markdown


def test_a_failing_or_cut_off_stage_keeps_what_came_before(tmp_path):
    def first(stage):
        stage.results["value"] = 42

    def failing(stage):
        raise RuntimeError("planted failure")

    def slow(stage):
        stage.results["started"] = True
        stage.save()
        while True:  # only the time box ends this
            time.sleep(0.05)
            stage.check()

    def last(stage):
        stage.results["ran"] = True

    stages = [("first", first), ("failing", failing), ("slow", slow), ("last", last)]
    out = str(tmp_path / "check")
    record = gpu_check.run(out, budget_s=16, dry_run=True, stages=stages,
                           shares={"first": 1, "failing": 1, "slow": 2, "last": 4})
    on_disk = _load(out)
    for rec in (record, on_disk):
        st = rec["stages"]
        assert st["first"]["status"] == "passed" and st["first"]["results"]["value"] == 42
        assert st["failing"]["status"] == "failed" and "planted failure" in st["failing"]["reason"]
        assert st["slow"]["status"] == "timeout" and st["slow"]["results"]["started"] is True
        assert st["last"]["status"] == "passed" and st["last"]["results"]["ran"] is True


def test_no_budget_left_skips_and_the_exit_code_reports_failures(tmp_path, monkeypatch):
    def failing(stage):
        raise ValueError("no")

    monkeypatch.setattr(gpu_check, "STAGES", [("failing", failing), ("starved", lambda stage: None)])
    monkeypatch.setattr(gpu_check, "STAGES_SHARE", {"failing": 1.0, "starved": 0.0})
    out = str(tmp_path / "check")
    assert gpu_check.main(["--out", out, "--dry-run", "--budget-s", "5"]) == 1
    record = _load(out)
    assert record["stages"]["failing"]["status"] == "failed"
    assert record["stages"]["starved"]["status"] == "skipped"
    assert "no budget" in record["stages"]["starved"]["reason"]


@pytest.mark.parametrize("argv", [[], ["--out"], ["--out", "x", "--budget-s", "soon"]])
def test_bad_command_lines_are_refused(argv):
    with pytest.raises(SystemExit) as raised:
        gpu_check.main(argv)
    assert raised.value.code == 2


def test_cudnn_probe_verdicts_are_what_gpu_check_sh_greps():
    """gpu_check.sh takes the first crashed case from the probe's verdict lines (its grep pattern,
    here as a regex) to rerun it under cuda-gdb; ok and wrong answers are not crashes."""
    import re
    import subprocess
    import sys

    from fastres.bench import cudnn_probe

    script = open(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.sh")).read()
    assert 'grep -m1 -o "verdict case [0-9]* [^:]*: crashed"' in script
    crashed = re.compile(r"verdict case ([0-9]*) [^:]*: crashed")
    last = len(cudnn_probe.CASES) - 1
    assert crashed.search(cudnn_probe.verdict_line(last, -11, 7.1)).group(1) == str(last)
    assert crashed.search(cudnn_probe.verdict_line(0, None, 40.0)).group(1) == "0"
    assert crashed.search(cudnn_probe.verdict_line(0, 0, 1.0)) is None
    assert crashed.search(cudnn_probe.verdict_line(0, 1, 1.0)) is None
    if not torch.cuda.is_available():  # the driver says so and passes where there is nothing to probe
        run = subprocess.run([sys.executable, "-m", "fastres.bench.cudnn_probe"], capture_output=True, text=True)
        assert run.returncode == 0 and "no CUDA device" in run.stdout


class _TorchGraphOps:
    """torch twins of fastres._C's cuDNN graph ops (same arguments and outputs), for the probe on a CPU."""

    @staticmethod
    def _pre(x, scale, shift, relu):
        a = x.float() * scale.float().view(1, -1, 1, 1) + shift.float().view(1, -1, 1, 1)
        return torch.relu(a) if relu else a

    def __getattr__(self, name):
        if name.endswith("_supported"):
            return lambda *args: True
        raise AttributeError(name)

    def cudnn_conv_bias_act(self, x, w, bias, residual, stride, padding, dilation, groups, relu):
        y = torch.nn.functional.conv2d(x.float(), w.float(), bias.float(), stride, padding, dilation, groups)
        y = y + residual.float()
        return (torch.relu(y) if relu else y).to(x.dtype)

    def cudnn_conv_genstats(self, x, w, scale, shift, relu, stride, padding, dilation, groups):
        a = self._pre(x, scale, shift, relu).to(x.dtype).float()
        y = torch.nn.functional.conv2d(a, w.float(), None, stride, padding, dilation, groups)
        return y.to(x.dtype), y.sum((0, 2, 3)), y.square().sum((0, 2, 3))

    def cudnn_conv_wgrad(self, dy, x, weight_size, scale, shift, relu, stride, padding, dilation, groups):
        a = self._pre(x, scale, shift, relu)
        return torch.nn.grad.conv2d_weight(a, weight_size, dy.float(), stride, padding, dilation, groups).to(x.dtype)

    def cudnn_conv_dgrad_drelu(self, dy, w, x, scale, shift, stride, padding, dilation, groups):
        da = torch.nn.grad.conv2d_input(list(x.shape), w.float(), dy.float(), stride, padding, dilation, groups)
        gz = da * (self._pre(x, scale, shift, False) > 0)
        return gz.to(x.dtype), (gz * x.float()).sum((0, 2, 3)), gz.sum((0, 2, 3))


@pytest.mark.parametrize("index", range(6))
def test_cudnn_probe_cases_pass_against_torch_twins(index):
    """Each probe case's arguments and comparison are right: with torch twins of the graph ops (the
    argument order of fastres._C's schemas) every case passes on the CPU, so on a GPU a failing case
    means cuDNN's answer, not the probe's bookkeeping."""
    from fastres.bench import cudnn_probe

    import inspect

    import fastres
    if fastres.extension_loaded():  # the twins take the schemas' arguments, in order
        for op in ("bias_act", "genstats", "wgrad", "dgrad_drelu"):
            schema = getattr(torch.ops.fastres, f"cudnn_conv_{op}").default._schema
            twin = inspect.signature(getattr(_TorchGraphOps(), f"cudnn_conv_{op}"))
            assert len(schema.arguments) == len(twin.parameters), op
    assert len(cudnn_probe.CASES) == 6
    assert cudnn_probe.run_case(index, device="cpu", ops=_TorchGraphOps())


def test_training_rows_are_read_against_eager_and_the_memory_goal():
    def row(impl, ms, peak, model="resnet50", status="passed"):
        return dict(model=model, mode="training step (fwd+bwd+SGD)", batch=256, impl=impl, ms=ms,
                    peak_memory_mib=peak, status=status)
    cases = [row("torchvision eager", 50.0, 10000),
             row("fastres backend=triton (NormConv chain, Triton)", 40.0, 7400),  # -26%: met
             row("fastres", 100.0, 14300),  # auto: no goal of its own
             row("fastres backend=cpp (NormConv chain, cuDNN graphs)", 25.0, 7600),  # -24%: not met
             row("torch.compile(inductor) torchvision", 45.0, None),
             row("fastres backend=triton (NormConv chain, Triton)", 10.0, 100, model="resnet18"),  # no eager row
             row("fastres", None, None, status="failed"),
             dict(row("fastres", 5.0, 10), mode="inference")]
    lines = gpu_check.training_against_eager(cases)
    body = [line for line in lines if line.startswith("| resnet")]
    assert body == [
        "| resnet50 | 256 | fastres backend=triton (NormConv chain, Triton) | 1.25x | -26.0% | met |",
        "| resnet50 | 256 | fastres | 0.50x | +43.0% |  |",
        "| resnet50 | 256 | fastres backend=cpp (NormConv chain, cuDNN graphs) | 2.00x | -24.0% | NOT met |",
        "| resnet50 | 256 | torch.compile(inductor) torchvision | 1.11x | - |  |"], lines
    assert gpu_check.training_against_eager([row("fastres", 1.0, 1)]) == []  # nothing to compare with
