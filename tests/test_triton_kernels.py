"""The Triton backend as a whole: its custom operators' registration (opcheck), ResNet-18 on it against
torchvision (eval, and a training step in fp32 held to torchvision fp32's own error against float64),
and torch.compile(fullgraph=True) of a whole model. The op-level tests of the Triton kernels live in
the per-op files, parametrised over implementations: tests/test_conv2d_act.py, test_bottleneck_tail.py,
test_batch_norm_act.py, test_add_relu.py and test_norm_conv.py.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
where every program costs milliseconds: shapes stay tiny.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import fastres
from fastres.ops import registry

from helpers import TRITON_DEVICE as DEVICE, triton_randn as _randn
from reference_math import assert_close, random_bn_state

pytestmark = pytest.mark.skipif("triton" not in fastres.available_backends(),
                                reason="the Triton backend is not available here")


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
