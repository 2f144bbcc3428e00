"""bottleneck_tail (a Bottleneck's conv3 + projection shortcut + bias + ReLU, one GEMM over the
concatenated channels) across implementations: every available backend (auto, the torch reference,
cpp, triton) against the float64 reference in both memory formats, with and without ReLU, and a float64
gradcheck; the Triton kernel (in Triton's interpreter without a GPU) against the torch backend, outputs
and gradients, and in every configuration it offers. The cpp backend's gradcheck of the tail shares a
test with conv2d_act's (tests/test_conv2d_act.py::test_conv_epilogue_and_tail_gradcheck), its bad-input
cases are in that file's table too."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres import ops
from fastres.ops import registry

from helpers import LAYOUTS, randn as _randn, triton_only, triton_randn
from reference_math import assert_close, bottleneck_tail as bottleneck_tail_ref, \
    compare_with_torch_backend as _compare_with_torch_backend

BACKENDS = fastres.available_backends()


# ------------------------------------------------------------------ every backend against float64

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


# ------------------------------------------------------------------ triton (the interpreter without a GPU)

@triton_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_bottleneck_tail_forward_backward(stride, layout, poisoned_outputs):
    x = triton_randn(3, 13, 13, 17, layout=layout, seed=1)
    h = triton_randn(3, 8, (13 - 1) // stride + 1, (17 - 1) // stride + 1, layout=layout, seed=2)
    w3, wd = triton_randn(40, 8, 1, 1, seed=3, scale=0.3), triton_randn(40, 13, 1, 1, seed=4, scale=0.3)
    bias = triton_randn(40, seed=5)
    _compare_with_torch_backend(lambda *a: fastres.ops.bottleneck_tail(*a, stride=stride), [h, w3, x, wd, bias],
                                torch.float32)


@triton_only
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bottleneck_tail_every_config(layout):
    from fastres.kernels.triton import conv
    x = triton_randn(3, 13, 13, 17, layout=layout, seed=1)
    h = triton_randn(3, 8, 7, 9, layout=layout, seed=2)
    w3, wd = triton_randn(40, 8, 1, 1, seed=3, scale=0.3), triton_randn(40, 13, 1, 1, seed=4, scale=0.3)
    bias = triton_randn(40, seed=5)
    expected = torch.relu(F.conv2d(h.double(), w3.double()) + F.conv2d(x.double(), wd.double(), stride=2)
                          + bias.double()[None, :, None, None])
    for config in conv.configs(h, w3, second_channels=13):
        y = registry.triton_bottleneck_tail(h, w3, x, wd, bias, [2, 2], True, config)
        assert_close(y, expected, torch.float32, f"config {config!r}")
