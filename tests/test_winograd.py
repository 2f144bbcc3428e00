"""Winograd F(2x2, 3x3) and F(4x4, 3x3) for the CPU fast path (csrc/cpu/winograd.cpp, fastres/ops/winograd.py).

The kernel against float64 convolutions at odd shapes (partial edge tiles, 1x1 images, batch 1
and 3, channels that are not powers of two), with each tile size's accuracy; the routing (which
convolutions take it and with which tile, and that a ResNet really does), non-finite operands,
weight edits, and the kernel's own argument checks.
The kernel is built for AVX-512 and for AVX2 + FMA; the kernel tests run on every one of them this
CPU has (both on an AVX-512 machine), the routing tests on the one the fast path picks. On a CPU
with neither (or without fastres._C) these tests skip.
"""
from __future__ import annotations

import pytest
import torch

from fastres import ops
from fastres.ops import onednn, winograd

from helpers import TOLERANCE, assert_rel_close, build_pair, eval_on, randn
from reference_math import assert_close, conv2d_act as conv2d_act_ref

pytestmark = pytest.mark.skipif(not (onednn.AVAILABLE and winograd.available()),
                                reason="Winograd needs fastres._C, oneDNN and an x86-64 CPU with AVX2 + FMA or AVX-512")
ISAS = winograd.supported_isas()


@pytest.fixture
def any_size(monkeypatch):
    """Route every eligible convolution to Winograd, however few tiles it has (tests use small images)."""
    monkeypatch.setattr(winograd, "MIN_TILES_PER_THREAD", dict.fromkeys(ISAS, 0))


@pytest.fixture
def winograd_calls(monkeypatch, any_size):
    calls = []
    original = winograd.conv3x3

    def counting(x, *args):
        calls.append(tuple(x.shape))
        return original(x, *args)

    monkeypatch.setattr(winograd, "conv3x3", counting)
    return calls


def _operands(n, cin, h, w, cout, seed=0):
    x = randn(n, cin, h, w, seed=seed, channels_last=True)
    weight = randn(cout, cin, 3, 3, seed=seed + 1) / (3 * cin ** 0.5)
    bias = randn(cout, seed=seed + 2)
    residual = randn(n, cout, h, w, seed=seed + 3, channels_last=True)
    return x, weight, bias, residual


# (N, Cin, H, W, Cout): partial tiles on either edge, single pixels, 2 panels of 32, 96 outputs
SHAPES = [(1, 16, 7, 7, 32), (3, 48, 13, 17, 64), (1, 32, 1, 1, 32), (3, 16, 2, 3, 96), (1, 64, 8, 5, 32),
          (3, 80, 6, 11, 160)]


TILE_TOLERANCE = {tile: TOLERANCE[f"winograd{tile}"][torch.float32] for tile in (2, 4)}


def assert_within(actual, expected, rtol, what):
    error = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert torch.isfinite(actual).all() and error <= rtol * scale, f"{what}: error {error:.3g} > {rtol} x {scale:.3g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias,residual,relu", [(True, True, True), (True, False, True), (False, False, False),
                                                (False, True, False)])
def test_kernel_matches_float64(shape, bias, residual, relu, tile, isa):
    x, weight, b, r = _operands(*shape)
    b, r = (b if bias else None), (r if residual else None)
    y = winograd.conv3x3(x, winograd.pack_weight(weight, tile), b, r, relu, isa)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.float32
    expected = conv2d_act_ref(x, weight, b, padding=1, residual=r, relu=relu)
    assert_within(y, expected, TILE_TOLERANCE[tile], f"F({tile}x{tile}) {shape}")
    if relu:  # the ReLU really ran: some outputs were negative before it
        assert (y == 0).any()


@pytest.mark.parametrize("h,w,tile", [(8, 12, 4), (28, 28, 4), (7, 7, 2), (14, 14, 2), (8, 6, 2)])
def test_tile_size_follows_the_image(h, w, tile, monkeypatch):
    monkeypatch.delenv("FASTRES_WINOGRAD", raising=False)
    assert winograd.tile_size(torch.empty(1, 16, h, w)) == tile
    monkeypatch.setenv("FASTRES_WINOGRAD", "2")
    assert winograd.tile_size(torch.empty(1, 16, h, w)) == 2


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("tile", [2, 4])
def test_kernel_relu_keeps_nan(tile, isa):
    # Callers route non-finite operands away, but the fused ReLU itself must not turn NaN into 0.
    x, weight, bias, _ = _operands(1, 16, 4, 4, 32)
    x[0, 3, 1, 2] = float("nan")
    y = winograd.conv3x3(x, winograd.pack_weight(weight, tile), bias, None, True, isa)
    assert torch.isnan(y[0, :, 1, 2]).all()


