"""norm_conv (NormConv training): conv of relu?(x * scale + shift) emitting y's batch statistics.

The Triton implementation (PROLOGUE / STATS switches of the one conv kernel) runs in Triton's
interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), against the float64
reference (backend "torch" on float64 copies): outputs, every gradient (x, weight, scale, shift,
through mean and invstd too), running buffers over several steps (momentum and momentum=None),
NaN propagation, registration (opcheck, fake tensors), the dispatch's coverage, the ResNet chain
against torchvision and torch.compile. Shapes stay tiny: every interpreted program costs ms.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import fastres
from fastres.nn import bn_prologue, conv_bn_stats
from fastres.ops import dispatch, registry

from helpers import LAYOUTS, TRITON_DEVICE as DEVICE, triton_only, triton_randn as _randn
from reference_math import assert_close


CASES = [  # (N, C, H, W, K, kernel, stride, padding, groups, prologue, relu)
    (3, 13, 7, 7, 24, 3, 1, 1, 1, True, True),
    (1, 16, 13, 17, 20, 1, 1, 0, 1, False, False),
    (3, 20, 13, 17, 24, 3, 2, 1, 1, True, True),
    (1, 24, 7, 7, 12, 3, 1, 1, 4, True, False),
    (1, 3, 15, 17, 16, 7, 2, 3, 1, True, True),  # the stem's packed-K path
    (3, 24, 5, 7, 40, 1, 1, 0, 1, True, True),  # 1x1 stride 1: the [N*H*W, C] operand
]


def _case_id(case) -> str:
    return "x".join(map(str, case[:9])) + ("p" if case[9] else "") + ("r" if case[10] else "")


def _case(case, dtype, layout):
    n, c, h, w, k, ks, stride, pad, groups, prologue, relu = case
    x = _randn(n, c, h, w, dtype=dtype, layout=layout, seed=1, scale=2.0, shift=0.3)
    weight = _randn(k, c // groups, ks, ks, dtype=dtype, seed=2, scale=(c // groups * ks * ks) ** -0.5)
    scale = _randn(c, seed=3, scale=0.3, shift=0.8) if prologue else None
    shift = _randn(c, seed=4, scale=0.5) if prologue else None
    rm, rv = _randn(k, seed=5, scale=0.1), _randn(k, seed=6).abs() + 0.5
    return x, weight, scale, shift, rm, rv, dict(stride=stride, padding=pad, groups=groups, relu=relu)


def _run(backend, x, weight, scale, shift, rm, rv, kw, momentum=0.3):
    """(y, mean, invstd, grads of x/weight/scale/shift) for a loss reading all three outputs."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, scale, shift)]
    with fastres.use_backend(backend):
        y, mean, invstd = fastres.ops.norm_conv(leaves[0], leaves[1], kw["stride"], kw["padding"], 1, kw["groups"],
                                                scale=leaves[2], shift=leaves[3], relu=kw["relu"], running_mean=rm,
                                                running_var=rv, momentum=momentum)
    g = torch.Generator().manual_seed(9)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE) for t in (y, mean, invstd)]
    sum((t.double() * w).sum() for t, w in zip((y, mean, invstd), weights)).backward()
    return [y, mean, invstd] + [t.grad if t is not None else None for t in leaves]


@triton_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_float64(case, dtype, layout):
    x, weight, scale, shift, rm, rv, kw = _case(case, dtype, layout)
    buffers = rm.clone(), rv.clone()
    got = _run("triton", x, weight, scale, shift, *buffers, kw)
    ref_buffers = rm.double(), rv.double()
    ref = _run("torch", *(t.double() if t is not None else None for t in (x, weight, scale, shift)),
               *ref_buffers, kw)
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=LAYOUTS[layout])
    assert got[1].dtype == got[2].dtype == torch.float32
    names = ["y", "mean", "invstd", "grad x", "grad weight", "grad scale", "grad shift"]
    for name, a, b in zip(names, got, ref):
        if b is not None:
            assert_close(a, b, dtype, name)
    assert_close(buffers[0], ref_buffers[0], dtype, "running_mean")  # statistics of y as stored in dtype
    assert_close(buffers[1], ref_buffers[1], dtype, "running_var")


