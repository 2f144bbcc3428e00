"""The rest of the ResNet family (issue 6): v1 stride placement, parameter/MAC counting
(the paper's Table 1), CIFAR ResNets with option-A/B shortcuts, pre-activation ResNet v2.

CPU-sized: inputs of 32x32 or less, float64 where exactness matters, BN statistics randomized.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torchvision.models import resnet as tv_resnet

import fastres
from helpers import (assert_rel_close, backend_scope, compare_train_results, eval_on, randn, randomize_bn_,
                      train_step)



# ---------------------------------------------------------------------------------------------
# 1. v1 (stride on the first 1x1) vs v1.5 (stride on the 3x3)
# ---------------------------------------------------------------------------------------------

def _strides(model):
    return {name: m.stride for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_stride_in_1x1_placement_and_shapes():
    with torch.device("meta"):   # structure only
        v15 = fastres.resnet50(num_classes=10)
        v1 = fastres.resnet50(num_classes=10, stride_in_1x1=True)
    s15, s1 = _strides(v15), _strides(v1)
    for layer in ("layer2", "layer3", "layer4"):
        assert s15[f"{layer}.0.conv1"] == (1, 1) and s15[f"{layer}.0.conv2"] == (2, 2)
        assert s1[f"{layer}.0.conv1"] == (2, 2) and s1[f"{layer}.0.conv2"] == (1, 1)
        assert s1[f"{layer}.0.downsample.0"] == (2, 2)
        assert s1[f"{layer}.1.conv1"] == (1, 1) and s1[f"{layer}.1.conv2"] == (1, 1)
    assert s1["layer1.0.conv1"] == (1, 1) and s1["layer1.0.conv2"] == (1, 1)
    assert v1.state_dict().keys() == v15.state_dict().keys()
    # same construction random stream: identical initial weights
    torch.manual_seed(0)
    a = fastres.resnet18()
    torch.manual_seed(0)
    b = fastres.resnet18(stride_in_1x1=True)   # BasicBlocks: no 1x1 to move the stride to
    assert _strides(a) == _strides(b)
    v15 = fastres.ResNet(fastres.Bottleneck, [1, 1, 1, 1], num_classes=10)
    v1 = fastres.ResNet(fastres.Bottleneck, [1, 1, 1, 1], num_classes=10, stride_in_1x1=True)
    for x_shape in [(2, 3, 32, 32), (1, 3, 29, 31)]:
        x = randn(*x_shape)
        assert eval_on(v1, x).shape == (x_shape[0], 10)
    # intermediate shapes agree with v1.5 (stride moved, not added)
    feats = {}
    for name, model in (("v1", v1), ("v15", v15)):
        handles = [getattr(model, f"layer{i}").register_forward_hook(
            lambda m, i, o, name=name, k=i: feats.__setitem__((name, k), o.shape)) for i in range(1, 5)]
        eval_on(model, randn(1, 3, 32, 32))
        for h in handles:
            h.remove()
    for i in range(1, 5):
        assert feats[("v1", i)] == feats[("v15", i)]


def test_bottleneck_constructor_accepts_stride_in_1x1():
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    block = fastres.Bottleneck(16, 8, stride=2, downsample=down, stride_in_1x1=True)
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    default = fastres.Bottleneck(16, 8, stride=2, downsample=copy.deepcopy(down))
    assert default.conv1.stride == (1, 1) and default.conv2.stride == (2, 2)
    assert eval_on(block, randn(2, 16, 9, 9)).shape == (2, 32, 5, 5)


def _v1_reference(fr_model):
    """A torchvision ResNet with the strides moved by hand, carrying fr_model's weights."""
    layers = [len(getattr(fr_model, f"layer{i}")) for i in range(1, 5)]
    ref = tv_resnet.ResNet(tv_resnet.Bottleneck, layers, num_classes=fr_model.fc.out_features)
    for m in ref.modules():
        if isinstance(m, tv_resnet.Bottleneck) and m.conv2.stride != (1, 1):
            m.conv1.stride, m.conv2.stride = m.conv2.stride, (1, 1)
    ref.load_state_dict(fr_model.state_dict())
    return ref


