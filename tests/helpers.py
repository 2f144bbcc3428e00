"""The test toolkit (tests/conftest.py keeps the environment and the fixtures): one tolerance
table, random inputs, layouts, conv cases, model pairs, training steps and comparisons.

Numerics of the model-level tests (fastres against torchvision):
- eval mode: fastres folds BN into the convs, which is exact math that rounds differently, so
  outputs are compared with a tolerance relative to the reference's largest magnitude
  (fp32: 1e-4, fp64: 1e-10).
- train mode: BatchNorm on batch statistics at random init is badly conditioned for deep
  Bottleneck nets (measured here: torchvision fp32 against torchvision fp64 disagree by up to
  ~50% on some parameter gradients of resnet50 at 2x3x64x64). A fixed fp32 tolerance there
  would test rounding luck, so train equivalence is checked exactly in float64 (agreement to
  ~1e-11 measured) plus, in fp32, against torchvision's own fp32 error (`assert_as_accurate`).
  Training inputs must give every channel of layer4 more than 2 values (64x64 at batch 2):
  with 2 values BN's output is +-1 and even float64 loses 2 digits.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Dict, Iterable, Optional

import pytest
import torch
from torch import nn

import fastres

# One table: purpose -> dtype -> tolerance, relative to the reference's largest magnitude.
# - op: one op against its float64 reference (fp32 accumulates in fp32; half types round every stored
#   value to 11 (fp16) or 8 (bf16) bits);
# - grad: an op's gradients against float64 (a backward sums over the batch and taps: one more rounding);
# - model: a whole network in eval mode against torchvision (BN folded: exact math, other rounding);
# - train: a whole training step in float64 (measured ~1e-11 between two summation orders);
# - graph: a CUDA-graph replay against eager;
# - stats: BatchNorm batch statistics accumulated in fp32 under autocast (measured <= 2e-7);
# - winograd2 / winograd4: F(2x2) rounds like the direct sum (measured <= 5e-7), F(4x4) ~20x worse
#   (measured <= 6e-6 at the test shapes and at ResNet-50's 256 channels).
TOLERANCE = {
    "op": {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2},
    "grad": {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2},
    "model": {torch.float64: 1e-10, torch.float32: 1e-4},
    "train": {torch.float64: 1e-8},
    "graph": {torch.float32: 1e-5, torch.bfloat16: 2e-2},
    "stats": {torch.float32: 1e-5},
    "winograd2": {torch.float32: 2e-6},
    "winograd4": {torch.float32: 2e-5},
}

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups): ResNet's shapes and the odd ones.
CONV_CASES = [
    (1, 13, 7, 9, 24, 1, 1, 0, 1, 1),
    (3, 13, 13, 17, 40, 3, 1, 1, 1, 1),
    (3, 24, 13, 17, 40, 3, 2, 1, 1, 4),    # ResNeXt-style grouped 3x3, stride 2, odd spatial
    (1, 16, 13, 17, 24, 1, 2, 0, 1, 1),    # strided 1x1 (projection shortcut)
    (3, 24, 7, 9, 24, 3, 1, 2, 2, 1),      # dilation 2 (replace_stride_with_dilation)
    (1, 3, 37, 45, 16, 7, 2, 3, 1, 1),     # the 7x7 stride-2 stem
    (3, 40, 1, 1, 13, 1, 1, 0, 1, 1),      # 1x1 spatial
]

# Every constructor of the public API with its torchvision twin's name.
CONSTRUCTORS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]
BIG = {"resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2"}


# ---------------------------------------------------------------------------------------------
# random data
# ---------------------------------------------------------------------------------------------

def _uniform(shape, low, high, g):
    return torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low


def randomize_bn_(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm2d (and torchvision FrozenBatchNorm2d) non-trivial affine parameters and running
    statistics (in place).

    weight ~ U(0.5, 1.5), bias ~ N(0, 0.1), running_mean ~ N(0, 0.1), running_var ~ U(0.5, 2.0),
    drawn in float64 from a private generator, so two models with the same structure get the
    same values whatever their dtype, device or memory format.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                continue
            c = module.running_mean.numel() if isinstance(module, FrozenBatchNorm2d) else module.num_features
            values = {
                "weight": _uniform((c,), 0.5, 1.5, g),
                "bias": torch.randn((c,), generator=g, dtype=torch.float64) * 0.1,
                "running_mean": torch.randn((c,), generator=g, dtype=torch.float64) * 0.1,
                "running_var": _uniform((c,), 0.5, 2.0, g),
            }
            for name, value in values.items():
                target = getattr(module, name)
                if target is not None:
                    target.copy_(value.to(target.dtype))
    return model


def randn(*shape, seed: int = 0, dtype=torch.float32, layout: str = "nchw", channels_last: bool = False,
          scale: float = 1.0, shift: float = 0.0, device="cpu") -> torch.Tensor:
    """Standard normal values drawn in float64 from `seed` (the same numbers for every dtype), times
    `scale` plus `shift`, then cast; a 4-d tensor in `layout` (a LAYOUTS key; channels_last=True means
    "channels_last")."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)
    layout = "channels_last" if channels_last else layout
    return t.contiguous(memory_format=LAYOUTS[layout]) if t.dim() == 4 else t