@triton_only
def test_every_config_and_bitwise_repeatable():
    """Every configuration auto may time (the interpreter's list forces a split-K one) gives the same
    statistics, and a configuration run twice gives the same bits (fixed merge order, no atomics)."""
    from fastres.kernels.triton import conv
    x, weight, scale, shift, _, _, kw = _case(CASES[2], torch.float32, "channels_last")
    expected = _run("torch", x.double(), weight.double(), scale.double(), shift.double(), None, None, kw)
    configs = conv.configs(x, weight, (2, 2), (1, 1), (1, 1), 1)
    assert len(configs) >= 3 and any(conv.Config.parse(c).split_k > 1 for c in configs[1:])
    for config in configs:
        first = registry.triton_norm_conv(x, weight, scale, shift, True, [2, 2], [1, 1], [1, 1], 1, config)
        again = registry.triton_norm_conv(x, weight, scale, shift, True, [2, 2], [1, 1], [1, 1], 1, config)
        assert all(torch.equal(a, b) for a, b in zip(first, again)), config
        assert_close(first[0], expected[0], torch.float32, f"y [{config}]")
        assert_close(first[1], expected[1], torch.float32, f"mean [{config}]")
        assert_close(first[2], expected[0].var((0, 2, 3), unbiased=False), torch.float32, f"var [{config}]")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_buffers_over_steps_match_batchnorm2d(backend, momentum):
    """Three training steps through the module-level helper: running mean/var and num_batches_tracked
    exactly as nn.BatchNorm2d after the same conv (float64 reference), momentum=None included."""
    conv = torch.nn.Conv2d(13, 24, 3, padding=1, bias=False).to(DEVICE)
    bn = torch.nn.BatchNorm2d(24, momentum=momentum).to(DEVICE).train()
    ref_conv, ref_bn = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    for step in range(3):
        x = _randn(3, 13, 7, 9, seed=10 + step, scale=2.0, shift=0.5, layout="channels_last")
        with fastres.use_backend(backend):
            y, mean, invstd = conv_bn_stats(conv, bn, x)
        expected = ref_bn(ref_conv(x.double()))
        yd = ref_conv(x.double())
        assert_close(mean, yd.mean((0, 2, 3)), torch.float32, "mean")
        assert_close(invstd, (yd.var((0, 2, 3), unbiased=False) + bn.eps).rsqrt(), torch.float32, "invstd")
        assert_close(bn_prologue(bn, mean, invstd, relu=False)[0].reshape(1, -1, 1, 1) * y
                     + bn_prologue(bn, mean, invstd, relu=False)[1].reshape(1, -1, 1, 1), expected.detach(),
                     torch.float32, "normalised")
    assert_close(bn.running_mean, ref_bn.running_mean, torch.float32, "running_mean")
    assert_close(bn.running_var, ref_bn.running_var, torch.float32, "running_var")
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 3


@triton_only
def test_nan_propagates_like_the_reference():
    x, weight, scale, shift, _, _, kw = _case(CASES[0], torch.float32, "channels_last")
    x = x.clone()
    x[1, 4, 3, 3] = float("nan")
    with torch.no_grad():
        got = registry.triton_norm_conv(x, weight, scale, shift, True, [1, 1], [1, 1], [1, 1], 1)
        with fastres.use_backend("torch"):
            y, mean, invstd = fastres.ops.norm_conv(x.double(), weight.double(), 1, 1, scale=scale.double(),
                                                    shift=shift.double(), relu=True)
    assert torch.isnan(y).any() and torch.isnan(mean).all()
    assert torch.equal(torch.isnan(got[0]), torch.isnan(y))
    assert torch.equal(torch.isnan(got[1]), torch.isnan(mean)) and torch.equal(torch.isnan(got[2]),
                                                                              torch.isnan(invstd))


@triton_only
@pytest.mark.parametrize("layout", LAYOUTS)
def test_registration_opcheck_and_fake(layout):
    x = _randn(2, 8, 5, 7, seed=1, layout=layout)
    w, s, t = _randn(6, 8, 3, 3, seed=2, scale=0.2), _randn(8, seed=3).abs() + 0.5, _randn(8, seed=4)
    torch.library.opcheck(registry.triton_norm_conv, (x, w, s, t, True, [1, 1], [1, 1], [1, 1], 1))
    torch.library.opcheck(registry.triton_norm_conv, (x, w, None, None, False, [2, 2], [0, 0], [1, 1], 1))
    meta = torch.empty(3, 8, 13, 17, device="meta").contiguous(memory_format=LAYOUTS[layout])
    y, mean, var = registry.triton_norm_conv(meta, torch.empty(6, 8, 3, 3, device="meta"), None, None, False,
                                             [2, 2], [1, 1], [1, 1], 1)
    assert y.shape == (3, 6, 7, 9) and y.is_contiguous(memory_format=LAYOUTS[layout])
    assert mean.shape == var.shape == (6,) and mean.dtype == torch.float32


# ------------------------------------------------------------------ the backward kernels (wgrad, dgrad)

BACKWARD_CASES = CASES + [  # (N, C, H, W, K, kernel, stride, padding, groups, prologue, relu)
    (2, 16, 9, 11, 16, 1, 2, 0, 1, True, True),  # 1x1 stride 2: the odd phases reach no tap
    (3, 20, 6, 9, 36, 3, 2, 1, 1, False, False),  # stride 2, even sizes, no prologue (the block's first conv)
]