def _reference_block(block, x):
    """Hand-written functional v1 Bottleneck (eval), independent of torchvision's forward."""
    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    s = block.conv1.stride
    out = F.relu(bn(F.conv2d(x, block.conv1.weight, stride=s), block.bn1))
    out = F.relu(bn(F.conv2d(out, block.conv2.weight, padding=1), block.bn2))
    out = bn(F.conv2d(out, block.conv3.weight), block.bn3)
    short = bn(F.conv2d(x, block.downsample[0].weight, stride=s), block.downsample[1])
    return F.relu(out + short)


@pytest.mark.parametrize("backend", ["default", "torch"])
def test_stride_in_1x1_block_matches_hand_reference(backend):
    torch.manual_seed(3)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    block = randomize_bn_(fastres.Bottleneck(16, 8, stride=2, downsample=down, stride_in_1x1=True)).double()
    x = randn(2, 16, 9, 9, dtype=torch.float64)
    expected = _reference_block(block.eval(), x)
    assert_rel_close(eval_on(block, x, backend), expected, what="v1 bottleneck eval")


@pytest.mark.parametrize("backend", ["default", "torch"])
def test_stride_in_1x1_model_matches_reference_eval_and_train(backend):
    torch.manual_seed(1)
    fr = randomize_bn_(fastres.ResNet(fastres.Bottleneck, [1, 1, 2, 1], num_classes=10, stride_in_1x1=True))
    fr = fr.double()
    ref = _v1_reference(fr).double()
    for i, shape in enumerate([(2, 3, 32, 32), (1, 3, 27, 30)]):
        x = randn(*shape, seed=i, dtype=torch.float64)
        assert_rel_close(eval_on(fr, x, backend), eval_on(ref, x), what=f"v1 eval {shape}")
    x = randn(2, 3, 24, 24, seed=5, dtype=torch.float64)
    expected = train_step(copy.deepcopy(ref), x, layer_hooks=True)
    with backend_scope(backend):
        actual = train_step(copy.deepcopy(fr), x, layer_hooks=True)
    compare_train_results(actual, expected, rtol=1e-8, what=f"v1 train [{backend}]")
    # and v1 really differs from v1.5 (the test can fail)
    v15 = fastres.ResNet(fastres.Bottleneck, [1, 1, 2, 1], num_classes=10).double()
    v15.load_state_dict(fr.state_dict())
    assert (eval_on(v15, x) - eval_on(ref, x)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 2. counting: the paper's Table 1 and torchvision's figures
# ---------------------------------------------------------------------------------------------

PAPER_TABLE1 = {"resnet18": 1.8e9, "resnet34": 3.6e9, "resnet50": 3.8e9, "resnet101": 7.6e9, "resnet152": 11.3e9}


@pytest.mark.parametrize("name", list(PAPER_TABLE1))
def test_count_macs_reproduces_paper_table1(name):
    with torch.device("meta"):   # shapes only: no weight initialisation, no arithmetic
        model = getattr(fastres, name)(stride_in_1x1=True)
    macs = fastres.count_macs(model)
    assert isinstance(macs, int)
    assert abs(macs - PAPER_TABLE1[name]) <= 0.03 * PAPER_TABLE1[name], f"{name}: {macs / 1e9:.3f} GMACs"


def test_count_torchvision_resnet50_v15():
    with torch.device("meta"):
        model = fastres.resnet50()
        tv = tvm.resnet50()
    assert fastres.count_params(model) == 25_557_032 == fastres.count_params(tv)
    macs = fastres.count_macs(model)
    assert abs(macs - 4.09e9) <= 0.005e9, macs
    assert fastres.count_macs(tv) == macs
    assert fastres.count_macs(model, input_size=(2, 3, 224, 224)) == 2 * macs


def test_count_macs_matches_hand_count_and_real_forward():
    from fastres.models.flops import count_macs as bench_count
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 8, 1, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    # conv1: 4x4x4 outputs x 27; conv2: 8x4x4 x 2; fc: 5 x 8
    assert fastres.count_macs(model, (1, 3, 8, 8)) == 64 * 27 + 128 * 2 + 40
    real = fastres.resnet18(num_classes=10)
    assert fastres.count_macs(real, (1, 3, 32, 32)) == bench_count(real, torch.randn(1, 3, 32, 32))
    assert real.conv1.weight.device.type == "cpu"   # the model itself is left alone
    assert fastres.count_params(model) == 4 * 27 + 2 * 4 + 8 * 2 + 8 + 8 * 5 + 5   # conv, bn, conv+bias, fc


def test_count_bad_input():
    with pytest.raises(TypeError, match="model"):
        fastres.count_params("resnet50")
    with pytest.raises(TypeError, match="model"):
        fastres.count_macs(None)
    with pytest.raises(ValueError, match="input_size"):
        fastres.count_macs(nn.Linear(2, 2), input_size=(1, 0))


# ---------------------------------------------------------------------------------------------
# 3. CIFAR ResNets (section 4.2)
# ---------------------------------------------------------------------------------------------

CIFAR_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6, 1202: 19.4e6}


