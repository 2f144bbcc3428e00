"""The Triton backend: kernels, autograd, registration and a whole model, against references.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
where every program costs milliseconds: shapes stay tiny. bf16 dots are wrong in the interpreter,
so the launchers accumulate from fp32 operands there; bf16 proper is checked on a GPU.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fastres
from fastres.ops import registry

from helpers import CONV_CASES, LAYOUTS, TOLERANCE, randn
from reference_math import assert_close, random_bn_state
from reference_math import conv2d_act as reference_conv

pytestmark = pytest.mark.skipif("triton" not in fastres.available_backends(),
                                reason="the Triton backend is not available here")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


_randn = functools.partial(randn, device=DEVICE)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Fresh tensors start as NaN, so an element a kernel forgot to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(out)
    (out.double() * weight.double()).sum().backward()
    return out, [t.grad if t is not None else None for t in inputs]


def _compare_with_torch_backend(fn, inputs, dtype):
    with fastres.use_backend("triton"):
        out, grads = _grads(fn, inputs)
    with fastres.use_backend("torch"):
        ref_out, ref_grads = _grads(fn, [t.double() if t is not None else None for t in inputs])
    assert_close(out, ref_out, dtype, "output")
    for index, (g, ref) in enumerate(zip(grads, ref_grads)):
        if ref is not None:
            error = (g.double() - ref).abs().max().item()
            scale = ref.abs().max().item() + 1e-12
            assert error <= TOLERANCE["grad"][dtype] * scale, f"grad of input {index}: {error:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------ conv2d + epilogue



@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv2d_act_forward_backward(case, dtype, layout, poisoned_outputs):
    n, c, h, w, k, ks, stride, pad, dil, groups = case
    x = _randn(n, c, h, w, dtype=dtype, layout=layout, seed=1)
    weight = _randn(k, c // groups, ks, ks, dtype=dtype, seed=2, scale=(c // groups * ks * ks) ** -0.5)
    bias = _randn(k, dtype=dtype, seed=3)
    out_shape = F.conv2d(x.double().cpu(), weight.double().cpu(), None, stride, pad, dil, groups).shape
    residual = _randn(*out_shape, dtype=dtype, layout=layout, seed=4)

    def fn(x, weight, bias, residual):
        return fastres.ops.conv2d_act(x, weight, bias, stride, pad, dil, groups, residual=residual, relu=True)

    _compare_with_torch_backend(fn, [x, weight, bias, residual], dtype)
    with fastres.use_backend("triton"), torch.no_grad():
        y = fn(x, weight, None, None)
    assert y.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_bottleneck_tail_forward_backward(stride, layout, poisoned_outputs):
    x = _randn(3, 13, 13, 17, layout=layout, seed=1)
    h = _randn(3, 8, (13 - 1) // stride + 1, (17 - 1) // stride + 1, layout=layout, seed=2)
    w3, wd = _randn(40, 8, 1, 1, seed=3, scale=0.3), _randn(40, 13, 1, 1, seed=4, scale=0.3)
    bias = _randn(40, seed=5)
    _compare_with_torch_backend(lambda *a: fastres.ops.bottleneck_tail(*a, stride=stride), [h, w3, x, wd, bias],
                                torch.float32)


def _conv_case(case, dtype, layout, seed=1):
    n, c, h, w, k, ks, stride, pad, dil, groups = case
    x = _randn(n, c, h, w, dtype=dtype, layout=layout, seed=seed)
    weight = _randn(k, c // groups, ks, ks, dtype=dtype, seed=seed + 1, scale=(c // groups * ks * ks) ** -0.5)
    bias = _randn(k, dtype=dtype, seed=seed + 2)
    out_shape = F.conv2d(x.double().cpu(), weight.double().cpu(), None, stride, pad, dil, groups).shape
    residual = _randn(*out_shape, dtype=dtype, layout=layout, seed=seed + 3)
    conv_args = ((stride, stride), (pad, pad), (dil, dil), groups)
    return x, weight, bias, residual, conv_args


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [CONV_CASES[5], CONV_CASES[1], CONV_CASES[2]], ids=["stem", "3x3", "grouped"])
def test_conv2d_act_every_config(case, dtype, poisoned_outputs):
    """Every configuration configs() offers agrees with the float64 reference (and "" is the heuristic)."""
    from fastres.kernels.triton import conv
    x, weight, bias, residual, conv_args = _conv_case(case, dtype, "channels_last")
    expected = reference_conv(x, weight, bias, *conv_args, residual, True)
    choices = conv.configs(x, weight, *conv_args)
    assert choices[0] == "" and 2 <= len(choices) <= 8
    for config in choices:
        y = registry.triton_conv2d_act(x, weight, bias, *map(list, conv_args[:3]), conv_args[3], residual, True,
                                       config)
        assert_close(y, expected, dtype, f"config {config!r}")
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bottleneck_tail_every_config(layout):
    from fastres.kernels.triton import conv
    x = _randn(3, 13, 13, 17, layout=layout, seed=1)
    h = _randn(3, 8, 7, 9, layout=layout, seed=2)
    w3, wd = _randn(40, 8, 1, 1, seed=3, scale=0.3), _randn(40, 13, 1, 1, seed=4, scale=0.3)
    bias = _randn(40, seed=5)
    expected = torch.relu(F.conv2d(h.double(), w3.double()) + F.conv2d(x.double(), wd.double(), stride=2)
                          + bias.double()[None, :, None, None])
    for config in conv.configs(h, w3, second_channels=13):
        y = registry.triton_bottleneck_tail(h, w3, x, wd, bias, [2, 2], True, config)
        assert_close(y, expected, torch.float32, f"config {config!r}")


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
        assert_close(y, reference_conv(x, weight, bias, *conv_args, residual, True), torch.float32, str(case))


def test_split_k_is_bitwise_repeatable():
    from fastres.kernels.triton import conv
    x, weight, bias, residual, conv_args = _conv_case((1, 40, 5, 7, 24, 3, 1, 1, 1, 1), torch.float32,
                                                      "channels_last")
    config = "m32n32k16w4s1x3g1"  # 3 x 3 taps x 3 channel blocks = 27 steps over 3 splits
    y1 = conv.conv2d_act(x, weight, bias, *conv_args, residual, True, config=config)
    y2 = conv.conv2d_act(x, weight, bias, *conv_args, residual, True, config=config)
    assert torch.equal(y1, y2)
    assert_close(y1, reference_conv(x, weight, bias, *conv_args, residual, True), torch.float32, "split-K")


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
    assert_close(y, reference_conv(x, weight, bias, *conv_args, None, False), torch.float32, "after the edit")
    # The bottleneck tail's packed [w3 | wd] follows an edit of the second weight too.
    w3, wd = _randn(24, 8, 1, 1, seed=3), _randn(24, 13, 1, 1, seed=4)
    tail = conv.packed_weight(w3, wd)
    with torch.no_grad():
        wd.add_(1.0)
    repacked = conv.packed_weight(w3, wd)
    assert repacked is not tail and torch.equal(repacked[:, 8:21], wd.reshape(24, 13))


# ------------------------------------------------------------------ BatchNorm + residual + ReLU

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("shape", [(3, 13, 7, 9), (1, 40, 13, 17), (3, 70, 1, 1)])
def test_batch_norm_act_forward_backward(shape, residual, relu, training, layout, poisoned_outputs):
    x = _randn(*shape, layout=layout, seed=1, scale=3.0) + 0.5
    res = _randn(*shape, layout=layout, seed=2) if residual else None
    gamma, beta, mean, var = (t.to(DEVICE) for t in random_bn_state(shape[1], torch.Generator().manual_seed(0)))
    buffers = {backend: (mean.clone(), var.clone()) for backend in ("triton", "torch")}

    def fn_for(backend):
        def fn(x, gamma, beta, res):
            rm, rv = buffers[backend]
            return fastres.ops.batch_norm_act(x, gamma, beta, rm, rv, training=training, momentum=0.3, eps=1e-5,
                                              residual=res, relu=relu)
        return fn

    with fastres.use_backend("triton"):
        out, grads = _grads(fn_for("triton"), [x, gamma, beta, res])
    buffers["torch"] = (mean.double(), var.double())
    with fastres.use_backend("torch"):
        ref, ref_grads = _grads(fn_for("torch"), [t.double() if t is not None else None for t in [x, gamma, beta, res]])
    assert out.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(out, ref, torch.float32, "output")
    for name, g, r in zip(["x", "weight", "bias", "residual"], grads, ref_grads):
        if r is not None:
            assert_close(g, r, torch.float32, f"grad {name}") if r.abs().max() > 0 else None
    assert_close(buffers["triton"][0], buffers["torch"][0], torch.float32, "running_mean")
    assert_close(buffers["triton"][1], buffers["torch"][1], torch.float32, "running_var")


def test_batch_norm_statistics_are_deterministic():
    x = _randn(4, 24, 17, 13, seed=3, scale=5.0) + 2.0
    first = registry.triton_batch_norm_act_stats(x, None, None, 0.1, 1e-5)
    again = registry.triton_batch_norm_act_stats(x, None, None, 0.1, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_add_relu_forward_backward(layout, poisoned_outputs):
    x, r = _randn(3, 13, 7, 9, layout=layout, seed=1), _randn(3, 13, 7, 9, layout=layout, seed=2)
    _compare_with_torch_backend(fastres.ops.add_relu, [x, r], torch.float32)


# ------------------------------------------------------------------ registration

def test_custom_ops_pass_opcheck():
    x = _randn(2, 8, 5, 7, seed=1)
    w = _randn(6, 8, 3, 3, seed=2, scale=0.2)
    b, res = _randn(6, seed=3), _randn(2, 6, 5, 7, seed=4)
    opcheck = torch.library.opcheck
    opcheck(registry.triton_conv2d_act, (x, w, b, [1, 1], [1, 1], [1, 1], 1, res, True))
    opcheck(registry.triton_bottleneck_tail, (_randn(2, 4, 3, 4, seed=5), _randn(6, 4, 1, 1, seed=6), x,
                                              _randn(6, 8, 1, 1, seed=7), b, [2, 2], True))
    mean, invstd = registry.triton_batch_norm_act_stats(x, None, None, 0.1, 1e-5)
    opcheck(registry.triton_batch_norm_act_apply, (x, _randn(8, seed=8), _randn(8, seed=9), mean, invstd, x.clone(),
                                               True, True))
    opcheck(registry.triton_batch_norm_act_stats, (x, torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE),
                                               0.1, 1e-5), test_utils=("test_schema", "test_faketensor"))
    opcheck(registry.triton_add_relu, (x, _randn(2, 8, 5, 7, seed=10)))
    y = registry.triton_add_relu(x, _randn(2, 8, 5, 7, seed=11))
    opcheck(registry.triton_relu_backward, (_randn(2, 8, 5, 7, seed=12), y))
    opcheck(registry.triton_batch_norm_act_backward, (_randn(2, 8, 5, 7, seed=12), y, x, _randn(8, seed=8), mean,
                                                      invstd, True, True, True, True))


# ------------------------------------------------------------------ whole models

def _twins(num_classes=5):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=num_classes)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, v in zip((m.weight, m.bias, m.running_mean, m.running_var), random_bn_state(m.num_features, g)):
                    t.copy_(v)
    return tv.to(DEVICE), fastres.from_torchvision(tv).to(DEVICE)


def test_resnet18_eval_on_triton_matches_torchvision():
    tv, fr = _twins()
    x = _randn(1, 3, 32, 32, seed=3)
    with torch.no_grad(), fastres.use_backend("triton"):
        out = fr.eval()(x)
    with torch.no_grad():
        assert_close(out, tv.eval()(x), torch.float32, "eval logits")


def _train_step(model, x):
    model.train()
    out = model(x)
    out.square().mean().backward()
    return out, [p.grad for p in model.parameters()], list(model.buffers())


def _max_rel(a, b):
    return (a.double() - b.double()).abs().max().item() / (b.double().abs().max().item() + 1e-12)


def test_resnet18_train_step_on_triton_matches_torchvision():
    """Training BN at random init amplifies rounding a lot, so fastres-on-Triton (fp32) is held to
    torchvision's own fp32 accuracy: both are measured against torchvision in float64."""
    tv, fr = _twins()
    x = _randn(2, 3, 48, 48, seed=3)  # 8 values per channel in layer4: well-defined batch statistics
    exact = copy.deepcopy(tv).double()
    ref_out, ref_grads, ref_buffers = _train_step(exact, x.double())
    tv_out, tv_grads, _ = _train_step(tv, x)
    with fastres.use_backend("triton"):
        out, grads, buffers = _train_step(fr, x)
    assert _max_rel(out, ref_out) <= 10 * _max_rel(tv_out, ref_out) + 1e-5
    for (name, _), g, t, r in zip(fr.named_parameters(), grads, tv_grads, ref_grads):
        assert _max_rel(g, r) <= 10 * _max_rel(t, r) + 1e-4, f"grad {name}"
    for (name, _), b, r in zip(fr.named_buffers(), buffers, ref_buffers):
        assert _max_rel(b, r) <= 1e-4, f"buffer {name}"


@pytest.mark.parametrize("train", [False, True])
def test_compile_fullgraph_of_a_model_on_triton_backend(train):
    """The whole ResNet traces into one graph: every Triton launch is a registered operator."""
    tv, fr = _twins()
    fr.train(train)
    x = _randn(2, 3, 32, 32, seed=2, layout="channels_last")
    with fastres.use_backend("triton"):
        expected = copy.deepcopy(fr)(x)
        torch._dynamo.reset()
        got = torch.compile(fr, fullgraph=True, backend="aot_eager")(x)
    assert_close(got.detach(), expected.detach(), torch.float32, "compiled")
