"""fastres.ops against float64 references: every backend, dtype, memory format and odd shape."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres import ops

from helpers import CONV_CASES, LAYOUTS, randn as _randn
from reference_math import assert_close, bottleneck_tail as bottleneck_tail_ref, conv2d_act as conv2d_act_ref, \
    random_bn_state

BACKENDS = fastres.available_backends()




def _poisoned_free(y):
    assert torch.isfinite(y).all()




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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,stride", [((3, 13, 13, 17), 2), ((1, 24, 7, 9), 1), ((3, 16, 1, 1), 2)])
def test_bottleneck_tail_matches_float64(shape, stride, dtype, layout, backend):
    n, c_in, h, w = shape
    x = _randn(n, c_in, h, w, dtype=dtype, layout=layout, seed=1)
    h_in = _randn(n, 8, (h - 1) // stride + 1, (w - 1) // stride + 1, dtype=dtype, layout=layout, seed=2)
    w3 = _randn(40, 8, 1, 1, dtype=dtype, seed=3) * 0.3
    wd = _randn(40, c_in, 1, 1, dtype=dtype, seed=4) * 0.3
    bias = _randn(40, dtype=dtype, seed=5)
    for relu in (True, False):
        with fastres.use_backend(backend), torch.no_grad():
            y = ops.bottleneck_tail(h_in, w3, x, wd, bias, stride=stride, relu=relu)
        assert y.is_contiguous(memory_format=LAYOUTS[layout])
        assert_close(y, bottleneck_tail_ref(h_in, w3, x, wd, bias, stride, relu), dtype, f"relu={relu}")


def test_bottleneck_tail_gradients():
    x = _randn(2, 5, 5, 7, dtype=torch.float64, seed=1).requires_grad_()
    h = _randn(2, 3, 3, 4, dtype=torch.float64, seed=2).requires_grad_()
    w3 = _randn(6, 3, 1, 1, dtype=torch.float64, seed=3).requires_grad_()
    wd = _randn(6, 5, 1, 1, dtype=torch.float64, seed=4).requires_grad_()
    bias = _randn(6, dtype=torch.float64, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: ops.bottleneck_tail(*a, stride=2), (h, w3, x, wd, bias))


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


def _bn_module(channels, momentum, seed=0):
    bn = torch.nn.BatchNorm2d(channels, momentum=momentum).double()
    gamma, beta, mean, var = random_bn_state(channels, torch.Generator().manual_seed(seed), torch.float64)
    with torch.no_grad():
        bn.weight.copy_(gamma), bn.bias.copy_(beta), bn.running_mean.copy_(mean), bn.running_var.copy_(var)
    return bn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("shape", [(3, 13, 7, 9), (1, 40, 13, 17), (3, 24, 1, 1)])
def test_batch_norm_act_matches_batchnorm2d(shape, residual, relu, training, layout, backend):
    x = _randn(*shape, layout=layout, seed=1) * 3 + 0.5
    res = _randn(*shape, layout=layout, seed=2) if residual else None
    reference_bn = _bn_module(shape[1], 0.3)
    reference_bn.train(training)
    expected = reference_bn(x.double())
    if res is not None:
        expected = expected + res.double()
    expected = torch.relu(expected) if relu else expected
    bn = _bn_module(shape[1], 0.3).float()
    with fastres.use_backend(backend):
        y = ops.batch_norm_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=training,
                               momentum=0.3, eps=bn.eps, residual=res, relu=relu)
    assert y.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(y, expected, torch.float32, "output")
    assert_close(bn.running_mean, reference_bn.running_mean, torch.float32, "running_mean")
    assert_close(bn.running_var, reference_bn.running_var, torch.float32, "running_var (unbiased)")


def test_batch_norm_act_gradients_in_training():
    x = _randn(3, 5, 4, 3, dtype=torch.float64, seed=1).requires_grad_()
    res = _randn(3, 5, 4, 3, dtype=torch.float64, seed=2).requires_grad_()
    g = torch.Generator().manual_seed(0)
    gamma, beta, _, _ = random_bn_state(5, g, torch.float64)
    gamma.requires_grad_(), beta.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: ops.batch_norm_act(a, c, d, None, None, training=True, residual=b, relu=True),
        (x, res, gamma, beta))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_add_relu(backend, layout, dtype):
    x = _randn(3, 13, 7, 9, dtype=dtype, layout=layout, seed=1)
    res = _randn(3, 13, 7, 9, dtype=dtype, layout=layout, seed=2)
    with fastres.use_backend(backend), torch.no_grad():
        y = ops.add_relu(x, res)
    assert y.dtype == dtype and y.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(y, torch.relu(x.double() + res.double()), dtype, "add_relu")
    # Fresh float64 data: values rounded to bf16 can cancel to exactly 0, where ReLU has no derivative.
    xg = _randn(2, 3, 5, 7, dtype=torch.float64, layout=layout, seed=5).requires_grad_()
    rg = _randn(2, 3, 5, 7, dtype=torch.float64, layout=layout, seed=6).requires_grad_()
    with fastres.use_backend(backend):
        assert torch.autograd.gradcheck(ops.add_relu, (xg, rg))


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