@pytest.mark.parametrize("depth", list(CIFAR_PARAMS))
def test_cifar_parameter_counts_match_paper(depth):
    with torch.device("meta"):
        model = getattr(fastres, f"cifar_resnet{depth}")()
    n = (depth - 2) // 6
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    params = fastres.count_params(model)
    assert abs(params - CIFAR_PARAMS[depth]) <= 0.02 * CIFAR_PARAMS[depth], params
    assert fastres.count_macs(model, (1, 3, 32, 32)) > 0   # forward runs (on meta tensors)
    with torch.device("meta"):
        b = getattr(fastres, f"cifar_resnet{depth}")(shortcut="B")
    # B adds two projections: 16->32 and 32->64 (1x1 conv + BN)
    assert fastres.count_params(b) - params == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def test_option_a_shortcut_hand_computed():
    from fastres.models.cifar import ZeroPadShortcut
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float64).reshape(2, 2, 4, 4)
    out = ZeroPadShortcut(2, 4, 2)(x)
    expected = torch.zeros(2, 4, 2, 2, dtype=torch.float64)
    for n in range(2):
        for c in range(2):
            base = n * 32 + c * 16
            expected[n, c] = torch.tensor([[base + 0, base + 2], [base + 8, base + 10]], dtype=torch.float64)
    assert torch.equal(out, expected)
    model = fastres.cifar_resnet20()
    assert sum(p.numel() for p in model.layer2[0].downsample.parameters()) == 0
    # A block with the option-A shortcut == a hand-written one
    block = randomize_bn_(model.layer2[0]).double().eval()
    y = randn(2, 16, 8, 8, dtype=torch.float64)

    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    h = F.relu(bn(F.conv2d(y, block.conv1.weight, stride=2, padding=1), block.bn1))
    h = bn(F.conv2d(h, block.conv2.weight, padding=1), block.bn2)
    short = torch.cat([y[:, :, ::2, ::2], torch.zeros(2, 16, 4, 4, dtype=torch.float64)], 1)
    for backend in ("default", "torch"):
        assert_rel_close(eval_on(block, y, backend), F.relu(h + short), what=f"option A [{backend}]")


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110, 1202])
def test_cifar_forward_backward(depth):
    model = getattr(fastres, f"cifar_resnet{depth}")(num_classes=7)
    x = randn(2, 3, 4, 4)   # eval is covered by test_cifar_fused_matches_module_reference
    y = model.train()(x)
    assert y.shape == (2, 7)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("backend", ["default", "torch"])
def test_cifar_fused_matches_module_reference(shortcut, backend):
    torch.manual_seed(2)
    fr = randomize_bn_(fastres.cifar_resnet20(shortcut=shortcut)).double()
    ref = copy.deepcopy(fr)
    for m in ref.modules():   # hooks make every block run torchvision's plain module forward
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda *a: None)
    x = randn(2, 3, 16, 16, seed=4, dtype=torch.float64)
    assert_rel_close(eval_on(fr, x, backend), eval_on(ref, x), what=f"cifar eval {shortcut}")
    expected = train_step(copy.deepcopy(ref), x)
    with backend_scope(backend):
        actual = train_step(copy.deepcopy(fr), x)
    compare_train_results(actual, expected, rtol=1e-8, what=f"cifar train {shortcut} [{backend}]")


def test_cifar_bad_shortcut():
    with pytest.raises(ValueError, match="shortcut"):
        fastres.cifar_resnet20(shortcut="C")


# ---------------------------------------------------------------------------------------------
# 4. pre-activation ResNet v2
# ---------------------------------------------------------------------------------------------

