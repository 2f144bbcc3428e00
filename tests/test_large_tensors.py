"""Tensors past 2**31 elements: kernels must index with 64-bit offsets.

Without a GPU: the Triton kernels (which address tensors through their strides) run in the
interpreter on views whose last sample starts beyond element 2**31 of a lazily allocated
4 GiB storage; only the touched pages are ever backed, so this costs megabytes. With 32-bit
offset arithmetic the interpreter reads far outside the storage and the process dies, so each
case runs in a subprocess: a crash is a clear failure, not a lost test session.
With a GPU: real tensors of more than 2**31 elements through every backend's flat kernels
(add_relu, the BatchNorm statistics and apply), whose offsets a strided view cannot reach.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

BATCH_STRIDE = 2**30 + 4099  # < 2**31, so passed as int32: sample 2 lies past 2**31 only in 64-bit math
C, H, W = 5, 7, 9


def _huge_view(seed: int, channels: int = C) -> torch.Tensor:
    """(3, channels, H, W) fp16 with batch stride BATCH_STRIDE, random values (only they are touched)."""
    storage = torch.empty(2 * BATCH_STRIDE + channels * H * W, dtype=torch.float16)
    view = storage.as_strided((3, channels, H, W), (BATCH_STRIDE, H * W, W, 1))
    view.copy_(torch.randn(3, channels, H, W, generator=torch.Generator().manual_seed(seed)).half())
    return view


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= 4e-3 * scale, f"{what}: error {error:.3g} (scale {scale:.3g})"
    # the sample past 2**31 on its own: a wrong read there must not hide in the overall maximum
    assert torch.allclose(actual[2].double(), expected[2].double(), atol=4e-3 * scale), f"{what}: sample 2"


def _case_conv() -> None:
    """Implicit-GEMM conv with a residual, and the Bottleneck tail's second operand, both huge views."""
    import fastres
    from fastres import ops
    x, residual = _huge_view(1), _huge_view(2, channels=8)
    weight = torch.randn(8, C, 3, 3, generator=torch.Generator().manual_seed(3)).half() * 0.2
    with fastres.use_backend("triton"), torch.no_grad():
        y = ops.conv2d_act(x, weight, None, 1, 1, residual=residual, relu=True)
        h = torch.randn(3, 4, H, W, generator=torch.Generator().manual_seed(4)).half()
        w3, wd = torch.randn(8, 4, 1, 1).half(), torch.randn(8, C, 1, 1).half()
        tail = ops.bottleneck_tail(h, w3, x, wd, stride=1)
    xf = x.float()
    _close(y, torch.relu(F.conv2d(xf, weight.float(), None, 1, 1) + residual.float()), "conv2d_act")
    _close(tail, torch.relu(F.conv2d(h.float(), w3.float()) + F.conv2d(xf, wd.float())), "bottleneck_tail")


def _case_batch_norm() -> None:
    """Training BatchNorm (statistics, running stats, apply) and its backward on a huge view."""
    import fastres
    from fastres import ops
    x = _huge_view(5).requires_grad_()
    weight = (torch.rand(C, generator=torch.Generator().manual_seed(6)) + 0.5).requires_grad_()
    bias = torch.randn(C, generator=torch.Generator().manual_seed(7))
    mean, var = torch.zeros(C), torch.ones(C)
    ref_mean, ref_var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    xr, wr = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = torch.relu(F.batch_norm(xr, ref_mean, ref_var, wr, bias.double(), True, 0.1, 1e-5))
    g = torch.randn(expected.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    expected.backward(g)
    with fastres.use_backend("triton"):
        y = ops.batch_norm_act(x, weight, bias, mean, var, training=True, relu=True)
        y.backward(g.half())
    _close(y.detach(), expected.detach(), "batch_norm_act")
    _close(x.grad, xr.grad, "d x")
    assert torch.allclose(weight.grad.double(), wr.grad, rtol=2e-2, atol=1e-2), "d weight"
    assert torch.allclose(mean.double(), ref_mean, atol=1e-3) and torch.allclose(var.double(), ref_var, atol=1e-3)


CASES = {"conv": _case_conv, "batch_norm": _case_batch_norm}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only without a GPU (see the GPU test)")
@pytest.mark.parametrize("case", CASES)
def test_triton_kernels_index_past_2_31_elements(case):
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"case {case!r} exited with {result.returncode} (a negative code is a crash: a 32-bit offset read "
        f"outside the storage)\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with > 20 GiB free")
@pytest.mark.parametrize("backend", ["triton", "cpp", "torch"])
def test_flat_kernels_on_more_than_2_31_elements(backend):
    import fastres
    from fastres import ops
    if backend not in fastres.available_backends():
        pytest.skip(f"backend {backend} not available")
    numel = 2**31 + 4099  # odd, so the vectorised kernels' scalar tail runs too
    shape = (numel // (C * 127) + 1, C, 127, 1)  # N*C*H*W > 2**31, channels of one value per row
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=torch.float16, generator=gen)
    residual = torch.randn(shape, device="cuda", dtype=torch.float16, generator=gen)
    with fastres.use_backend(backend), torch.no_grad():
        y = ops.add_relu(x, residual)
        tail = slice(-3, None)  # the last samples sit past 2**31
        assert torch.equal(y[tail], torch.relu(x[tail] + residual[tail])), "add_relu past 2**31"
        del y
        mean, var = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
        y = ops.batch_norm_act(x, None, None, mean, var, training=True, relu=False)
    ref_mean = x.float().mean((0, 2, 3))
    assert torch.allclose(mean, 0.1 * ref_mean, atol=1e-4), "running mean from > 2**31 elements"
    expected = (x[tail].float() - ref_mean.view(1, C, 1, 1)) * torch.rsqrt(
        x.float().var((0, 2, 3), unbiased=False).view(1, C, 1, 1) + 1e-5)
    assert torch.allclose(y[tail].float(), expected, atol=2e-2), "batch_norm_act apply past 2**31"


if __name__ == "__main__":
    CASES[sys.argv[1]]()
