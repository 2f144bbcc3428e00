"""The Triton kernels ResNet-50 launches (inference, and training with the NormConv convs) compile for
sm_90 (H100/H200) as fast kernels should: wgmma (not mma.sync) for every fp16/bf16 conv, no register
spills, shared memory within 227 KiB, and the 7x7 stem issuing at most 2x its useful MMA work --
checked on this GPU-less machine with Triton's own compiler and Triton's own launch specialisation
(fastres.kernels.triton.audit).

The audit runs in a subprocess: the compiler needs real JIT functions, and the rest of the suite
imports the kernels under TRITON_INTERPRET=1, which turns them into interpreter objects for the whole
process. CI uses a reduced set (a few layers, batch 1 and 256); the CLI does the whole model
(benchmarks/results/sm90-triton-audit.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HOPPER_SHARED_MEMORY = 232448  # bytes per block (227 KiB)
LAYERS = ["conv1", "layer1.0.conv2", "layer1.0.conv3+downsample", "layer1.1.conv3", "layer4.0.conv2",
          "layer4.2.conv1", "bn1", "layer4.2.bn3"]


@pytest.fixture(scope="module")
def audit_rows(tmp_path_factory):
    pytest.importorskip("triton.backends.compiler")
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fastres.kernels.triton.audit", "--arch", "90", "--model", "resnet50",
                          "--batch", "1,256", "--dtype", "bf16,fp16", "--mode", "infer,train",
                          "--layers", ",".join(LAYERS), "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_conv_uses_wgmma(audit_rows):
    convs = [r for r in audit_rows if r["kernel"] == "conv2d_act_kernel"]
    assert len(convs) >= 40
    assert {r["layer"] for r in convs} >= {"conv1", "layer1.0.conv3+downsample", "layer4.0.conv2"}
    for r in convs:  # "mma" alone would accept mma.sync, the pre-Hopper instruction
        assert r["wgmma"] and not r["mma_sync"], r
    # the 8-warp 128 x 128 candidates of the large 16-bit GEMMs are among them (and so are held to no
    # spills below)
    assert any(r["config"].startswith("m128n128k64w8") for r in convs)


def test_no_spills_and_shared_memory_fits(audit_rows):
    kernels = {r["kernel"] for r in audit_rows}
    assert {"batch_norm_act_backward_apply_kernel", "batch_norm_act_backward_finalize_kernel",
            "splitk_reduce_kernel"} <= kernels
    for r in audit_rows:
        assert r["registers"] is not None and r["spill_bytes"] == 0, r
        assert r["shared_bytes"] <= HOPPER_SHARED_MEMORY, r


def test_stem_mma_work_ratio(audit_rows):
    stem = [r for r in audit_rows if r["layer"] == "conv1" and r["kernel"] == "conv2d_act_kernel"]
    assert stem
    for r in stem:
        assert r["mma_work_ratio"] <= 2, r


def test_batch1_layer4_splits_k(audit_rows):
    default = [r for r in audit_rows if r["layer"] == "layer4.0.conv2" and r["batch"] == 1
               and r["config"] == "(default)" and r["mode"] == "infer" and r["kernel"] == "conv2d_act_kernel"]
    assert default and all(r["grid"][1] > 1 for r in default), default


def test_norm_conv_launches_compile_as_fast_kernels(audit_rows):
    """NormConv (training, `--mode train`): every block conv also as a statistics conv, the ones after a
    BN + ReLU with the prologue; the audit's config says so. wgmma and no spills are checked for every
    row above; here: they are there, and the prologue convs still issue wgmma."""
    norm = [r for r in audit_rows if r["op"] == "norm_conv"]
    assert {r["layer"] for r in norm} >= {"conv1", "layer1.0.conv2", "layer1.1.conv3", "layer4.0.conv2",
                                          "layer4.2.conv1"}
    assert "norm_stats_merge_kernel" in {r["kernel"] for r in norm}
    prologue = [r for r in norm if r["kernel"] == "conv2d_act_kernel" and "prologue" in r["config"]]
    assert {r["layer"] for r in prologue} >= {"layer1.0.conv2", "layer1.1.conv3", "layer4.0.conv2"}
    # a block's first conv and the stem have no BN before them
    assert not any("prologue" in r["config"] for r in norm if r["layer"] in ("layer4.2.conv1", "conv1"))
    for r in prologue:
        assert r["wgmma"] and not r["mma_sync"] and r["spill_bytes"] == 0, r
    stats = [r for r in norm if "stats" in r["config"]]
    assert {r["batch"] for r in stats} == {1, 256}


def test_norm_conv_backward_kernels_compile_as_fast_kernels(audit_rows):
    """The NormConv backward (op "norm_conv_backward"): per conv, the output gradient gy + a * y + b in one
    elementwise pass (the BN apply kernel) where needed, then a wgrad and a dgrad kernel (the stem: no dgrad, the image
    needs no gradient), the GEMMs on wgmma, the ones recomputing the previous BN + ReLU tagged "prologue"
    (spills and shared memory are checked for every row above)."""
    back = [r for r in audit_rows if r["op"] == "norm_conv_backward"]
    gemms = [r for r in back if r["kernel"] != "batch_norm_act_apply_kernel"]
    assert {r["kernel"] for r in gemms} == {"conv2d_wgrad_kernel", "conv2d_dgrad_kernel"}
    assert {r["layer"] for r in back} >= {"conv1", "layer1.0.conv2", "layer1.1.conv3", "layer4.0.conv2",
                                          "layer4.2.conv1"}
    assert {r["kernel"] for r in back if r["layer"] == "conv1"} == {"conv2d_wgrad_kernel"}
    assert {r["batch"] for r in back} == {1, 256} and {r["dtype"] for r in back} == {"bf16", "fp16"}
    for r in gemms:
        assert r["wgmma"] and not r["mma_sync"], r
        assert ("prologue" in r["config"]) == (r["layer"] not in ("layer4.2.conv1", "conv1")), r
    # one output-gradient pass per (layer, batch, dtype) where the conv's BN is the next conv's prologue
    # (a block's inner convs); the stem's and a block's last conv's BN give y its whole gradient themselves
    passes = [(r["layer"], r["batch"], r["dtype"]) for r in back if r not in gemms]
    assert len(passes) == len(set(passes))
    assert {layer for layer, _, _ in passes} == {"layer1.0.conv2", "layer4.0.conv2", "layer4.2.conv1"}
    # the wide backward tiles auto may time (8 warps) compile for the large GEMMs, at batch 256 only
    wide = [r for r in gemms if r["config"].startswith("m128n128k64w8")]
    assert {(r["layer"], r["kernel"]) for r in wide} >= {("layer4.0.conv2", "conv2d_wgrad_kernel"),
                                                         ("layer4.0.conv2", "conv2d_dgrad_kernel")}
    assert {r["batch"] for r in wide} == {256} and all("w8" in r["tile"] for r in wide)
    strided = [r for r in back if r["layer"] == "layer4.0.conv2" and r["kernel"] == "conv2d_dgrad_kernel"]
    assert strided and all(r["grid"][1] == 4 for r in strided)  # stride 2: four output phases