# ---------------------------------------------------------------------------------------------
# the op tests' implementations (tests/test_<op>.py): skip marks and each implementation's inputs
# ---------------------------------------------------------------------------------------------

triton_only = pytest.mark.skipif("triton" not in fastres.available_backends(),
                                 reason="the Triton backend is not available here")
cpp_only = pytest.mark.skipif("cpp" not in fastres.available_backends(), reason="fastres._C is not built")

# The Triton tests' device: the GPU, or without one the CPU, where the kernels run in Triton's
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1; every program costs ms: shapes stay tiny).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_randn = functools.partial(randn, device=TRITON_DEVICE)
# The cpp tests' inputs: float64 unless told otherwise (gradcheck, float64 references).
randn64 = functools.partial(randn, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------

def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float64)."""
    a, b = actual.detach().double(), expected.detach().double()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    if scale == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / scale


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: Optional[float] = None,
                     what: str = "") -> None:
    """(actual - expected).abs().max() <= rtol * expected.abs().max(); rtol from the dtype by default."""
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual).__name__}, expected a Tensor"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if rtol is None:
        rtol = TOLERANCE["model"][expected.dtype]
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    a, b = actual.detach().double(), expected.detach().double()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    assert err <= rtol * scale, (
        f"{what}: max abs error {err:.3g} > {rtol:.1g} x max|expected| {scale:.3g} (relative {rel_error(a, b):.3g})")


def assert_exactly_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {tuple(actual.shape)}/{actual.dtype} != {tuple(expected.shape)}/{expected.dtype}")
    assert torch.equal(actual, expected), f"{what}: values differ (max abs diff {(actual - expected).abs().max()})"


def assert_state_dicts_equal(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
                             what: str = "state_dict") -> None:
    assert list(actual.keys()) == list(expected.keys()), (
        f"{what}: keys differ; only in actual {sorted(set(actual) - set(expected))[:5]}, "
        f"only in expected {sorted(set(expected) - set(actual))[:5]}")
    for key in expected:
        assert_exactly_equal(actual[key], expected[key], f"{what}[{key}]")


def assert_as_accurate(actual: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor, rtol: float = 1e-4,
                       factor: float = 10.0, what: str = "") -> None:
    """fp32 `actual` is about as close to the float64 `exact` answer as torchvision's fp32 `reference`.

    Passes when |actual - reference| is within rtol of max|exact| (the well-conditioned case) or
    when |actual - exact| <= factor * |reference - exact| + rtol * max|exact| (an ill-conditioned
    tensor: torchvision itself is that far off, so fastres may round differently by as much).
    """
    assert actual.shape == reference.shape == exact.shape, f"{what}: shapes differ"
    assert actual.dtype == reference.dtype, f"{what}: dtype {actual.dtype} != {reference.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    a, r, e = actual.detach().double(), reference.detach().double(), exact.detach().double()
    scale = e.abs().max().item() if e.numel() else 0.0
    direct = (a - r).abs().max().item() if a.numel() else 0.0
    if direct <= rtol * scale:
        return
    err_actual = (a - e).abs().max().item()
    err_reference = (r - e).abs().max().item()
    assert err_actual <= factor * err_reference + rtol * scale, (
        f"{what}: fastres is {err_actual:.3g} from the float64 answer, torchvision fp32 only {err_reference:.3g} "
        f"(max|exact| {scale:.3g}; fastres-torchvision {direct:.3g})")


# ---------------------------------------------------------------------------------------------
# model pairs and one training step
# ---------------------------------------------------------------------------------------------

def build_pair(name: str, seed: int = 0, randomize: bool = True, **kwargs):
    """(torchvision model, fastres model) built from the same seed, BN randomized identically."""
    import torchvision.models as tvm

    import fastres

    torch.manual_seed(seed)
    tv = getattr(tvm, name)(**kwargs)
    torch.manual_seed(seed)
    fr = getattr(fastres, name)(**kwargs)
    if randomize:
        randomize_bn_(tv, seed + 1)
        randomize_bn_(fr, seed + 1)
    return tv, fr


def named_tensors(model: nn.Module):
    """Parameters then buffers, by state_dict-style name."""
    return list(model.named_parameters()) + list(model.named_buffers())


def train_step(model: nn.Module, x: torch.Tensor, seed: int = 7, layer_hooks: bool = False):
    """One training-mode forward + backward of `model` on a copy of `x` with requires_grad.

    The loss is a random linear function of the logits (and, with layer_hooks, of every
    layerN output too, which exercises the blocks' backward with a non-degenerate gradient).
    Returns (output, input gradient, {param name: grad} (parameters that require one), {buffer name: value}),
    all detached.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    feats = []
    handles = []
    if layer_hooks:
        for i in range(1, 5):
            layer = getattr(model, f"layer{i}", None)
            if layer is not None:
                handles.append(layer.register_forward_hook(lambda m, inp, out: feats.append(out)))
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
    g = torch.Generator().manual_seed(seed)
    loss = (torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype) * y).sum()
    for f in feats:
        loss = loss + (torch.randn(f.shape, generator=g, dtype=torch.float64).to(f.dtype) * f).sum()
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:   # frozen (e.g. a detection backbone's first layers): no gradient by design
            assert p.grad is None, f"frozen parameter {name} got a gradient"
            continue
        assert p.grad is not None, f"parameter {name} got no gradient"
        grads[name] = p.grad.detach().clone()
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return y.detach(), x.grad.detach().clone(), grads, buffers


