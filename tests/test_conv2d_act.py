"""conv2d_act (conv2d + bias + residual + ReLU) and its helper fold_bn, across implementations: every
available backend (auto, which on the CPU picks oneDNN or Winograd where they cover the call; the torch
reference; cpp; triton) against the float64 reference in every dtype, memory format and odd shape, and
gradchecks; the oneDNN path's weight packing; fold_bn's exactness; the cpp backend's float64 gradcheck
(with bottleneck_tail's); the Triton kernel (in Triton's interpreter without a GPU) against the torch
backend, outputs and gradients, in every configuration it offers, through its TMA and pointer operand
paths, split-K repeatability and its packed-weight cache; empty batches; and every op's bad-input errors
(the table is mostly conv2d_act's)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres import ops
from fastres.ops import registry

from helpers import CONV_CASES, LAYOUTS, cpp_only, randn as _randn, randn64, triton_only, triton_randn
from reference_math import assert_close, compare_with_torch_backend as _compare_with_torch_backend, \
    conv2d_act as conv2d_act_ref, random_bn_state

BACKENDS = fastres.available_backends()


# ------------------------------------------------------------------ every backend against float64

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (False, False), (True, False)])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv2d_act_matches_float64(case, residual, relu, dtype, layout, backend):
    n, c, h, w, k, ks, stride, pad, dil, groups = case
    x = _randn(n, c, h, w, dtype=dtype, layout=layout, seed=1)
    weight = _randn(k, c // groups, ks, ks, dtype=dtype, seed=2) * (c // groups * ks * ks) ** -0.5
    bias = _randn(k, dtype=dtype, seed=3)
    expected_shape = F.conv2d(x.double(), weight.double(), None, stride, pad, dil, groups).shape
    res = _randn(*expected_shape, dtype=dtype, layout=layout, seed=4) if residual else None
    with fastres.use_backend(backend), torch.no_grad():
        y = ops.conv2d_act(x, weight, bias, stride, pad, dil, groups, residual=res, relu=relu)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=LAYOUTS[layout]), "output must keep the input's memory format"
    assert_close(y, conv2d_act_ref(x, weight, bias, stride, pad, dil, groups, res, relu), dtype, "conv2d_act")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv2d_act_gradients(backend, layout):
    x = _randn(2, 6, 5, 7, dtype=torch.float64, layout=layout).requires_grad_()
    weight = _randn(8, 3, 3, 3, dtype=torch.float64, seed=2).requires_grad_()
    bias = _randn(8, dtype=torch.float64, seed=3).requires_grad_()
    res = _randn(2, 8, 3, 4, dtype=torch.float64, layout=layout, seed=4).requires_grad_()
    with fastres.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: ops.conv2d_act(a[0], a[1], a[2], 2, 1, 1, 2, residual=a[3], relu=True),
            (x, weight, bias, res))


def test_conv2d_act_fast_cpu_path_is_used_and_follows_weight_edits():
    """The oneDNN path packs weights once per shape; an in-place edit must repack, not reuse."""
    x = _randn(3, 16, 13, 17, layout="channels_last")
    weight = _randn(24, 16, 3, 3, seed=2) * 0.1
    bias = _randn(24, seed=3)
    with torch.no_grad():
        y1 = ops.conv2d_act(x, weight, bias, 1, 1)
        assert_close(y1, conv2d_act_ref(x, weight, bias, 1, 1), torch.float32, "first call")
        weight.mul_(-2.0)
        y2 = ops.conv2d_act(x, weight, bias, 1, 1)
        assert_close(y2, conv2d_act_ref(x, weight, bias, 1, 1), torch.float32, "after in-place weight edit")
        y3 = ops.conv2d_act(x[:1], weight, bias, 1, 1)  # a new batch size packs again
        assert_close(y3, conv2d_act_ref(x[:1], weight, bias, 1, 1), torch.float32, "new input shape")


# ------------------------------------------------------------------ fold_bn (BN folded into the conv)

@pytest.mark.parametrize("with_conv_bias", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_fold_bn_is_exact_in_float64(with_conv_bias, affine):
    g = torch.Generator().manual_seed(0)
    x = _randn(3, 13, 7, 9, dtype=torch.float64)
    conv_w = _randn(24, 13, 3, 3, dtype=torch.float64, seed=1)
    conv_b = _randn(24, dtype=torch.float64, seed=2) if with_conv_bias else None
    gamma, beta, mean, var = random_bn_state(24, g, torch.float64)
    if not affine:
        gamma = beta = None
    weight, bias = ops.fold_bn(conv_w, conv_b, gamma, beta, mean, var, 1e-3)
    expected = F.batch_norm(F.conv2d(x, conv_w, conv_b, padding=1), mean, var, gamma, beta, False, 0.0, 1e-3)
    assert_close(F.conv2d(x, weight, bias, padding=1), expected, torch.float64, "folded conv")


def test_fold_bn_runs_in_fp32_for_half_weights():
    g = torch.Generator().manual_seed(0)
    gamma, beta, mean, var = random_bn_state(8, g)
    weight, bias = ops.fold_bn(_randn(8, 4, 1, 1).half(), None, gamma.half(), beta.half(), mean.half(), var.half())
    assert weight.dtype == torch.float32 and bias.dtype == torch.float32


# ------------------------------------------------------------------ cpp (fastres._C)

@cpp_only
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_epilogue_and_tail_gradcheck(layout):
    x = randn64(2, 6, 5, 7, layout=layout, seed=1).requires_grad_()
    w = randn64(8, 3, 3, 3, seed=2).requires_grad_()
    b = randn64(8, seed=3).requires_grad_()
    res = randn64(2, 8, 3, 4, layout=layout, seed=4).requires_grad_()
    h = randn64(2, 4, 3, 4, layout=layout, seed=5).requires_grad_()
    w3, wd = randn64(8, 4, 1, 1, seed=6).requires_grad_(), randn64(8, 6, 1, 1, seed=7).requires_grad_()
    with fastres.use_backend("cpp"):
        assert torch.autograd.gradcheck(
            lambda *a: ops.conv2d_act(a[0], a[1], a[2], 2, 1, 1, 2, residual=a[3]), (x, w, b, res))
        assert torch.autograd.gradcheck(lambda *a: ops.bottleneck_tail(*a, stride=2), (h, w3, x, wd, b))


# ------------------------------------------------------------------ triton (the interpreter without a GPU)
# bf16 dots are wrong in the interpreter, so the launchers accumulate from fp32 operands there; bf16
# proper is checked on a GPU.

@triton_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv2d_act_forward_backward(case, dtype, layout, poisoned_outputs):
    n, c, h, w, k, ks, stride, pad, dil, groups = case
    x = triton_randn(n, c, h, w, dtype=dtype, layout=layout, seed=1)
    weight = triton_randn(k, c // groups, ks, ks, dtype=dtype, seed=2, scale=(c // groups * ks * ks) ** -0.5)
    bias = triton_randn(k, dtype=dtype, seed=3)
    out_shape = F.conv2d(x.double().cpu(), weight.double().cpu(), None, stride, pad, dil, groups).shape
    residual = triton_randn(*out_shape, dtype=dtype, layout=layout, seed=4)

    def fn(x, weight, bias, residual):
        return fastres.ops.conv2d_act(x, weight, bias, stride, pad, dil, groups, residual=residual, relu=True)

    _compare_with_torch_backend(fn, [x, weight, bias, residual], dtype)
    with fastres.use_backend("triton"), torch.no_grad():
        y = fn(x, weight, None, None)
    assert y.is_contiguous(memory_format=LAYOUTS[layout])


def _conv_case(case, dtype, layout, seed=1):
    n, c, h, w, k, ks, stride, pad, dil, groups = case
    x = triton_randn(n, c, h, w, dtype=dtype, layout=layout, seed=seed)
    weight = triton_randn(k, c // groups, ks, ks, dtype=dtype, seed=seed + 1,
                          scale=(c // groups * ks * ks) ** -0.5)
    bias = triton_randn(k, dtype=dtype, seed=seed + 2)
    out_shape = F.conv2d(x.double().cpu(), weight.double().cpu(), None, stride, pad, dil, groups).shape
    residual = triton_randn(*out_shape, dtype=dtype, layout=layout, seed=seed + 3)
    conv_args = ((stride, stride), (pad, pad), (dil, dil), groups)
    return x, weight, bias, residual, conv_args


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [CONV_CASES[5], CONV_CASES[1], CONV_CASES[2]], ids=["stem", "3x3", "grouped"])
def test_conv2d_act_every_config(case, dtype, poisoned_outputs):
    """Every configuration configs() offers agrees with the float64 reference (and "" is the heuristic)."""
    from fastres.kernels.triton import conv
    x, weight, bias, residual, conv_args = _conv_case(case, dtype, "channels_last")
    expected = conv2d_act_ref(x, weight, bias, *conv_args, residual, True)
    choices = conv.configs(x, weight, *conv_args)
    assert choices[0] == "" and 2 <= len(choices) <= 8
    for config in choices:
        y = registry.triton_conv2d_act(x, weight, bias, *map(list, conv_args[:3]), conv_args[3], residual, True,
                                       config)
        assert_close(y, expected, dtype, f"config {config!r}")
        assert y.is_contiguous(memory_format=torch.channels_last)


@triton_only
@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
def test_weight_and_1x1_operand_paths(tma, monkeypatch):
    """TMA descriptors (1x1 stride-1 activations as the [N*H*W, C] matrix, the packed weight) and the
    pointer-load fallback give the same answers."""
    from fastres.kernels.triton import conv
    monkeypatch.setattr(conv, "_TMA", tma)
    for case in [(3, 32, 5, 7, 40, 1, 1, 0, 1, 1), (1, 3, 37, 45, 16, 7, 2, 3, 1, 1)]:
        x, weight, bias, residual, conv_args = _conv_case(case, torch.float32, "channels_last")
        _, launches = conv.plan(x, weight, bias, *conv_args, residual, True)
        assert launches[0].constexprs["W_DESC"] is (tma and conv._TensorDescriptor is not None)
        if case[5] == 1:
            assert launches[0].constexprs["X_DESC"] is (tma and conv._TensorDescriptor is not None)
        y = conv.conv2d_act(x, weight, bias, *conv_args, residual, True)
        assert_close(y, conv2d_act_ref(x, weight, bias, *conv_args, residual, True), torch.float32, str(case))


@triton_only
def test_split_k_is_bitwise_repeatable():
    from fastres.kernels.triton import conv
    x, weight, bias, residual, conv_args = _conv_case((1, 40, 5, 7, 24, 3, 1, 1, 1, 1), torch.float32,
                                                      "channels_last")
    config = "m32n32k16w4s1x3g1"  # 3 x 3 taps x 3 channel blocks = 27 steps over 3 splits
    y1 = conv.conv2d_act(x, weight, bias, *conv_args, residual, True, config=config)
    y2 = conv.conv2d_act(x, weight, bias, *conv_args, residual, True, config=config)
    assert torch.equal(y1, y2)
    assert_close(y1, conv2d_act_ref(x, weight, bias, *conv_args, residual, True), torch.float32, "split-K")


@triton_only
def test_packed_weight_cache_follows_in_place_edits():
    from fastres.kernels.triton import conv
    x, weight, bias, _, conv_args = _conv_case((1, 13, 7, 9, 24, 3, 1, 1, 1, 1), torch.float32, "channels_last")
    first = conv.packed_weight(weight)
    assert conv.packed_weight(weight) is first  # cached per tensor and version
    conv.conv2d_act(x, weight, bias, *conv_args, None, False)
    with torch.no_grad():
        weight.mul_(-2.0)  # a refold writes the folded weight in place like this
    assert conv.packed_weight(weight) is not first
    y = conv.conv2d_act(x, weight, bias, *conv_args, None, False)
    assert_close(y, conv2d_act_ref(x, weight, bias, *conv_args, None, False), torch.float32, "after the edit")
    # The bottleneck tail's packed [w3 | wd] follows an edit of the second weight too.
    w3, wd = triton_randn(24, 8, 1, 1, seed=3), triton_randn(24, 13, 1, 1, seed=4)
    tail = conv.packed_weight(w3, wd)
    with torch.no_grad():
        wd.add_(1.0)
    repacked = conv.packed_weight(w3, wd)
    assert repacked is not tail and torch.equal(repacked[:, 8:21], wd.reshape(24, 13))


@triton_only
@pytest.mark.parametrize("op", ["conv2d_act", "bottleneck_tail"])
def test_autocast_inference_casts_and_packs_a_weight_once(op, monkeypatch):
    """Under autocast a float32 weight that records no gradient is cast once per version (kept while it
    lives, dispatch.cast_parameters), so the Triton conv packs it once: a fresh cast made a new tensor, and
    a repack, on every call. The kept cast is a normal tensor even when made under inference_mode (a later
    autograd call may save it); a weight that requires grad is cast in the graph on every call."""
    from fastres.kernels.triton import conv
    packs = []
    original = conv._pack
    monkeypatch.setattr(conv, "_pack", lambda *args: (packs.append(args[0].dtype), original(*args))[1])
    x = triton_randn(3, 13, 7, 9, seed=1, layout="channels_last")
    w, b = triton_randn(16, 13, 1, 1, seed=2), triton_randn(16, seed=3)
    shortcut, wd = triton_randn(3, 13, 13, 17, seed=4, layout="channels_last"), triton_randn(16, 13, 1, 1, seed=5)

    def call():
        if op == "conv2d_act":
            return ops.conv2d_act(x, w, b)
        return ops.bottleneck_tail(x, w, shortcut, wd, b, stride=2)

    device = x.device.type
    with fastres.use_backend("triton"), torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False):
        with torch.inference_mode():
            outs = [call() for _ in range(3)]
        assert packs == [torch.bfloat16], packs  # one cast, one pack
        assert all(torch.equal(o, outs[0]) for o in outs) and outs[0].dtype == torch.bfloat16
        x.requires_grad_()  # the weight still records nothing: the kept cast serves, and is saved for backward
        call().float().sum().backward()
        assert len(packs) == 1 and x.grad is not None
        w.requires_grad_()  # now the cast is part of the graph: a fresh one
        call().float().sum().backward()
    assert len(packs) == 2 and w.grad is not None and w.grad.dtype == torch.float32
    expected = conv2d_act_ref(x.detach().double(), w.detach().double(), b.double(), (1, 1), (0, 0), (1, 1), 1,
                              None if op == "conv2d_act" else F.conv2d(shortcut.double(), wd.double(), stride=2),
                              True)
    assert_close(outs[0], expected, torch.bfloat16, op)


def test_cast_parameters_keeps_one_cast_per_version():
    from fastres.ops.dispatch import cast_parameters
    w = torch.randn(4, 3, 3, 3)
    first, = cast_parameters(torch.bfloat16, w)
    assert cast_parameters(torch.bfloat16, w)[0] is first and first.dtype == torch.bfloat16
    assert cast_parameters(torch.float32, w)[0] is w  # its own dtype: itself
    with torch.no_grad():
        w.mul_(2.0)  # an in-place edit (a refold, an optimizer step) bumps the version: a new cast
    second, = cast_parameters(torch.bfloat16, w)
    assert second is not first and torch.equal(second, (w).to(torch.bfloat16))
    w.requires_grad_()
    assert cast_parameters(torch.bfloat16, w)[0].grad_fn is not None  # with autograd: in the graph
    with torch.inference_mode():
        frozen = torch.randn(4, 3, 3, 3)
    assert cast_parameters(torch.bfloat16, frozen)[0] is not cast_parameters(torch.bfloat16, frozen)[0]


# ------------------------------------------------------------------ empty batches and bad input (every op)

def test_empty_batch_returns_empty_like_torch():
    x = torch.randn(0, 8, 5, 5)
    w = torch.randn(4, 8, 3, 3)
    assert ops.conv2d_act(x, w, None, 1, 1).shape == (0, 4, 5, 5)
    assert ops.add_relu(x, x).shape == x.shape


BAD_CALLS = [
    ("x must be 4-D", ValueError, lambda: ops.conv2d_act(torch.randn(8, 5, 5), torch.randn(4, 8, 1, 1))),
    ("x must have a floating dtype", TypeError,
     lambda: ops.conv2d_act(torch.ones(1, 8, 5, 5, dtype=torch.int64), torch.randn(4, 8, 1, 1))),
    ("x has 8 channels but weight expects 3", ValueError,
     lambda: ops.conv2d_act(torch.randn(1, 8, 5, 5), torch.randn(4, 3, 1, 1))),
    ("weight has dtype", TypeError,
     lambda: ops.conv2d_act(torch.randn(1, 8, 5, 5), torch.randn(4, 8, 1, 1, dtype=torch.float64))),
    ("stride must be >= 1", ValueError,
     lambda: ops.conv2d_act(torch.randn(1, 8, 5, 5), torch.randn(4, 8, 1, 1), stride=0)),
    ("padding must be >= 0", ValueError,
     lambda: ops.conv2d_act(torch.randn(1, 8, 5, 5), torch.randn(4, 8, 1, 1), padding=-1)),
    ("dilation must be >= 1", ValueError,
     lambda: ops.conv2d_act(torch.randn(1, 8, 5, 5), torch.randn(4, 8, 3, 3), dilation=0)),
    ("groups must be a positive int", ValueError,
     lambda: ops.conv2d_act(torch.randn(1, 8, 5, 5), torch.randn(4, 8, 1, 1), groups=0)),
    ("bias must have 4 elements", ValueError,
     lambda: ops.conv2d_act(torch.randn(1, 8, 5, 5), torch.randn(4, 8, 1, 1), torch.randn(5))),
    ("residual must have the output's shape", ValueError,
     lambda: ops.conv2d_act(torch.randn(1, 8, 5, 5), torch.randn(4, 8, 1, 1), residual=torch.randn(1, 4, 5, 4))),
    ("residual has dtype", TypeError,
     lambda: ops.add_relu(torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5, dtype=torch.float64))),
    ("too small", ValueError, lambda: ops.conv2d_act(torch.randn(1, 8, 2, 2), torch.randn(4, 8, 3, 3))),
    ("relu must be a bool", TypeError,
     lambda: ops.conv2d_act(torch.randn(1, 8, 5, 5), torch.randn(4, 8, 1, 1), relu=1)),
    ("more than one", ValueError,
     lambda: ops.batch_norm_act(torch.randn(1, 4, 1, 1), torch.ones(4), torch.zeros(4), None, None, training=True)),
    ("required when training=False", ValueError,
     lambda: ops.batch_norm_act(torch.randn(2, 4, 3, 3), None, None, None, None, training=False)),
    ("momentum must be a number in [0, 1]", ValueError,
     lambda: ops.batch_norm_act(torch.randn(2, 4, 3, 3), None, None, None, None, training=True, momentum=None)),
    ("running_var must have 4 elements", ValueError,
     lambda: ops.batch_norm_act(torch.randn(2, 4, 3, 3), None, None, torch.zeros(4), torch.ones(3), training=True)),
    ("residual must be a torch.Tensor", TypeError, lambda: ops.add_relu(torch.randn(2, 3), None)),
    ("w3 and wd must be 1x1", ValueError,
     lambda: ops.bottleneck_tail(torch.randn(1, 4, 3, 3), torch.randn(8, 4, 3, 3), torch.randn(1, 6, 5, 5),
                                 torch.randn(8, 6, 1, 1), stride=2)),
    ("x[:, :, ::2, ::2] has batch/spatial", ValueError,
     lambda: ops.bottleneck_tail(torch.randn(1, 4, 3, 3), torch.randn(8, 4, 1, 1), torch.randn(1, 6, 8, 8),
                                 torch.randn(8, 6, 1, 1), stride=2)),
    ("running_mean and running_var are required", ValueError,
     lambda: ops.fold_bn(torch.randn(4, 3, 1, 1), None, None, None, None, None, 1e-5)),
]


@pytest.mark.parametrize("message,error,call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_clear_error(message, error, call):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        call()