def _backward_reference(x, weight, scale, shift, g, kw, dilation=1):
    """float64 (dW, dx, d scale, d shift) of conv2d(relu?(x * scale + shift)) for the output gradient g."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, scale, shift)]
    a = leaves[0]
    if scale is not None:
        a = a * leaves[2].reshape(1, -1, 1, 1) + leaves[3].reshape(1, -1, 1, 1)
        a = torch.relu(a) if kw["relu"] else a
    torch.nn.functional.conv2d(a, leaves[1], None, kw["stride"], kw["padding"], dilation, kw["groups"]).backward(
        g.double())
    return [t.grad if t is not None else None for t in leaves]


def _backward_inputs(case, dtype, layout):
    x, weight, scale, shift, _, _, kw = _case(case, dtype, layout)
    h, w = x.shape[2:]
    ks = weight.shape[2]
    p = (h + 2 * kw["padding"] - ks) // kw["stride"] + 1
    q = (w + 2 * kw["padding"] - ks) // kw["stride"] + 1
    g = _randn(x.shape[0], weight.shape[0], p, q, dtype=dtype, layout=layout, seed=7)
    return x, weight, scale, shift, g, kw


def _conv_args(kw, dilation=1):
    return [[kw["stride"]] * 2, [kw["padding"]] * 2, [dilation] * 2, kw["groups"]]


@triton_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=_case_id)
def test_backward_kernels_match_float64(case, dtype, layout):
    """triton_norm_conv_wgrad (the prologue recomputed on load) and triton_norm_conv_dgrad (dReLU, dx and
    the scale/shift sums in its epilogue) against the float64 autograd of the same conv."""
    x, weight, scale, shift, g, kw = _backward_inputs(case, dtype, layout)
    ref = _backward_reference(x, weight, scale, shift, g, kw)
    conv = _conv_args(kw)
    dw = registry.triton_norm_conv_wgrad(g, x, weight, scale, shift, kw["relu"], *conv)
    dx, dscale, dshift = registry.triton_norm_conv_dgrad(g, x, weight, scale, shift, kw["relu"], *conv)
    assert dw.dtype == weight.dtype and dw.shape == weight.shape and dw.is_contiguous()
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(dw, ref[1], dtype, "grad weight")
    assert_close(dx, ref[0], dtype, "grad x")
    if scale is None:
        assert dscale.numel() == dshift.numel() == 0
    else:
        assert dscale.dtype == dshift.dtype == torch.float32
        assert_close(dscale, ref[2], dtype, "grad scale")
        assert_close(dshift, ref[3], dtype, "grad shift")


@triton_only
def test_backward_kernels_are_deterministic():
    """A forced wgrad pixel split (fp32 partials summed in split order) gives the unsplit result to rounding
    and the same bits when run again; the dgrad's outputs and sums repeat bitwise too."""
    from fastres.kernels.triton import conv_backward
    x, weight, scale, shift, g, kw = _backward_inputs(CASES[2], torch.float32, "channels_last")
    conv = [tuple(a) if isinstance(a, list) else a for a in _conv_args(kw)]
    prologue = (scale, shift, True)
    whole = conv_backward.conv2d_wgrad(g, x, weight, *conv, prologue)
    _, launches, reduce = conv_backward.wgrad_plan(g, x, weight, *conv, prologue, split=2)
    assert launches[0].grid[1] == 2 and reduce is not None
    first = conv_backward.conv2d_wgrad(g, x, weight, *conv, prologue, split=2)
    again = conv_backward.conv2d_wgrad(g, x, weight, *conv, prologue, split=2)
    assert torch.equal(first, again)
    assert_close(first, whole.double(), torch.float32, "split wgrad")
    dgrad = [conv_backward.conv2d_dgrad(g, x, weight, *conv, prologue) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*dgrad))  # the scale/shift sums: fixed tile order


SMALL_TILES = "m32n32k16w4s1x1g4"  # not a default anywhere: the chosen tiles are told apart from the default


@triton_only
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[4]], ids=_case_id)  # stride 2, groups 4, packed stem
def test_backward_kernels_take_the_tiles_they_are_given(case):
    """The backward tiles are a choice auto may time (NormConv config "forward|backward"): with other tiles
    the wgrad and dgrad give the float64 result and the launches carry those tiles (a packed wgrad keeps
    its 32-column step)."""
    from fastres.kernels.triton import conv_backward
    x, weight, scale, shift, g, kw = _backward_inputs(case, torch.float32, "channels_last")
    ref = _backward_reference(x, weight, scale, shift, g, kw)
    conv = _conv_args(kw)
    dw = registry.triton_norm_conv_wgrad(g, x, weight, scale, shift, kw["relu"], *conv, SMALL_TILES)
    dx, dscale, dshift = registry.triton_norm_conv_dgrad(g, x, weight, scale, shift, kw["relu"], *conv, SMALL_TILES)
    for got, want, name in ((dw, ref[1], "weight"), (dx, ref[0], "x"), (dscale, ref[2], "scale"),
                            (dshift, ref[3], "shift")):
        assert_close(got, want, torch.float32, f"grad {name}")
    plain = [tuple(a) if isinstance(a, list) else a for a in conv]
    prologue = (scale.float(), shift.float(), kw["relu"])
    wgrad = conv_backward.wgrad_plan(g, x, weight, *plain, prologue, config=SMALL_TILES)[1][0].constexprs
    dgrad = conv_backward.dgrad_plan(g, x, weight, *plain, prologue, config=SMALL_TILES)[1][0].constexprs
    assert (wgrad["BLOCK_M"], wgrad["BLOCK_N"], wgrad["BLOCK_K"]) == (32, 32, 16)
    assert (dgrad["BLOCK_M"], dgrad["BLOCK_N"], dgrad["BLOCK_K"]) == (32, 32, 16)
    with pytest.raises(ValueError, match="config"):
        conv_backward.wgrad_plan(g, x, weight, *plain, prologue, config="big")


