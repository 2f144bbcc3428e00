"""The prepared GPU check (python -m fastres.bench.gpu_check): its dry run end to end on this
machine's device, and the time-boxing a lent GPU's short loan depends on (a cut-off or failing
stage keeps everything recorded before it, later stages still run, the exit code says so)."""
import json
import os
import time

import pytest

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
    assert all(c["status"] in ("passed", "skipped") for c in cases), cases
    markdown = open(os.path.join(out, "gpu_check.md"), encoding="utf-8").read()
    for heading in ("| stage | status |", "## Models", "## Correctness", "fastres.bench.gpu_check"):
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
