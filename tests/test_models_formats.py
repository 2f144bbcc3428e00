"""fastres's model zoo against torchvision: channels_last models and float64 models.

CPU-sized on purpose: the shapes and the comparisons are tests/helpers.py's.
"""
from __future__ import annotations


import pytest
import torch

from helpers import (BACKENDS, EVAL_INPUTS, TRAIN_SHAPE, assert_eval_matches, assert_rel_close, assert_train_matches,
                     build_pair, eval_on, randn, rel_error)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_model(name, backend):
    tv, fr = build_pair(name, num_classes=10)
    tv = tv.to(memory_format=torch.channels_last)
    fr = fr.to(memory_format=torch.channels_last)
    assert fr.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert_eval_matches(tv, fr, backend=backend, what=f"channels_last {name}")
    if name == "resnet18":
        assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=15, channels_last=True), backend, fp32_direct=True,
                              what="channels_last resnet18")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_modeleval_output(name, backend):
    tv, fr = build_pair(name, num_classes=10)
    tv, fr = tv.double(), fr.double()
    assert fr.conv1.weight.dtype == torch.float64
    for i, (shape, cl) in enumerate(EVAL_INPUTS[:3]):
        x = randn(*shape, seed=50 + i, dtype=torch.float64, channels_last=cl)
        y = eval_on(fr, x, backend)
        assert y.dtype == torch.float64
        assert_rel_close(y, eval_on(tv, x), 1e-10, f"float64 {name} {shape} cl={cl}")


def test_output_layout_and_dtype_like_torchvision():
    tv, fr = build_pair("resnet18", num_classes=10)
    for cl in (False, True):
        x = randn(2, 3, 32, 32, channels_last=cl)
        y, y_tv = eval_on(fr, x), eval_on(tv, x)
        assert y.shape == y_tv.shape and y.dtype == y_tv.dtype and y.is_contiguous()
    # a batch of one and a 1x1 feature map in layer4 (input 17x17)
    x = randn(1, 3, 17, 17, seed=2)
    assert_rel_close(eval_on(fr, x), eval_on(tv, x), what="17x17")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_cpu_autocast_bfloat16(name):
    """Under autocast the output is bf16 like torchvision's and no further from the fp32 answer."""
    tv, fr = build_pair(name, num_classes=10)
    x = randn(2, 3, 32, 32, seed=16)
    exact = eval_on(tv, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_tv = eval_on(fr, x), eval_on(tv, x)
    assert y.dtype == y_tv.dtype == torch.bfloat16
    assert rel_error(y, exact) <= max(0.05, 3 * rel_error(y_tv, exact)), (
        f"bf16 autocast: fastres {rel_error(y, exact):.3g} from fp32, torchvision {rel_error(y_tv, exact):.3g}")
    # training under autocast: same dtypes, gradients for every parameter, buffers stay fp32
    for model in (tv, fr):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(randn(*TRAIN_SHAPE, seed=17))
        assert out.dtype == torch.bfloat16
        out.float().logsumexp(1).sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
        assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())
    assert_rel_close(fr.bn1.running_mean, tv.bn1.running_mean, 1e-2, "running_mean after an autocast step")