def compare_train_results(actual, expected, rtol: Optional[float] = None, what: str = "") -> None:
    y_a, gx_a, grads_a, bufs_a = actual
    y_e, gx_e, grads_e, bufs_e = expected
    assert_rel_close(y_a, y_e, rtol, f"{what} output")
    assert_rel_close(gx_a, gx_e, rtol, f"{what} input grad")
    assert list(grads_a) == list(grads_e), f"{what}: parameter names differ"
    for name in grads_e:
        assert_rel_close(grads_a[name], grads_e[name], rtol, f"{what} grad {name}")
    assert list(bufs_a) == list(bufs_e), f"{what}: buffer names differ"
    for name in bufs_e:
        if bufs_e[name].is_floating_point():
            assert_rel_close(bufs_a[name], bufs_e[name], rtol, f"{what} buffer {name}")
        else:
            assert_exactly_equal(bufs_a[name], bufs_e[name], f"{what} buffer {name}")


def compare_train_accuracy(actual, reference, exact, what: str = "") -> None:
    """fp32 train results of fastres vs torchvision fp32, judged against torchvision float64."""
    y_a, gx_a, grads_a, bufs_a = actual
    y_r, gx_r, grads_r, bufs_r = reference
    y_e, gx_e, grads_e, bufs_e = exact
    assert_as_accurate(y_a, y_r, y_e, what=f"{what} output")
    assert_as_accurate(gx_a, gx_r, gx_e, what=f"{what} input grad")
    for name in grads_r:
        assert_as_accurate(grads_a[name], grads_r[name], grads_e[name], what=f"{what} grad {name}")
    for name in bufs_r:
        if bufs_r[name].is_floating_point():
            assert_as_accurate(bufs_a[name], bufs_r[name], bufs_e[name], what=f"{what} buffer {name}")
        else:
            assert_exactly_equal(bufs_a[name], bufs_r[name], f"{what} buffer {name}")


