"""The "cpp" backend (fastres._C) as a whole: its operators' registration (opcheck, batch_norm_finalize's
fake and CPU kernels), the CI build's CUDA kernels and cuDNN graphs, ResNet-18 on it against torchvision
in float64 and torch.compile(fullgraph=True) of a whole model. The op-level tests of its kernels (float64
references, gradchecks, determinism whatever the thread count, the CUDA BatchNorm kernels) live in the
per-op files, parametrised over implementations: tests/test_conv2d_act.py, test_bottleneck_tail.py,
test_batch_norm_act.py, test_add_relu.py (and tests/test_cudnn_graphs.py for the cuDNN graphs)."""
from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
import torchvision

import fastres

from helpers import randn64 as _randn
from reference_math import assert_close, random_bn_state

pytestmark = pytest.mark.skipif("cpp" not in fastres.available_backends(), reason="fastres._C is not built")


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
