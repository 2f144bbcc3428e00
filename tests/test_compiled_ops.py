"""The "cpp" backend (fastres._C): CPU kernels against float64 references, float64 gradchecks,
determinism whatever the thread count, operator registration, and the CUDA build."""
from __future__ import annotations

import copy
import functools
import os
import shutil

import pytest
import torch
import torchvision

import fastres
from fastres import ops

from helpers import LAYOUTS, randn
from reference_math import assert_close, random_bn_state

pytestmark = pytest.mark.skipif("cpp" not in fastres.available_backends(), reason="fastres._C is not built")
_randn = functools.partial(randn, dtype=torch.float64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (False, False)])
def test_batch_norm_act_gradcheck(residual, relu, training, layout):
    x = _randn(3, 5, 4, 3, layout=layout, seed=1, scale=2.0).requires_grad_()
    res = _randn(3, 5, 4, 3, layout=layout, seed=2).requires_grad_() if residual else None
    gamma, beta, mean, var = random_bn_state(5, torch.Generator().manual_seed(0), torch.float64)
    gamma.requires_grad_(), beta.requires_grad_()

    def fn(x, gamma, beta, res):
        return ops.batch_norm_act(x, gamma, beta, mean.clone(), var.clone(), training=training, residual=res,
                                  relu=relu)

    with fastres.use_backend("cpp"):
        assert torch.autograd.gradcheck(fn, (x, gamma, beta, res))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_epilogue_and_tail_gradcheck(layout):
    x = _randn(2, 6, 5, 7, layout=layout, seed=1).requires_grad_()
    w = _randn(8, 3, 3, 3, seed=2).requires_grad_()
    b = _randn(8, seed=3).requires_grad_()
    res = _randn(2, 8, 3, 4, layout=layout, seed=4).requires_grad_()
    h = _randn(2, 4, 3, 4, layout=layout, seed=5).requires_grad_()
    w3, wd = _randn(8, 4, 1, 1, seed=6).requires_grad_(), _randn(8, 6, 1, 1, seed=7).requires_grad_()
    with fastres.use_backend("cpp"):
        assert torch.autograd.gradcheck(
            lambda *a: ops.conv2d_act(a[0], a[1], a[2], 2, 1, 1, 2, residual=a[3]), (x, w, b, res))
        assert torch.autograd.gradcheck(lambda *a: ops.bottleneck_tail(*a, stride=2), (h, w3, x, wd, b))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 13, 7, 9), (1, 40, 13, 17), (3, 24, 1, 1)])
def test_batch_norm_act_matches_float64(shape, dtype, layout):
    x = _randn(*shape, dtype=dtype, layout=layout, seed=1, scale=3.0) + 0.5
    res = _randn(*shape, dtype=dtype, layout=layout, seed=2)
    gamma, beta, mean, var = random_bn_state(shape[1], torch.Generator().manual_seed(0))
    rm, rv = mean.clone(), var.clone()
    with fastres.use_backend("cpp"):
        y = ops.batch_norm_act(x, gamma, beta, rm, rv, training=True, momentum=0.3, residual=res, relu=True)
    rm64, rv64 = mean.double(), var.double()
    expected = torch.relu(torch.nn.functional.batch_norm(x.double(), rm64, rv64, gamma.double(), beta.double(),
                                                         True, 0.3, 1e-5) + res.double())
    assert y.dtype == dtype and y.is_contiguous(memory_format=LAYOUTS[layout])
    assert_close(y, expected, dtype, "output")
    assert_close(rm, rm64, torch.float32, "running_mean")
    assert_close(rv, rv64, torch.float32, "running_var")


def test_results_do_not_depend_on_thread_count():
    x = _randn(4, 24, 17, 13, dtype=torch.float32, layout="channels_last", seed=3, scale=5.0) + 2.0
    gamma, beta, _, _ = random_bn_state(24, torch.Generator().manual_seed(0))
    dy = _randn(4, 24, 17, 13, dtype=torch.float32, layout="channels_last", seed=4)

    def run():
        xg = x.clone().requires_grad_()
        with fastres.use_backend("cpp"):
            y = ops.batch_norm_act(xg, gamma, beta, None, None, training=True)
        y.backward(dy)
        return y.detach(), xg.grad

    threads = torch.get_num_threads()
    try:
        first = run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    again = run()
    for a, b, c in zip(first, single, again):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_registered_operators_pass_opcheck():
    x = _randn(2, 8, 5, 7, dtype=torch.float32, seed=1)
    r = _randn(2, 8, 5, 7, dtype=torch.float32, seed=2)
    w, b = _randn(8, dtype=torch.float32, seed=3), _randn(8, dtype=torch.float32, seed=4)
    fr = torch.ops.fastres
    opcheck = torch.library.opcheck
    opcheck(fr.add_relu, (x, r))
    y = fr.add_relu(x, r)
    opcheck(fr.relu_backward, (r, y))
    opcheck(fr.batch_norm_act_stats, (x, torch.zeros(8), torch.ones(8), 0.1, 1e-5),
            test_utils=("test_schema", "test_faketensor"))
    mean, invstd = fr.batch_norm_act_stats(x, None, None, 0.1, 1e-5)
    opcheck(fr.batch_norm_act_apply, (x, w, b, mean, invstd, r, True, True))
    opcheck(fr.batch_norm_act_backward, (r, y, x, w, mean, invstd, True, True, True, True))