def _module_reference(model):
    """A copy whose units run their plain module forward (a hook on every ReLU disables fusion)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda *a: None)
    return ref


V2_LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3],
             200: [3, 24, 36, 3]}


@pytest.mark.parametrize("depth", list(V2_LAYERS))
def test_resnet_v2_structure_and_counts(depth):
    from fastres.models.preact import PreActBasicBlock, PreActBottleneck
    with torch.device("meta"):
        model = getattr(fastres, f"resnet_v2_{depth}")()
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == V2_LAYERS[depth]
    kind = PreActBasicBlock if depth < 50 else PreActBottleneck
    assert all(isinstance(u, kind) for i in range(1, 5) for u in getattr(model, f"layer{i}"))
    keys = set(model.state_dict())
    assert {"conv1.weight", "layer1.0.bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
            "final_bn.weight", "final_bn.num_batches_tracked", "fc.weight"} <= keys
    assert "bn1.weight" not in keys and not any(k.startswith("layer2.0.downsample.1") for k in keys)
    # same conv/fc shapes as v1.5 (minus the stem BN, projection BNs, plus a BN per unit input): same MACs
    with torch.device("meta"):
        v1 = getattr(fastres, f"resnet{depth}")() if depth != 200 else None
    macs = fastres.count_macs(model)
    if v1 is not None:
        assert macs == fastres.count_macs(v1)
    else:
        assert abs(macs - 15.0e9) < 0.1e9   # ResNet-200: 15 GMACs


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152, 200])
def test_resnet_v2_forward_backward(depth):
    model = getattr(fastres, f"resnet_v2_{depth}")(num_classes=5)
    # 4 values per channel in layer4: with 2, training BN's gradient grows ~1e30 through 100+ layers
    # (torchvision-style BN does the same), which would overflow and test nothing.
    x = randn(4, 3, 32, 32)
    out, xgrad, grads, _ = train_step(model, x)
    assert out.shape == (4, 5) and torch.isfinite(xgrad).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert eval_on(model, x).shape == (4, 5)


@pytest.mark.parametrize("backend", ["default", "torch"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_v2_fused_matches_modules_eval_and_train(block, backend, monkeypatch):
    from fastres import ops
    from fastres.models import preact
    torch.manual_seed(5)
    kind = preact.PreActBasicBlock if block == "basic" else preact.PreActBottleneck
    fr = randomize_bn_(preact.ResNetV2(kind, [2, 1, 1, 1], num_classes=10)).double()
    ref = _module_reference(fr)
    calls = []
    real = ops.batch_norm_act
    monkeypatch.setattr(ops, "batch_norm_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    for i, shape in enumerate([(2, 3, 32, 32), (1, 3, 29, 27)]):
        x = randn(*shape, seed=20 + i, dtype=torch.float64)
        assert_rel_close(eval_on(fr, x, backend), eval_on(ref, x), what=f"v2 eval {shape}")
    assert calls, "the fused pre-activation was not used"
    x = randn(2, 3, 32, 32, seed=30, dtype=torch.float64)
    expected = train_step(copy.deepcopy(ref), x, layer_hooks=True)
    with backend_scope(backend):
        actual = train_step(copy.deepcopy(fr), x, layer_hooks=True)
    compare_train_results(actual, expected, rtol=1e-8, what=f"v2 train {block} [{backend}]")


def test_resnet_v2_projection_from_preactivated_input():
    from fastres.models import preact
    torch.manual_seed(0)
    unit = randomize_bn_(preact.PreActBottleneck(16, 8, 2, nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False))))
    unit = unit.double().eval()
    x = randn(2, 16, 8, 8, dtype=torch.float64)

    def bnrelu(t, m):
        return F.relu(F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps))
    pre = bnrelu(x, unit.bn1)
    h = bnrelu(F.conv2d(pre, unit.conv1.weight), unit.bn2)
    h = bnrelu(F.conv2d(h, unit.conv2.weight, stride=2, padding=1), unit.bn3)
    expected = F.conv2d(h, unit.conv3.weight) + F.conv2d(pre, unit.downsample[0].weight, stride=2)
    for backend in ("default", "torch"):
        assert_rel_close(eval_on(unit, x, backend), expected, what=f"v2 unit [{backend}]")