@pytest.mark.parametrize("hw", [(9, 13), (8, 12)], ids=["F2x2", "F4x4"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv2d_act_takes_winograd_and_matches(winograd_calls, layout, hw):
    x, weight, bias, residual = _operands(3, 32, *hw, 64, seed=5)
    if layout == "nchw":
        x, residual = x.contiguous(), residual.contiguous()
    with torch.no_grad():
        y = ops.conv2d_act(x, weight, bias, stride=1, padding=1, residual=residual, relu=True)
    assert len(winograd_calls) == (1 if layout == "channels_last" else 0)  # the fast path is channels_last only
    assert_within(y, conv2d_act_ref(x, weight, bias, padding=1, residual=residual), TILE_TOLERANCE[4], layout)


@pytest.mark.parametrize("case", ["stride2", "dilation2", "groups2", "cout48", "cin24", "kernel5", "padding0",
                                  "requires_grad"])
def test_other_convolutions_stay_on_onednn(winograd_calls, case):
    cin, cout = (24 if case == "cin24" else 32), (48 if case == "cout48" else 64)
    k = 5 if case == "kernel5" else 3
    groups = 2 if case == "groups2" else 1
    x = randn(2, cin, 11, 12, seed=3, channels_last=True)
    weight = randn(cout, cin // groups, k, k, seed=4) / 10
    kwargs = dict(stride=2 if case == "stride2" else 1, padding=0 if case == "padding0" else k // 2,
                  dilation=2 if case == "dilation2" else 1, groups=groups)
    if case == "dilation2":
        kwargs["padding"] = 2
    weight.requires_grad_(case == "requires_grad")
    y = ops.conv2d_act(x, weight, None, relu=True, **kwargs)
    assert winograd_calls == []
    assert_close(y.detach(), conv2d_act_ref(x, weight.detach(), **kwargs), what=case)


def test_few_tiles_stay_on_onednn(winograd_calls, monkeypatch):
    monkeypatch.setattr(winograd, "MIN_TILES_PER_THREAD", dict.fromkeys(ISAS, 1000))
    x, weight, bias, _ = _operands(1, 32, 8, 8, 32)
    with torch.no_grad():
        ops.conv2d_act(x, weight, bias, padding=1, relu=True)
    assert winograd_calls == []


@pytest.mark.parametrize("where", ["x", "residual", "weight", "bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_operands_give_torch_result(winograd_calls, where, value):
    # One Inf inside Winograd's transform would spread NaN over its tile; such calls take the exact path.
    x, weight, bias, residual = _operands(1, 16, 6, 6, 32, seed=9)
    poisoned = {"x": x, "residual": residual, "weight": weight, "bias": bias}[where]
    poisoned[(0,) * (poisoned.dim() - 1) + (2,)] = value
    with torch.no_grad():
        y = ops.conv2d_act(x, weight, bias, padding=1, residual=residual, relu=False)
    expected = conv2d_act_ref(x, weight, bias, padding=1, residual=residual, relu=False)
    assert winograd_calls == []
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(y), kind(expected)), f"{kind.__name__} positions differ"


@pytest.mark.parametrize("hw", [(7, 9), (8, 8)], ids=["F2x2", "F4x4"])
def test_in_place_weight_edit_repacks(winograd_calls, hw):
    x, weight, bias, _ = _operands(2, 16, *hw, 32, seed=11)
    with torch.no_grad():
        ops.conv2d_act(x, weight, bias, padding=1, relu=False)
        weight.mul_(-2.0)  # same tensor, new version: the packed transform must not be reused
        y = ops.conv2d_act(x, weight, bias, padding=1, relu=False)
    assert len(winograd_calls) == 2
    assert_within(y, conv2d_act_ref(x, weight, bias, padding=1, relu=False), TILE_TOLERANCE[4], "after weight.mul_")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(37, 45), (64, 64)], ids=["F2x2", "F4x4-layers1-3"])
def test_models_take_winograd_and_match_torchvision(winograd_calls, name, channels_last, size):
    tv, fr = build_pair(name, num_classes=10)
    x = randn(3, 3, *size, seed=2, channels_last=channels_last)
    expected, actual = eval_on(tv, x), eval_on(fr, x)
    # every stride-1 3x3 convolution takes Winograd (resnet18: 13 of its 16 3x3s; resnet50: 13 of 16)
    stride1_3x3 = sum(1 for m in tv.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
                      and m.stride == (1, 1))
    assert len(winograd_calls) == stride1_3x3 > 0
    assert_rel_close(actual, expected, TOLERANCE["model"][torch.float32], what=f"{name} eval")


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setattr(winograd, "_available", None)
    monkeypatch.setenv("FASTRES_WINOGRAD", "0")
    assert not winograd.available()
    monkeypatch.setattr(winograd, "_available", None)
    monkeypatch.delenv("FASTRES_WINOGRAD")
    assert winograd.available()


def test_kernel_rejects_bad_arguments():
    x, weight, bias, residual = _operands(1, 16, 5, 5, 32)
    packed = winograd.pack_weight(weight)
    op = torch.ops.fastres.conv3x3_winograd
    cases = {
        "channels_last": (x.contiguous(), packed, bias, None, True),
        "packed_weight": (x, weight, bias, None, True),
        "input channels": (randn(1, 32, 5, 5, channels_last=True), packed, bias, None, True),
        "bias": (x, packed, bias[:16], None, True),
        "residual": (x, packed, bias, residual[:, :16], True),
        "float32": (x.double(), packed, bias, None, True),
    }
    for expected_words, args in cases.items():
        with pytest.raises(RuntimeError, match=expected_words):
            op(*args)


@pytest.mark.parametrize("tile", [2, 4])
def test_instruction_sets_agree(tile):
    # Both builds of one kernel source sum in the same order per output: the same bits where both run.
    if len(ISAS) < 2:
        pytest.skip("this CPU runs only one of the kernel's instruction sets")
    x, weight, bias, residual = _operands(3, 48, 13, 17, 64, seed=21)
    packed = winograd.pack_weight(weight, tile)
    results = [winograd.conv3x3(x, packed, bias, residual, True, isa) for isa in ISAS]
    assert all(torch.equal(results[0], other) for other in results[1:])


@pytest.mark.parametrize("capability,expected", [("AVX512", ("avx512", "avx2")), ("AVX2", ("avx2",)),
                                                 ("DEFAULT", ()), ("ZVECTOR", ())])
def test_fast_path_follows_torch_cpu_capability(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    winograd.supported_isas.cache_clear()
    try:
        assert winograd.supported_isas() == expected
        if expected:
            assert winograd.isa() == expected[0]
        else:
            with pytest.raises(RuntimeError, match="no instruction set of the kernel"):
                winograd.isa()
    finally:
        winograd.supported_isas.cache_clear()
    assert torch.ops.fastres.conv3x3_winograd.default._schema.arguments[-1].name == "isa"


def _hardware_has_avx512() -> bool:
    """What the kernel's own check sees (the CPU itself), whatever ATEN_CPU_CAPABILITY told torch."""
    with open("/proc/cpuinfo") as cpuinfo:
        return any(line.startswith("flags") and " avx512f" in line for line in cpuinfo)


def test_kernel_rejects_unknown_or_missing_instruction_set():
    x, weight, bias, _ = _operands(1, 16, 5, 5, 32)
    packed = winograd.pack_weight(weight)
    op = torch.ops.fastres.conv3x3_winograd
    with pytest.raises(RuntimeError, match='isa must be "auto", "avx512" or "avx2", got "sse2"'):
        op(x, packed, bias, None, True, "sse2")
    if not _hardware_has_avx512():  # asking for AVX-512 on a CPU without it is an error, not a crash
        with pytest.raises(RuntimeError, match="has no avx512 kernel"):
            op(x, packed, bias, None, True, "avx512")
    widest = "avx512" if _hardware_has_avx512() else "avx2"  # what "auto" picks
    assert torch.equal(op(x, packed, bias, None, True), op(x, packed, bias, None, True, widest))