@pytest.mark.skipif(not (os.environ.get("CI") and shutil.which("nvcc")), reason="checked in CI, where nvcc is present")
def test_ci_built_the_cuda_kernels():
    """CI compiles csrc/cuda for sm_90 without a GPU: the kernels must be registered."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastres::batch_norm_act_apply", "CUDA")


@pytest.mark.parametrize("train", [False, True])
def test_resnet18_on_cpp_backend_matches_torchvision(train):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=5).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, v in zip((m.weight, m.bias, m.running_mean, m.running_var),
                                random_bn_state(m.num_features, g, torch.float64)):
                    t.copy_(v)
    fr = fastres.from_torchvision(tv)
    tv.train(train), fr.train(train)
    x = _randn(2, 3, 48, 48, seed=3)
    with fastres.use_backend("cpp"):
        out = fr(x)
    ref = tv(x)
    assert_close(out, ref, torch.float64, "logits")
    if train:
        out.square().mean().backward()
        ref.square().mean().backward()
        for (name, p), q in zip(fr.named_parameters(), tv.parameters()):
            assert_close(p.grad, q.grad, torch.float64, f"grad {name}")
        for (name, b), c in zip(fr.named_buffers(), tv.buffers()):
            assert torch.allclose(b.double(), c.double(), rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("train", [False, True])
def test_compile_fullgraph_on_cpp_backend(train):
    """The compiled operators have fake implementations: a whole model traces into one graph."""
    torch.manual_seed(0)
    model = fastres.resnet18(num_classes=5).train(train)
    x = _randn(2, 3, 32, 32, dtype=torch.float32, seed=4)
    with fastres.use_backend("cpp"):
        expected = copy.deepcopy(model)(x)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert_close(got.detach(), expected.detach(), torch.float32, "compiled")


@pytest.mark.skipif(not (os.environ.get("CI") and shutil.which("nvcc")), reason="checked in CI, where nvcc is present")
def test_ci_built_the_cudnn_graphs():
    """CI installs nvidia-cudnn-frontend (.ci/install): setup.py must have compiled the cuDNN graphs."""
    info = fastres.build_info()
    assert info["cudnn_graphs"] and info["cudnn_frontend_version"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastres::cudnn_conv_genstats", "CUDA")


def test_batch_norm_finalize_registered_with_fake_and_cpu_kernel():
    s, q = _randn(8, dtype=torch.float32, seed=1).abs(), _randn(8, dtype=torch.float32, seed=2).abs() + 10
    torch.library.opcheck(torch.ops.fastres.batch_norm_finalize,
                          (s, q, 5, None, None, torch.zeros(8), torch.ones(8), 0.1, 1e-5))


@pytest.mark.skipif(not (torch.cuda.is_available()
                         and torch._C._dispatch_has_kernel_for_dispatch_key("fastres::batch_norm_act_apply", "CUDA")),
                    reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 64, 13, 17), (2, 40, 7, 9), (1, 24, 1, 1), (2, 2048, 3, 3), (2, 3000, 2, 3)])
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_batch_norm_act_and_backward_match_float64(shape, dtype, layout, offset):
    """The CUDA kernels' vectorised (128-bit, shared-memory staged) and scalar paths: offset 1
    misaligns the storage (scalar path); C = 3000 is too many channels to stage."""
    def on_gpu(t):
        flat = torch.empty(t.numel() + offset, dtype=t.dtype, device="cuda")
        view = flat[offset:].view(t.permute(0, 2, 3, 1).shape if layout == "channels_last" else t.shape)
        view = view.permute(0, 3, 1, 2) if layout == "channels_last" else view
        return view.copy_(t)

    x64 = _randn(*shape, layout=layout, seed=1, scale=3.0) + 0.5
    dy64 = _randn(*shape, layout=layout, seed=2)
    gamma, beta, mean, var = random_bn_state(shape[1], torch.Generator().manual_seed(0))
    x = on_gpu(x64.to(dtype)).requires_grad_()
    rm, rv = mean.cuda(), var.cuda()
    with fastres.use_backend("cpp"):
        y = ops.batch_norm_act(x, gamma.cuda(), beta.cuda(), rm, rv, training=True, momentum=0.3, relu=True)
    y.backward(on_gpu(dy64.to(dtype)))
    xr = x64.to(dtype).double().requires_grad_()
    rm64, rv64 = mean.double(), var.double()
    ref = torch.relu(torch.nn.functional.batch_norm(xr, rm64, rv64, gamma.double(), beta.double(), True, 0.3, 1e-5))
    ref.backward(dy64.to(dtype).double())
    assert_close(y.cpu(), ref, dtype, "output")
    assert_close(x.grad.cpu(), xr.grad, dtype, "grad")
    assert_close(rm.cpu(), rm64, torch.float32, "running_mean")
    assert_close(rv.cpu(), rv64, torch.float32, "running_var")
