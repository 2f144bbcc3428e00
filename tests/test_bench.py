"""The benchmark harness (fastres.bench): FLOP counts, input checks, the seed report's format,
the CLI's JSON and markdown records. CPU, seconds."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch
import torchvision
from torch import nn

from fastres.bench import cli
from fastres.bench.config import Settings, parse_batches, parse_list
from fastres.models.flops import conv_macs, count_macs
from fastres.bench.seed_report import seed_report

SEED_LINE = r"^{} across {} steps, \d+\.\d{{6}} \+/- \d+\.\d{{6}} sec / batch$"


@pytest.mark.parametrize("name,gmacs", [("resnet18", 1.814), ("resnet50", 4.089)])
def test_macs_of_resnets_at_224(name, gmacs):
    # the published figures: ResNet-18 1.82 GMACs, ResNet-50 4.09 GMACs per 224x224 image
    macs = count_macs(getattr(torchvision.models, name)(), torch.randn(1, 3, 224, 224))
    assert macs / 1e9 == pytest.approx(gmacs, rel=1e-3)


def test_macs_scale_with_batch_and_groups():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    one = count_macs(model, torch.randn(1, 8, 4, 4))
    assert one == 16 * 4 * 4 * (8 // 2) * 9 + 16 * 4 * 4 * 10
    assert count_macs(model, torch.randn(3, 8, 4, 4)) == 3 * one
    assert conv_macs((2, 16, 4, 4), (16, 4, 3, 3), groups=2) == 2 * 16 * 4 * 4 * 4 * 9


@pytest.mark.parametrize("text", ["0", "x", "", "1,,2", "-1", "2.5"])
def test_bad_batches_raise_value_error(text):
    with pytest.raises(ValueError, match="batch"):
        parse_batches(text)


def test_batches_and_lists_parse():
    assert parse_batches("1, 32,256,32") == [1, 32, 256]
    assert parse_list("FP32,bf16", "dtype", ["fp32", "bf16"]) == ["fp32", "bf16"]
    with pytest.raises(ValueError, match="dtype"):
        parse_list("fp8", "dtype", ["fp32", "bf16"])


@pytest.mark.parametrize("argv,flag", [(["--model", "resnet9"], "--model"), (["--batch", "0"], "batch"),
                                       (["--batch", "x"], "batch"), (["--dtype", "fp8"], "--dtype"),
                                       (["--mode", "serve"], "--mode"), (["--compare", "tensorrt"], "--compare"),
                                       (["--backends", "nope"], "--backends"), (["--rounds", "0"], "--rounds"),
                                       (["--mode", "train", "--batch", "1", "--size", "32"], "--batch 1")])
def test_cli_rejects_bad_input(argv, flag, capsys):
    with pytest.raises(ValueError, match=re.escape(flag)):
        cli.build_config(argv)
    assert cli.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_cli_defaults_on_cpu():
    config = cli.build_config(["--device", "cpu"])
    assert (config.model, config.batches, config.dtype, config.modes) == ("resnet50", [8], "fp32", ["infer"])
    names = [v.name for v in cli.variants(config)]
    assert names[:2] == ["torchvision nchw fp32", "torchvision channels_last fp32"]
    assert "fastres-torch channels_last fp32" in names


def test_seed_report_format():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    lines, figures = seed_report(model, torch.randn(2, 3, 8, 8), burn_in=1, steps=3)
    assert re.match(SEED_LINE.format("Forward", 3), lines[0]), lines[0]
    assert re.match(SEED_LINE.format("Forward-backward", 3), lines[1]), lines[1]
    assert figures["steps"] == 3 and figures["forward_s_mean"] > 0 and figures["forward_backward_s_std"] >= 0


def test_cli_json_and_markdown_record(tmp_path, capsys):
    out = tmp_path / "out.json"
    argv = ["--model", "resnet18", "--device", "cpu", "--size", "64", "--batch", "1,2", "--mode", "infer,train",
            "--backends", "torch", "--warmup", "0", "--rounds", "2", "--skip-verify", "--seed-report",
            "--seed-steps", "2", "--json", str(out), "--record-dir", str(tmp_path / "results")]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"Forward across 2 steps, .* sec / batch", printed)
    record = json.loads(out.read_text())
    env = record["environment"]
    for key in ("device", "device_type", "cpu_capability", "torch", "cuda", "triton", "torchvision", "fastres",
                "fastres_commit"):
        assert key in env, key
    assert record["model"] == "resnet18" and record["batches"] == [1, 2] and record["modes"] == ["infer", "train"]
    rows = record["results"]
    assert {(r["variant"], r["mode"], r["batch"]) for r in rows} == {
        (v, m, b)
        for v in ("torchvision nchw fp32", "torchvision channels_last fp32", "fastres-torch channels_last fp32")
        for m in ("infer", "train") for b in (1, 2)}
    for r in rows:
        assert len(r["rounds_s"]) == 2 and r["ms_median"] > 0 and r["img_per_s"] > 0
        assert r["tflops"] > 0 and 0 < r["pct_of_peak"] and r["peak_memory_mib"] is None  # CPU: n/a
        assert r["vs_torchvision_nchw"] > 0
    assert record["peak_tflops"]["fp32"] > 0
    assert len(record["seed_report"]["lines"]) == 4
    written = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert [name.rsplit(".", 1)[1] for name in written] == ["json", "md"]
    markdown = (tmp_path / "results" / written[1]).read_text()
    assert "python -m fastres.bench" in markdown and "| fastres-torch channels_last fp32 | train | 2 |" in markdown
    assert cli.main(argv) == 0  # a second run adds a record, never overwrites
    assert len(list((tmp_path / "results").iterdir())) == 4


def test_plot_without_matplotlib_fails_clearly(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["--device", "cpu", "--plot", "x.png"]) == 2
    assert "matplotlib" in capsys.readouterr().err


def test_settings_quick_on_cpu_and_overrides():
    quick = Settings.from_environment({"FASTRES_BENCH_DEVICE": "cpu"})
    assert quick.quick and quick.size == 32 and quick.batches == (2,)
    assert ("fp32", "nchw") in quick.points and ("fp32", "channels_last") in quick.points
    assert quick.skip_reason("compile", smallest=False) and quick.skip_reason("compile", smallest=True) is None
    assert quick.skip_reason("fastres-triton", smallest=True)  # the interpreter is not a speed
    full = Settings.from_environment({"FASTRES_BENCH_DEVICE": "cpu", "FASTRES_BENCH_QUICK": "0",
                                      "FASTRES_BENCH_BATCHES": "4", "FASTRES_BENCH_DTYPES": "fp32"})
    assert not full.quick and full.size == 224 and full.batches == (4,)
    assert full.points == (("fp32", "nchw"), ("fp32", "channels_last"))
    with pytest.raises(ValueError, match="FASTRES_BENCH_BATCHES"):
        Settings.from_environment({"FASTRES_BENCH_BATCHES": "0"})


def test_verify_checks_the_timed_shape_and_catches_a_wrong_model(monkeypatch):
    from fastres.bench import verify

    torch.manual_seed(0)
    tv = verify.randomize_batch_norm_(torchvision.models.resnet18(num_classes=10))
    small, timed = torch.randn(2, 3, 64, 64), torch.randn(1, 3, 96, 80)
    checks = verify.verify_against_torchvision(tv, small, timed_x=timed)
    names = [check.what for check in checks]
    assert "eval output at (1, 3, 96, 80)" in names and all(check.ok for check in checks), checks

    convert = verify.from_torchvision

    def off_by_a_little(model):
        fast = convert(model)
        with torch.no_grad():
            fast.layer1[0].conv1.weight.mul_(1.01)
        return fast
    monkeypatch.setattr(verify, "from_torchvision", off_by_a_little)
    checks = verify.verify_against_torchvision(tv, small, timed_x=timed)
    assert not any(check.ok for check in checks if check.what.startswith("eval output"))


def test_verify_runs_at_the_benchmarked_dtype(monkeypatch):
    from fastres.bench import verify

    torch.manual_seed(0)
    tv = verify.randomize_batch_norm_(torchvision.models.resnet18(num_classes=10))
    small = torch.randn(2, 3, 64, 64)
    checks = verify.verify_against_torchvision(tv, small, autocast_dtype=torch.bfloat16)
    check = next(check for check in checks if check.what == "eval output, bfloat16 autocast")
    assert check.ok and check.error > 0, check

    convert = verify.from_torchvision

    def wrong_under_autocast(model):
        fast = convert(model)
        forward = fast.forward

        def off(x):
            out = forward(x)
            return out * 1.1 if torch.is_autocast_enabled("cpu") else out
        fast.forward = off
        return fast
    monkeypatch.setattr(verify, "from_torchvision", wrong_under_autocast)
    checks = verify.verify_against_torchvision(tv, small, autocast_dtype=torch.bfloat16)
    assert [check.what for check in checks if not check.ok] == ["eval output, bfloat16 autocast"]
