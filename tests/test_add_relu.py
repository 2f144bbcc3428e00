"""add_relu (residual add + ReLU) across implementations: every available backend (auto, the torch
reference, cpp, triton) against float64 in fp32/bf16/fp64 and both memory formats, with a float64
gradcheck; the Triton kernel (in Triton's interpreter without a GPU) against the torch backend, output
and gradients. Its empty-batch and bad-input cases are in tests/test_conv2d_act.py."""
from __future__ import annotations

import pytest
import torch

import fastres
from fastres import ops

from helpers import LAYOUTS, randn as _randn, triton_only, triton_randn
from reference_math import assert_close, compare_with_torch_backend as _compare_with_torch_backend

BACKENDS = fastres.available_backends()


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


@triton_only
@pytest.mark.parametrize("layout", LAYOUTS)
def test_add_relu_forward_backward(layout, poisoned_outputs):
    x, r = triton_randn(3, 13, 7, 9, layout=layout, seed=1), triton_randn(3, 13, 7, 9, layout=layout, seed=2)
    _compare_with_torch_backend(fastres.ops.add_relu, [x, r], torch.float32)
