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
    # ResNet-50's 53 convolutions in 49 calls: the stem, conv1 and conv2 of 16 blocks, conv3 of the 12
    # identity blocks, and 4 projection tails that run conv3 and the shortcut as one convolution.
    assert len(onednn_calls) == 49


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


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_bottleneck_tail_joined_weight_follows_edits(stride, mode):
    # The fast path runs conv3 and the shortcut as one conv over [h | x] with a cached [w3 | wd]:
    # every edit of either weight, or a different shortcut weight, must show in the next result.
    from reference_math import assert_close, bottleneck_tail as tail_ref
    from conftest import randn

    h = randn(3, 16, 7, 5, seed=1, channels_last=True)
    x = randn(3, 24, 7 * stride, 5 * stride, seed=2, channels_last=True)
    w3, wd, bias = randn(40, 16, 1, 1, seed=3), randn(40, 24, 1, 1, seed=4), randn(40, seed=5)
    other_wd = randn(40, 24, 1, 1, seed=6)

    def check(shortcut_weight, what):
        with mode():
            y = fastres.ops.bottleneck_tail(h, w3, x, shortcut_weight, bias, stride=stride, relu=True)
        assert_close(y, tail_ref(h, w3, x, shortcut_weight, bias, stride, True), what=what)
    check(wd, "first call")
    wd.mul_(-2.0)
    check(wd, "after wd.mul_")
    w3.add_(0.5)
    check(wd, "after w3.add_")
    check(other_wd, "another shortcut weight")
