"""NaN and +-Inf propagate exactly as in torch, on every backend and through every fused epilogue.

The trap: a fused ReLU written as max(y, 0) maps NaN to 0 (oneDNN's post-op does, and so
does max() on the GPU), which turns a poisoned input into a plausible-looking number.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres import ops

from helpers import LAYOUTS, TOLERANCE, build_pair, eval_on, randn
from reference_math import bottleneck_tail as bottleneck_tail_ref, conv2d_act as conv2d_act_ref

BACKENDS = fastres.available_backends()
# Whole models on Triton's CPU interpreter take minutes; its kernels are covered op by op here.
MODEL_BACKENDS = [b for b in BACKENDS if b != "triton" or torch.cuda.is_available()]


def poisoned(*shape, layout="nchw", seed=0, values=(float("nan"), float("inf"), -float("inf"))):
    """Random data with a few non-finite entries at fixed, spread-out positions, and the first of
    them last too (where vectorised kernels run their scalar tail)."""
    t = randn(*shape, seed=seed)
    flat = t.view(-1)
    for i, v in enumerate(values):
        flat[(i * 7919 + seed * 104729) % flat.numel()] = v
    flat[-1] = values[0]
    return t.contiguous(memory_format=LAYOUTS[layout])


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """NaN, +Inf and -Inf at exactly the reference's positions; the finite rest close to it."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    for kind in ("isnan", "isposinf", "isneginf"):
        a, e = getattr(torch, kind)(actual), getattr(torch, kind)(expected)
        assert torch.equal(a, e), f"{what}: {kind} differs at {int((a != e).sum())} positions ({int(e.sum())} expected)"
    assert (~torch.isfinite(expected)).any(), f"{what}: the test's poison did not reach the output"
    finite = torch.isfinite(expected)
    if not finite.any():
        return
    error = (actual.double()[finite] - expected.double()[finite]).abs().max().item()
    scale = max(expected.double()[finite].abs().max().item(), 1e-6)
    assert error <= TOLERANCE["op"][actual.dtype] * scale, \
        f"{what}: finite values off by {error:.3g} (scale {scale:.3g})"


# where the poison sits: the activation, the residual, or a parameter (weights are checked once
# when the CPU fast path packs them, so they need their own case)
CONV_POISON = ["x", "residual", "weight", "bias"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("where", CONV_POISON)
def test_conv2d_act_propagates_like_torch(where, relu, layout, backend):
    x = (poisoned if where == "x" else randn)(3, 13, 7, 9, seed=1).contiguous(memory_format=LAYOUTS[layout])
    weight = (poisoned if where == "weight" else randn)(24, 13, 3, 3, seed=2) * 0.1
    bias = (poisoned if where == "bias" else randn)(24, seed=3)
    # An Inf weight times a zero of the padding is NaN or skipped depending on the algorithm
    # (torch's own CPU convolutions differ), so poisoned weights run without padding.
    padding = 0 if where == "weight" else 1
    residual = (poisoned if where == "residual" else randn)(3, 24, 7 - 2 + 2 * padding, 9 - 2 + 2 * padding, seed=4)
    residual = residual.contiguous(memory_format=LAYOUTS[layout])
    with fastres.use_backend(backend), torch.no_grad():
        y = ops.conv2d_act(x, weight, bias, 1, padding, residual=residual, relu=relu)
    assert_same_nonfinite(y, conv2d_act_ref(x, weight, bias, 1, padding, residual=residual, relu=relu),
                          f"conv2d_act poisoned {where}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", ["h", "x", "w3", "wd", "bias"])
def test_bottleneck_tail_propagates_like_torch(where, layout, backend):
    def make(name, *shape, seed):
        t = (poisoned if where == name else randn)(*shape, seed=seed)
        return t.contiguous(memory_format=LAYOUTS[layout]) if t.dim() == 4 and name in ("h", "x") else t
    h, x = make("h", 3, 8, 4, 5, seed=1), make("x", 3, 13, 7, 9, seed=2)
    w3, wd = make("w3", 40, 8, 1, 1, seed=3) * 0.3, make("wd", 40, 13, 1, 1, seed=4) * 0.3
    bias = make("bias", 40, seed=5)
    with fastres.use_backend(backend), torch.no_grad():
        y = ops.bottleneck_tail(h, w3, x, wd, bias, stride=2, relu=True)
    assert_same_nonfinite(y, bottleneck_tail_ref(h, w3, x, wd, bias, 2, True), f"bottleneck_tail poisoned {where}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_act_propagates_like_torch(training, layout, backend):
    """In training a NaN poisons its channel's statistics: the whole channel and its running stats."""
    x = poisoned(3, 13, 7, 9, layout=layout, seed=1, values=(float("nan"), float("inf")))
    residual = poisoned(3, 13, 7, 9, layout=layout, seed=2, values=(-float("inf"),))
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.rand(13, generator=g) + 0.5, torch.randn(13, generator=g)
    mean, var = torch.randn(13, generator=g) * 0.1, torch.rand(13, generator=g) + 0.5
    expected_mean, expected_var = mean.double(), var.double()
    expected = torch.relu(F.batch_norm(x.double(), expected_mean, expected_var, weight.double(), bias.double(),
                                       training, 0.1, 1e-5) + residual.double())
    with fastres.use_backend(backend), torch.no_grad():
        y = ops.batch_norm_act(x, weight, bias, mean, var, training=training, residual=residual, relu=True)
    assert_same_nonfinite(y, expected, "batch_norm_act")
    for actual, reference, name in ((mean, expected_mean, "running_mean"), (var, expected_var, "running_var")):
        assert torch.equal(actual.isnan(), reference.isnan()), f"{name}: NaN channels differ"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_relu_propagates_like_torch(dtype, backend):
    x = poisoned(3, 13, 7, 9, seed=1).to(dtype)
    residual = poisoned(3, 13, 7, 9, seed=2).to(dtype)
    with fastres.use_backend(backend), torch.no_grad():
        y = ops.add_relu(x, residual)
    assert_same_nonfinite(y, torch.relu(x.double() + residual.double()), "add_relu")


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_model_propagates_like_torchvision(name, backend):
    """Sample 0 holds a NaN, sample 1 an Inf, sample 2 is clean: eval samples are independent, so
    exactly the first two outputs are non-finite, like torchvision's, and the third is right."""
    tv, fr = build_pair(name, num_classes=10)
    x = randn(3, 3, 32, 32, seed=5)
    x[0, 1, 10, 11], x[1, 2, 3, 30] = float("nan"), float("inf")
    for channels_last in (False, True):
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert_same_nonfinite(eval_on(fr, x, backend), eval_on(tv, x), f"{name} eval, channels_last={channels_last}")


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("module", ["layer2.0.downsample.1", "layer3.1.bn2", "layer4.0.bn3"])
def test_model_with_a_nan_statistic_propagates_like_torchvision(module, backend):
    """A finite input and one NaN running variance: the CPU fast path trusts its (checked) input to
    stay finite, so a non-finite folded weight must withdraw that trust for the rest of the forward."""
    tv, fr = build_pair("resnet50", num_classes=10)
    for model in (tv, fr):
        model.get_submodule(module).running_var[3] = float("nan")
    x = randn(2, 3, 32, 32, seed=6)
    assert_same_nonfinite(eval_on(fr, x, backend), eval_on(tv, x), f"NaN running_var in {module}")
