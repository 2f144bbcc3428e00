"""The CPU inference fast path (oneDNN fused convolutions) is really taken, and only when it may be."""
import pytest
import torch

import fastres
from fastres.ops import onednn

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="this torch build has no oneDNN fused convolution")


@pytest.fixture
def onednn_calls(monkeypatch):
    calls = []
    original = onednn.conv2d_act

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(onednn, "conv2d_act", counting)
    return calls


def _model():
    torch.manual_seed(0)
    return fastres.resnet50(num_classes=10).eval()


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_eval_inference_runs_every_conv_on_onednn(onednn_calls, mode):
    model = _model()
    with mode():
        model(torch.randn(1, 3, 37, 45))
    # 53 convolutions in ResNet-50: 49 direct calls + 4 projection tails that make 2 calls each.
    assert len(onednn_calls) == 53


def test_training_and_autograd_stay_on_the_reference(onednn_calls):
    model = _model()
    model(torch.randn(1, 3, 37, 45))  # eval, but parameters require grad: folding runs inside autograd
    model.train()
    model(torch.randn(2, 3, 37, 45)).sum().backward()
    assert onednn_calls == []


def test_torch_backend_never_takes_the_fast_path(onednn_calls):
    model = _model()
    with fastres.use_backend("torch"), torch.inference_mode():
        model(torch.randn(1, 3, 37, 45))
    assert onednn_calls == []
