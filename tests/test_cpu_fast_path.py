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
    from helpers import randn

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


# ---- a block writes its output over its dead input (onednn.reusable_activations) ------------------

@pytest.fixture
def reuse_count(monkeypatch):
    taken = []
    original = onednn._reusable

    def counting(residual, x):
        result = original(residual, x)
        taken.append(result)
        return result

    monkeypatch.setattr(onednn, "_reusable", counting)
    return taken


def _pair(name="resnet50"):
    from helpers import build_pair
    return build_pair(name, num_classes=10)


@pytest.mark.skipif(not onednn.INPLACE_AVAILABLE, reason="no in-place oneDNN convolution in this torch")
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_outputs_written_in_place_give_the_same_numbers(reuse_count, name, mode):
    from helpers import assert_rel_close, randn
    tv, fr = _pair(name)
    x = randn(3, 3, 64, 64, seed=4, channels_last=True)
    x_before = x.clone()
    with mode():
        fast = fr.eval()(x)
        assert any(reuse_count), "no block reused its input"
        reuse_count.clear()
        handle = fr.fc.register_forward_hook(lambda *args: None)  # any hook: every output is fresh
        careful = fr(x)
        handle.remove()
        assert not any(reuse_count)
        expected = tv.eval()(x)
    assert torch.equal(fast, careful)
    assert_rel_close(fast, expected, 1e-4, what=name)
    assert torch.equal(x, x_before), "the caller's input changed"


def test_hooked_block_outputs_are_never_overwritten(reuse_count):
    from helpers import assert_rel_close, randn
    tv, fr = _pair("resnet50")
    captured = {}
    for model in (tv, fr):
        for i, block in enumerate(model.layer1):
            block.register_forward_hook(lambda m, inp, out, key=(model is fr, i): captured.__setitem__(key, out))
    x = randn(2, 3, 64, 64, seed=5)
    with torch.inference_mode():
        tv.eval()(x), fr.eval()(x)
    assert not any(reuse_count)
    for i in range(len(fr.layer1)):
        assert_rel_close(captured[(True, i)], captured[(False, i)], 1e-4, what=f"layer1[{i}] output")


def test_blocks_called_directly_keep_their_input(reuse_count):
    from helpers import randn
    _, fr = _pair("resnet50")
    h = randn(2, 64, 9, 9, seed=6, channels_last=True)
    h_before = h.clone()
    with torch.inference_mode():
        fr.eval().layer1(h)
    assert torch.equal(h, h_before) and not any(reuse_count)


def test_custom_blocks_turn_reuse_off(reuse_count):
    from helpers import randn

    class MyBottleneck(fastres.Bottleneck):
        pass
    torch.manual_seed(0)
    model = fastres.ResNet(MyBottleneck, [1, 1, 1, 1], num_classes=10).eval()
    with torch.inference_mode():
        model(randn(1, 3, 64, 64, seed=7))
    assert not any(reuse_count)