def eval_output(model: nn.Module, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
    model.eval()
    if grad:
        return model(x)
    with torch.no_grad():
        return model(x)


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def same_storage(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> bool:
    ptrs = {t.untyped_storage().data_ptr() for t in a if t.numel()}
    return any(t.untyped_storage().data_ptr() in ptrs for t in b if t.numel())


def backend_scope(name: str):
    """`fastres.use_backend(name)`, or nothing for "default" (whatever the process default is)."""
    import fastres
    return contextlib.nullcontext() if name == "default" else fastres.use_backend(name)


def eval_on(model: nn.Module, x: torch.Tensor, backend: str = "default") -> torch.Tensor:
    """model(x) in eval mode under no_grad, on `backend`."""
    model.eval()
    with backend_scope(backend), torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------------------------------
# fastres model against its torchvision twin (the test_models_*.py files). CPU-sized on purpose:
# small inputs (eval 37x45 / 32x32, training 48x48 at batch 2, the smallest that keeps BatchNorm in
# layer4 well defined) and num_classes=10 for the zoo.
# ---------------------------------------------------------------------------------------------

TRAIN_RTOL64 = TOLERANCE["train"][torch.float64]

BACKENDS = ["default", "torch"]  # the model tests' backends: the default choice and the plain reference
EVAL_INPUTS = [((1, 3, 37, 45), False), ((1, 3, 37, 45), True), ((2, 3, 32, 32), False), ((2, 3, 32, 32), True)]
TRAIN_SHAPE = (2, 3, 48, 48)   # layer4 at 2x2: 8 values per channel


def tv_model(name="resnet18", seed=0, **kwargs):
    """A torchvision model built from `seed`, with random BatchNorm state."""
    import torchvision.models as tvm
    torch.manual_seed(seed)
    return randomize_bn_(getattr(tvm, name)(**kwargs), seed + 1)


def assert_eval_matches(tv, fr, shapes=EVAL_INPUTS, backend="default", dtype=torch.float32, what=""):
    for i, (shape, channels_last) in enumerate(shapes):
        x = randn(*shape, seed=10 + i, dtype=dtype, channels_last=channels_last)
        expected = eval_on(tv, x)
        actual = eval_on(fr, x, backend)
        assert_rel_close(actual, expected, what=f"{what} eval {shape} channels_last={channels_last} [{backend}]")


def train_both(tv, fr, x, backend="default", layer_hooks=True):
    """One training step of (copies of) both models; returns (fastres results, torchvision results)."""
    expected = train_step(copy.deepcopy(tv), x, layer_hooks=layer_hooks)
    with backend_scope(backend):
        actual = train_step(copy.deepcopy(fr), x, layer_hooks=layer_hooks)
    return actual, expected


def assert_train_matches(tv, fr, x, backend="default", fp32_direct=False, what=""):
    """float64: fastres == torchvision to 1e-8. fp32: as accurate as torchvision fp32 (or direct 1e-4).
    The models are not modified (each step runs on a copy)."""
    x64 = x.double()
    exact = train_step(copy.deepcopy(tv).double(), x64, layer_hooks=True)
    with backend_scope(backend):
        actual64 = train_step(copy.deepcopy(fr).double(), x64, layer_hooks=True)
    compare_train_results(actual64, exact, TRAIN_RTOL64, f"{what} float64 [{backend}]")
    del actual64
    actual32, reference32 = train_both(tv, fr, x, backend)
    if fp32_direct:
        compare_train_results(actual32, reference32, TOLERANCE["model"][torch.float32], f"{what} fp32 [{backend}]")
    else:
        compare_train_accuracy(actual32, reference32, exact, f"{what} fp32 [{backend}]")