@triton_only
def test_a_norm_conv_config_carries_its_backward_tiles(monkeypatch):
    """triton_norm_conv(config="forward|backward"): the forward runs the first tiles, the wgrad and dgrad
    of its backward the second; a config without "|" leaves the backward on its default tiles."""
    from fastres.kernels.triton import conv_backward
    seen = []
    for name in ("wgrad_plan", "dgrad_plan"):
        original = getattr(conv_backward, name)

        def spy(*args, original=original, name=name, **kwargs):
            seen.append((name, kwargs.get("config", args[-1] if len(args) > 8 else "")))
            return original(*args, **kwargs)
        monkeypatch.setattr(conv_backward, name, spy)
    x, weight, scale, shift, _, _, kw = _case(CASES[0], torch.float32, "channels_last")
    for config, expected in ((f"|{SMALL_TILES}", SMALL_TILES), ("", "")):
        seen.clear()
        leaves = [t.clone().requires_grad_() for t in (x, weight, scale, shift)]
        y, mean, var = registry.triton_norm_conv(*leaves, True, *_conv_args(kw), config)
        (y.double().square().sum() + mean.sum() + var.sum()).backward()
        assert sorted(seen) == [("dgrad_plan", expected), ("wgrad_plan", expected)], seen


@triton_only
def test_backward_tiles_are_offered_for_large_training_calls_only():
    """auto's NormConv candidates: the forward's tiles, and for a training call whose GEMMs are large
    16-bit ones also the default forward with the wide backward tiles (timed forward + backward)."""
    from fastres.kernels.triton import conv_backward
    from fastres.ops import implementations

    def call(c, k, n, dtype=torch.bfloat16, grad=True):
        x = torch.empty(n, c, 14, 14, device="meta", dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.empty(k, c, 3, 3, device="meta", dtype=dtype).requires_grad_(grad)
        return dispatch.Call("norm_conv", dict(x=x, weight=w, scale=None, shift=None, relu=False, stride=(1, 1),
                                               padding=(1, 1), dilation=(1, 1), groups=1, running_mean=None,
                                               running_var=None, momentum=0.1, eps=1e-5))
    big = implementations._triton_norm_conv_configs(call(256, 256, 64))
    assert f"|{conv_backward.WIDE}" in big and big[0] == ""
    assert all("|" not in c for c in big[:-1])
    for small in (call(64, 256, 64), call(256, 256, 2), call(256, 256, 64, torch.float32),
                  call(256, 256, 64, grad=False)):
        assert all("|" not in c for c in implementations._triton_norm_conv_configs(small))


@triton_only
def test_dgrad_not_covered_falls_back_and_stays_correct(monkeypatch):
    """Stride and dilation both > 1 is outside the dgrad's phase split: covers() says so, the backward runs
    torch's conv backward for dx (and the Triton wgrad for dW), and the gradients are still right."""
    from fastres.kernels.triton import conv_backward
    x = _randn(1, 16, 11, 11, seed=1, layout="channels_last")
    weight = _randn(8, 16, 3, 3, seed=2, scale=0.1)
    assert "not covered" in conv_backward.covers(x, weight, (2, 2), (2, 2), (2, 2), 1)
    assert conv_backward.covers(x, weight, (2, 2), (1, 1), (1, 1), 1) is None
    calls = []
    monkeypatch.setattr(registry, "triton_norm_conv_dgrad", lambda *a: calls.append("dgrad"))
    scale, shift = _randn(16, seed=3, scale=0.3, shift=0.8), _randn(16, seed=4, scale=0.5)
    leaves = [t.clone().requires_grad_() for t in (x, weight, scale, shift)]
    y, _, _ = registry.triton_norm_conv(*leaves, True, [2, 2], [2, 2], [2, 2], 1)
    g = _randn(*y.shape, seed=7)
    y.backward(g)
    ref = _backward_reference(x, weight, scale, shift, g, dict(stride=2, padding=2, groups=1, relu=True), dilation=2)
    assert not calls
    for name, got, want in zip(("x", "weight", "scale", "shift"), leaves, ref):
        assert_close(got.grad, want, torch.float32, f"grad {name}")


@triton_only
def test_triton_backward_never_runs_torch_conv_backward(monkeypatch):
    """The Triton NormConv's backward is its own kernels: aten's convolution_backward is never called and
    no relu(bn(x)) is recomputed in torch (the reference prologue is not called either)."""
    from fastres.ops import reference
    monkeypatch.setattr(registry, "_conv_grads", lambda *a: pytest.fail("torch conv backward ran"))
    monkeypatch.setattr(reference, "prologue", lambda *a: pytest.fail("torch recomputed the prologue"))
    x, weight, scale, shift, rm, rv, kw = _case(CASES[2], torch.float32, "channels_last")
    got = _run("triton", x, weight, scale, shift, rm.clone(), rv.clone(), kw)
    assert all(t is not None for t in got[3:])


@triton_only
def test_backward_nan_propagates_like_the_reference():
    x, weight, scale, shift, g, kw = _backward_inputs(CASES[0], torch.float32, "channels_last")
    x = x.clone()
    x[1, 4, 3, 3] = float("nan")
    ref = _backward_reference(x, weight, scale, shift, g, kw)
    conv = _conv_args(kw)
    dw = registry.triton_norm_conv_wgrad(g, x, weight, scale, shift, True, *conv)
    dx, dscale, dshift = registry.triton_norm_conv_dgrad(g, x, weight, scale, shift, True, *conv)
    for name, got, want in (("weight", dw, ref[1]), ("x", dx, ref[0]), ("scale", dscale, ref[2]),
                            ("shift", dshift, ref[3])):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
    assert torch.isnan(dscale).any() and torch.isnan(dw).any()


@triton_only
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_ops_opcheck_and_fake(layout):
    x, weight, scale, shift, g, kw = _backward_inputs(CASES[0], torch.float32, layout)
    conv = _conv_args(kw)
    for op in (registry.triton_norm_conv_wgrad, registry.triton_norm_conv_dgrad):
        torch.library.opcheck(op, (g, x, weight, scale, shift, True, *conv))
        torch.library.opcheck(op, (g, x, weight, None, None, False, *conv))
    meta = [t.to("meta") for t in (g, x, weight, scale)]
    dx, dscale, _ = registry.triton_norm_conv_dgrad(meta[0], meta[1], meta[2], meta[3], meta[3], True, *conv)
    assert dx.shape == x.shape and dx.is_contiguous(memory_format=LAYOUTS[layout]) and dscale.shape == (13,)
    a, b = scale, shift  # d loss / d y = gy + a * y + b, y and gy x-shaped here
    torch.library.opcheck(registry.triton_norm_conv_output_grad, (x.clone(), x, a, b))
    torch.library.opcheck(registry.triton_norm_conv_output_grad, (None, x, a, b))
    fake = registry.triton_norm_conv_output_grad(None, meta[1], meta[3], meta[3])
    assert fake.shape == x.shape and fake.is_contiguous(memory_format=LAYOUTS[layout])


def test_argument_checks():
    x, w = torch.randn(2, 8, 5, 7), torch.randn(6, 8, 3, 3)
    with pytest.raises(ValueError, match="together"):
        fastres.ops.norm_conv(x, w, scale=torch.ones(8))
    with pytest.raises(ValueError, match="prologue"):
        fastres.ops.norm_conv(x, w, relu=True)
    with pytest.raises(ValueError, match="8 elements"):
        fastres.ops.norm_conv(x, w, scale=torch.ones(6), shift=torch.ones(6))
    with pytest.raises(ValueError, match="one value per channel"):
        fastres.ops.norm_conv(torch.randn(1, 8, 3, 3), w)


def test_coverage_and_the_default_cpu_path():
    """reference everywhere; triton wherever its kernels run; cudnn_graph on CUDA only. On the CPU the
    default backend takes no fast norm_conv, so the ResNet blocks keep their phase-A training path."""
    x, w = torch.randn(2, 8, 5, 7), torch.randn(6, 8, 3, 3)
    args = dict(x=x, weight=w, scale=None, shift=None, relu=False, stride=(1, 1), padding=(1, 1),
                dilation=(1, 1), groups=1, running_mean=None, running_var=None, momentum=0.1, eps=1e-5)
    coverage = dispatch.coverage(dispatch.Call("norm_conv", args))
    assert coverage["reference"] is None and coverage["cudnn_graph"] is not None
    with fastres.use_backend("torch"):
        assert not dispatch.fast_path_covers("norm_conv", args)
    with fastres.use_backend("auto"):
        assert not dispatch.fast_path_covers("norm_conv", args)  # CPU: Triton only when asked for by name
    if "triton" in fastres.available_backends():
        with fastres.use_backend("triton"):
            assert dispatch.fast_path_covers("norm_conv", args)


def test_cpu_default_training_step_never_calls_norm_conv(monkeypatch):
    called = []
    original = dispatch.dispatch
    monkeypatch.setattr(dispatch, "dispatch", lambda op, args: called.append(op) or original(op, args))
    import fastres.ops.functional as functional
    monkeypatch.setattr(functional, "dispatch", dispatch.dispatch)
    model = fastres.resnet18(num_classes=3).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert "norm_conv" not in called and "batch_norm_act" in called


# ------------------------------------------------------------------ the ResNet chain

# The blocks whose tail (last conv + BN + shortcut + ReLU) the chain recomputes in the backward: every
# conv in it at most 64 multiply-adds per output (nn.fused.RECOMPUTE_MAX_MACS): ResNet-50's layer1
# (1x1 convs from 64 channels); none of ResNet-18's (3x3 last convs).
RECOMPUTED_TAILS = {"resnet50": ("layer1.0", "layer1.1", "layer1.2"), "resnet18": ()}


def _train_steps(model, xs):
    model.train()
    for x in xs:
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().mean().backward()
    return out, [p.grad for p in model.parameters()], [b.clone() for b in model.buffers()]


def _max_rel(a, b):
    return (a.double() - b.double()).abs().max().item() / (b.double().abs().max().item() + 1e-12)


def _chain_counter(monkeypatch, module, name, *more):
    """Record, per norm_conv call of the implementation `module.name` (and of further module, name
    pairs, into the same list), whether it had a prologue."""
    chained = []
    targets = [(module, name)] + list(zip(more[::2], more[1::2]))
    for module, name in targets:
        def counted(*args, original=getattr(module, name)):
            chained.append(args[2] is not None)
            return original(*args)
        monkeypatch.setattr(module, name, counted)
    return chained


def _assert_every_block_chained(model, chained, steps, name):
    """Every conv ran as a norm_conv each step: the stem's, each block's (all but its first with a BN
    prologue), each projection's; and the backward reran the recomputed tails' convs (conv3, with its
    prologue, and the projection)."""
    blocks = [m for m in model.modules() if isinstance(m, (fastres.BasicBlock, fastres.Bottleneck))]
    per_block = 3 if name == "resnet50" else 2
    projections = sum(b.downsample is not None for b in blocks)
    tails = [model.get_submodule(t) for t in RECOMPUTED_TAILS[name]]
    reruns = len(tails) + sum(t.downsample is not None for t in tails)
    assert len(chained) == steps * (1 + len(blocks) * per_block + projections + reruns)
    assert sum(chained) == steps * (len(blocks) * (per_block - 1) + len(tails))


@pytest.mark.parametrize("name,momentum", [("resnet18", 0.1), ("resnet50", 0.1), ("resnet50", None)])
def test_chain_is_exact_in_float64_over_steps(name, momentum, monkeypatch):
    """The NormConv chain's algebra (prologue scale/shift, statistics' gradients, running buffers,
    num_batches_tracked) against torchvision, exactly (float64), over three training steps: the chain is
    forced onto the reference norm_conv (float64 runs no kernel): torch's ops under NormConv's own
    autograd formula, which every implementation's backward shares, so this holds the formula against
    torchvision's autograd. The recomputed segments' reruns (the stem, resnet50's layer1 tails) update no
    buffer a second time, with momentum=None (a cumulative average over num_batches_tracked) too."""
    monkeypatch.setattr(dispatch, "fast_path_covers", lambda op, args: op == "norm_conv")
    chained = _chain_counter(monkeypatch, registry, "reference_norm_conv")
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(num_classes=5).double()
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    fr = fastres.from_torchvision(tv)
    xs = [_randn(2, 3, 48, 48, seed=3 + i, dtype=torch.float64) for i in range(3)]
    ref_out, ref_grads, ref_buffers = _train_steps(tv, xs)
    with fastres.use_backend("torch"):
        out, grads, buffers = _train_steps(fr, xs)
    _assert_every_block_chained(fr, chained, 3, name)
    assert _max_rel(out, ref_out) <= 1e-10
    for (pname, _), g, r in zip(fr.named_parameters(), grads, ref_grads):
        assert _max_rel(g, r) <= 1e-9, f"grad {pname}"
    for (bname, _), b, r in zip(fr.named_buffers(), buffers, ref_buffers):
        assert torch.equal(b, r) if b.dtype == torch.int64 else _max_rel(b, r) <= 1e-10, f"buffer {bname}"


@triton_only
@pytest.mark.parametrize("name,size", [("resnet18", 48), ("resnet50", 32)])  # resnet50: ~50 s interpreted
def test_training_step_on_triton_matches_torchvision(name, size, monkeypatch):
    """The chain on the Triton kernels (interpreter) in fp32, within 10x torchvision fp32's own error
    against torchvision float64 (BN at random init amplifies rounding), as phase A is held in
    tests/test_triton_kernels.py."""
    chained = _chain_counter(monkeypatch, registry, "triton_norm_conv")
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(num_classes=5).to(DEVICE)
    fr = fastres.from_torchvision(tv)
    exact = copy.deepcopy(tv).double()
    x = _randn(2, 3, size, size, seed=3, layout="channels_last")
    ref_out, ref_grads, ref_buffers = _train_steps(exact, [x.double()])
    tv_out, tv_grads, tv_buffers = _train_steps(tv, [x])
    with fastres.use_backend("triton"):
        out, grads, buffers = _train_steps(fr, [x])
    _assert_every_block_chained(fr, chained, 1, name)
    assert _max_rel(out, ref_out) <= 10 * _max_rel(tv_out, ref_out) + 1e-5
    for (pname, _), g, t, r in zip(fr.named_parameters(), grads, tv_grads, ref_grads):
        assert _max_rel(g, r) <= 10 * _max_rel(t, r) + 1e-4, f"grad {pname}"
    # buffers: 1e-4, or 10x torchvision fp32's own error where that is larger (resnet50 at 32x32: its
    # layer4 BNs see 2 values per channel)
    for (bname, _), b, t, r in zip(fr.named_buffers(), buffers, tv_buffers, ref_buffers):
        assert _max_rel(b, r) <= max(1e-4, 10 * _max_rel(t, r)), f"buffer {bname}"


@triton_only
def test_backward_outside_the_backend_context_reruns_the_same_kernels(monkeypatch):
    """A user's step: the forward under fastres.use_backend("triton") and autocast, the backward after
    both are left. The recomputed segment (the stem's BN + ReLU + max-pool) reruns on the kernels its
    forward took -- torch's checkpoint refuses a rerun whose tensors differ, which it did when the rerun
    dispatched on the backend current at backward time -- and every gradient is bitwise the one of the
    same step run wholly inside the contexts."""
    chained = _chain_counter(monkeypatch, registry, "triton_norm_conv")
    torch.manual_seed(0)
    model = fastres.resnet18(num_classes=5).to(DEVICE).train()
    x = _randn(2, 3, 16, 16, seed=3, layout="channels_last")

    def step(backward_inside: bool):
        model.zero_grad(set_to_none=True)
        with fastres.use_backend("triton"), torch.autocast(DEVICE, dtype=torch.bfloat16, cache_enabled=False):
            loss = model(x).float().square().mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    inside = step(True)
    calls = len(chained)
    outside = step(False)
    assert len(chained) == 2 * calls > 0  # the rerun took the Triton norm_conv both times
    for (name, _), a, b in zip(model.named_parameters(), inside, outside):
        assert torch.equal(a, b), f"grad {name}"


@triton_only
@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_chain_saves_exactly_the_tensors_it_drops(name):
    """What autograd saves for the backward, counted on fake CUDA tensors (batch 256, 224x224, bf16: no
    memory needed): the phase-A blocks save exactly what torchvision eager saves, and the NormConv chain
    saves less by exactly: the inner BNs' outputs relu(bn1(y1)) (and relu(bn2(y2))) of every block, the
    stem's relu(bn1(y)) and its max-pool's int64 indices (recomputed from conv1's output), and the conv
    outputs of each recomputed tail (conv3's and the projection's). The counted step peak (forward +
    backward, LiveBytes) is at least 25% below torchvision's."""
    from fastres.bench.memory import saved_activations_table
    (_, tv, tv_peak), (_, phase_a, phase_a_peak), (_, chain, chain_peak) = \
        saved_activations_table(name, 256, 224, torch.bfloat16)
    model = getattr(torchvision.models, name)().to("meta")
    dropped = []

    def drop(nbytes_per_element):
        return lambda m, i, out: dropped.append(out.numel() * nbytes_per_element)
    last = "bn3" if name == "resnet50" else "bn2"
    for module_name, module in model.named_modules():
        if module_name.startswith("layer") and module_name.split(".")[-1] in ("bn1", "bn2") and \
                not module_name.endswith(last):
            module.register_forward_hook(drop(2))  # relu(bn(y)) of an inner conv (bf16)
    for block in map(model.get_submodule, RECOMPUTED_TAILS[name]):
        for conv in (block.conv3, *([block.downsample[0]] if block.downsample is not None else [])):
            conv.register_forward_hook(drop(2))  # conv3's output, the projection conv's output
    model.bn1.register_forward_hook(drop(2))  # the stem's relu(bn1(y)) (ReLU in place)
    model.maxpool.register_forward_hook(drop(8))  # its int64 indices, one per output
    model(torch.empty(256, 3, 224, 224, device="meta"))
    assert phase_a == tv and phase_a_peak == tv_peak
    assert abs((tv - chain) - sum(dropped) / 2 ** 20) < 1.0, (tv, chain, sum(dropped) / 2 ** 20)
    assert chain_peak <= 0.75 * tv_peak, (chain_peak, tv_peak)
    # the same under autocast with float32 parameters, as the GPU check trains
    (_, _, tv_peak), _, (_, _, chain_peak) = saved_activations_table(name, 256, 224, torch.bfloat16, autocast=True)
    assert chain_peak <= 0.75 * tv_peak, ("autocast", chain_peak, tv_peak)


# ------------------------------------------------------------------ torch.compile

def _chain_step(x, w1, w2, bn_w, bn_b, r):
    """A loss through two chained norm_convs and the last one's normalisation, weighted by a fixed random
    r: the mean square of a normalised output alone is ~1 whatever the inputs, its gradients rounding
    noise."""
    y1, m1, i1 = fastres.ops.norm_conv(x, w1, 1, 1)
    scale = i1 * bn_w
    y2, m2, i2 = fastres.ops.norm_conv(y1, w2, 1, 0, scale=scale, shift=bn_b - m1 * scale, relu=True)
    return ((y2 - m2.reshape(1, -1, 1, 1)) * i2.reshape(1, -1, 1, 1) * r).sum()


@triton_only
def test_a_chain_on_the_reference_holds_what_the_triton_chain_holds(monkeypatch):
    """auto picks an implementation per call, so a chain may run some of its ops on the reference: they
    save what the Triton ones save (norm_conv: the raw input, y, the mean; batch_norm_act on given
    statistics: its input, which is the norm_conv output held anyway), not autograd's record of torch ops
    on float32 copies (a ResNet-50 step chained on the reference was counted at +100% against torchvision
    eager before). Counted on fake tensors (bf16 under autocast, as the GPU check trains)."""
    from fastres.bench.memory import saved_activations_table

    def table():  # [(torchvision), (backend torch), (backend triton)] as (saved MiB, step peak MiB)
        return [(saved, peak) for _, saved, peak in
                saved_activations_table("resnet18", 64, 224, torch.bfloat16, autocast=True)]

    tv, _, on_triton = table()
    monkeypatch.setattr(dispatch, "fast_path_covers", lambda op, args: op == "norm_conv")
    _, all_reference, _ = table()  # backend torch with the chain forced: every op the reference
    monkeypatch.setitem(dispatch._IMPLS, "norm_conv",
                        [impl for impl in dispatch.implementations("norm_conv") if impl.name == "reference"])
    _, _, norm_conv_reference = table()  # backend triton, norm_conv on the reference
    assert norm_conv_reference[0] == on_triton[0] < 0.75 * tv[0], (norm_conv_reference, on_triton, tv)
    assert norm_conv_reference[1] <= 0.75 * tv[1], (norm_conv_reference, tv)
    # Saved the same; not the peak: the reference BN apply's backward (torch autograd) makes float32
    # copies of the stem's conv output (here +8% over torchvision's peak; ResNet-50 at batch 256: -33%).
    assert abs(all_reference[0] - on_triton[0]) < 1.0, (all_reference, on_triton)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
def test_compile_fullgraph_training_step(backend):
    def leaves():
        return [_randn(3, 13, 7, 9, seed=1, layout="channels_last").requires_grad_(),
                _randn(16, 13, 3, 3, seed=2, scale=0.3).requires_grad_(),
                _randn(8, 16, 1, 1, seed=3, scale=0.3).requires_grad_(),
                (_randn(16, seed=4).abs() + 0.5).requires_grad_(), _randn(16, seed=5).requires_grad_()]
    eager, compiled = leaves(), leaves()
    r = _randn(3, 8, 7, 9, seed=6)
    with fastres.use_backend(backend):
        expected = _chain_step(*eager, r)
        expected.backward()
        torch._dynamo.reset()
        got = torch.compile(_chain_step, fullgraph=True, backend="aot_eager")(*compiled, r)
        got.backward()
    assert_close(got.detach(), expected.detach(), torch.float32, "loss")
    for a, b in zip(compiled, eager):
        assert_close(a.grad, b.grad, torch.float32, "grad")


def test_compile_fullgraph_model_training_step(monkeypatch):
    """A whole training step of a small Bottleneck ResNet on the chain -- the stem's and layer1's
    recomputed segments included -- compiled fullgraph: output, every gradient and buffer as eager's
    (which recomputes through torch.utils.checkpoint; compiled, the partitioner decides). The chain runs
    on the reference norm_conv here (the Triton operators' compile is test_compile_fullgraph_training_step)."""
    from fastres.ops import reference
    monkeypatch.setattr(dispatch, "fast_path_covers", lambda op, args: op == "norm_conv")
    # eager runs the reference under NormConv's autograd formula, compiled the torch ops themselves
    chained = _chain_counter(monkeypatch, registry, "reference_norm_conv", reference, "norm_conv")
    torch.manual_seed(0)
    # float64: the two sides compute the same gradients by different formulas, and layer4's BNs see 2
    # values per channel here (fp32 rounding there is ~10% of a BN weight's gradient, on either side)
    model = fastres.ResNet(fastres.Bottleneck, [1, 1, 1, 1], num_classes=5).double()
    twin = copy.deepcopy(model)
    x = _randn(2, 3, 32, 32, seed=3, layout="channels_last", dtype=torch.float64)
    with fastres.use_backend("torch"):
        out_e, grads_e, buffers_e = _train_steps(twin, [x])
        eager_calls, chained[:] = len(chained), []
        torch._dynamo.reset()
        out_c, grads_c, buffers_c = _train_steps(torch.compile(model, fullgraph=True, backend="aot_eager"), [x])
    assert eager_calls == 1 + 4 * 3 + 4 + 2  # stem, 4 blocks, 4 projections, layer1's tail rerun (conv3, projection)
    assert len(chained) == 1 + 4 * 3 + 4  # traced once, nothing rerun: the compiled graph holds the chain
    assert _max_rel(out_c, out_e) <= 1e-10
    for (pname, _), g, r in zip(model.named_parameters(), grads_c, grads_e):
        assert _max_rel(g, r) <= 1e-9, f"grad {pname}"
    for (bname, _), b, r in zip(model.named_buffers(), buffers_c, buffers_e):
        assert torch.equal(b, r) if b.dtype == torch.int64 else _max_rel(b, r) <= 1e-10, f"buffer {bname}"


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=triton_only)])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("which", ["all", "no_gy", "no_gmean", "no_gvar", "y_only"])
def test_output_grad_matches_float64_and_holds_one_float32_buffer(dtype, which, layout, fused):
    """norm_conv's backward turns the gradients of (y, mean, var) into d loss / d y: against the float64
    formula, in y's dtype and memory format, the incoming gradient (here always NCHW) untouched, and no
    more than one y-sized float32 temporary (plus the result) alive at once -- at ResNet-50's layer1 and
    batch 256 each such temporary is 822 MB; the Triton family's one-pass kernel (fused) none at all."""
    from fastres.bench.memory import LiveBytes

    g = torch.Generator().manual_seed(7)
    n, c, h, w = 3, 13, 7, 9
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y = torch.randn(n, c, h, w, generator=g).mul_(3).add_(5).to(dtype).contiguous(memory_format=fmt)
    mean = y.double().mean((0, 2, 3)).float()
    gy = None if which == "no_gy" else torch.randn(n, c, h, w, generator=g).to(dtype)
    gmean = None if which in ("no_gmean", "y_only") else torch.randn(c, generator=g)
    gvar = None if which in ("no_gvar", "y_only") else torch.randn(c, generator=g)
    gy_before = None if gy is None else gy.clone()
    count = n * h * w
    want = torch.zeros(n, c, h, w, dtype=torch.float64) if gy is None else gy.double()
    if gmean is not None:
        want = want + (gmean.double() / count).reshape(1, -1, 1, 1)
    if gvar is not None:
        centred = y.double() - mean.double().reshape(1, -1, 1, 1)
        want = want + (gvar.double() * 2 / count).reshape(1, -1, 1, 1) * centred
    with LiveBytes(hold=[t for t in (y, mean, gy, gmean, gvar) if t is not None]) as live:
        held = live.live
        got = registry.norm_conv_output_grad(gy, gmean, gvar, y, mean, fused=fused)
    assert got.dtype == y.dtype and got.shape == y.shape
    assert got is gy if which == "y_only" else got.is_contiguous(memory_format=fmt)  # y_only: gy passes through
    assert_close(got, want, dtype)
    if gy is not None:
        assert torch.equal(gy, gy_before)
    if gmean is not None or gvar is not None:
        one_f32, result = 4 * y.numel(), y.element_size() * y.numel()
        temporaries = 0 if fused and gvar is not None else one_f32  # the kernel covers calls with gvar
        assert live.peak - held <= temporaries + result + 64 * c * 4, (live.peak - held, temporaries + result)
