"""fastres's model zoo against torchvision: construction, eval and train equivalence, options,
from_torchvision, weights=, copying/serialisation, memory formats and dtypes.

CPU-sized on purpose: small inputs (eval 37x45 / 32x32, training 48x48 at batch 2, which
is the smallest that keeps BatchNorm in layer4 well defined) and num_classes=10 for the zoo.
"""
from __future__ import annotations

import copy
import functools
import io
import pickle

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import resnet as tv_resnet

import fastres
from conftest import (BIG, CONSTRUCTORS, assert_exactly_equal, assert_rel_close, assert_state_dicts_equal,
                      backend_scope, build_pair, compare_train_accuracy, compare_train_results, eval_on, randn,
                      randomize_bn_, rel_error, same_storage, train_step)

BACKENDS = ["default", "torch"]
TRAIN_RTOL64 = 1e-8   # float64 training: measured ~1e-11 between two summation orders
EVAL_INPUTS = [((1, 3, 37, 45), False), ((1, 3, 37, 45), True), ((2, 3, 32, 32), False), ((2, 3, 32, 32), True)]
TRAIN_SHAPE = (2, 3, 48, 48)   # layer4 at 2x2: 8 values per channel


def _assert_eval_matches(tv, fr, shapes=EVAL_INPUTS, backend="default", dtype=torch.float32, what=""):
    for i, (shape, channels_last) in enumerate(shapes):
        x = randn(*shape, seed=10 + i, dtype=dtype, channels_last=channels_last)
        expected = eval_on(tv, x)
        actual = eval_on(fr, x, backend)
        assert_rel_close(actual, expected, what=f"{what} eval {shape} channels_last={channels_last} [{backend}]")


def _train_both(tv, fr, x, backend="default", layer_hooks=True):
    """One training step of (copies of) both models; returns (fastres results, torchvision results)."""
    expected = train_step(copy.deepcopy(tv), x, layer_hooks=layer_hooks)
    with backend_scope(backend):
        actual = train_step(copy.deepcopy(fr), x, layer_hooks=layer_hooks)
    return actual, expected


def _assert_train_matches(tv, fr, x, backend="default", fp32_direct=False, what=""):
    """float64: fastres == torchvision to 1e-8. fp32: as accurate as torchvision fp32 (or direct 1e-4).
    The models are not modified (each step runs on a copy)."""
    x64 = x.double()
    exact = train_step(copy.deepcopy(tv).double(), x64, layer_hooks=True)
    with backend_scope(backend):
        actual64 = train_step(copy.deepcopy(fr).double(), x64, layer_hooks=True)
    compare_train_results(actual64, exact, TRAIN_RTOL64, f"{what} float64 [{backend}]")
    del actual64
    actual32, reference32 = _train_both(tv, fr, x, backend)
    if fp32_direct:
        compare_train_results(actual32, reference32, 1e-4, f"{what} fp32 [{backend}]")
    else:
        compare_train_accuracy(actual32, reference32, exact, f"{what} fp32 [{backend}]")


# =============================================================================================
# 1. every constructor
# =============================================================================================

@pytest.fixture(scope="module",
                params=[pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in CONSTRUCTORS])
def zoo_pair(request):
    name = request.param
    tv, fr = build_pair(name, seed=0, randomize=False, num_classes=10)
    # Same seed -> same initial weights, compared before BN is randomized.
    init_mismatch = None
    try:
        assert_state_dicts_equal(fr.state_dict(), tv.state_dict(), f"{name} initial state_dict")
    except AssertionError as error:
        init_mismatch = str(error)
    randomize_bn_(tv, 1)
    randomize_bn_(fr, 1)
    yield name, tv, fr, init_mismatch


def test_constructor_types_and_initial_weights(zoo_pair):
    name, tv, fr, init_mismatch = zoo_pair
    assert isinstance(fr, fastres.ResNet) and isinstance(fr, tv_resnet.ResNet)
    block = fastres.BasicBlock if name in ("resnet18", "resnet34") else fastres.Bottleneck
    blocks = [m for m in fr.modules() if isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck))]
    assert blocks and all(type(m) is block for m in blocks), f"{name}: blocks are not {block.__name__}"
    assert [n for n, _ in fr.named_modules()] == [n for n, _ in tv.named_modules()]
    assert [type(m) for _, m in fr.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))] == \
           [type(m) for _, m in tv.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    assert fr.fc.out_features == 10
    assert init_mismatch is None, init_mismatch
    assert_state_dicts_equal(fr.state_dict(), tv.state_dict(), f"{name} randomized state_dict")


@pytest.mark.parametrize("backend", BACKENDS)
def test_constructor_eval_matches_torchvision(zoo_pair, backend):
    name, tv, fr, _ = zoo_pair
    _assert_eval_matches(tv, fr, backend=backend, what=name)
    assert not fr.training


def test_constructor_train_matches_torchvision(zoo_pair):
    name, tv, fr, _ = zoo_pair
    x = randn(*TRAIN_SHAPE, seed=3)
    _assert_train_matches(tv, fr, x, fp32_direct=name in ("resnet18", "resnet34"), what=name)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_constructor_train_matches_torchvision_torchbackend_scope(name):
    """The "torch" backend in training, on one net of each block kind."""
    tv, fr = build_pair(name, num_classes=10)
    _assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=3), "torch", fp32_direct=name == "resnet18", what=name)


# =============================================================================================
# 2. constructor options
# =============================================================================================

def _pair_from_classes(block_name, layers, seed=0, randomize=True, **kwargs):
    tv_block = getattr(tv_resnet, block_name)
    fr_block = getattr(fastres, block_name)
    torch.manual_seed(seed)
    tv = tv_resnet.ResNet(tv_block, layers, **kwargs)
    torch.manual_seed(seed)
    fr = fastres.ResNet(fr_block, layers, **kwargs)
    assert_state_dicts_equal(fr.state_dict(), tv.state_dict(), f"ResNet({block_name}, {layers}, {kwargs})")
    if randomize:
        randomize_bn_(tv, seed + 1)
        randomize_bn_(fr, seed + 1)
    return tv, fr


def test_num_classes():
    tv, fr = build_pair("resnet18", num_classes=7)
    assert fr.fc.out_features == 7 and fr.fc.weight.shape == (7, 512)
    x = randn(2, 3, 32, 32)
    y = eval_on(fr, x)
    assert y.shape == (2, 7)
    assert_rel_close(y, eval_on(tv, x))


def test_default_num_classes_is_1000():
    tv, fr = build_pair("resnet18")
    assert fr.fc.out_features == 1000
    _assert_eval_matches(tv, fr, shapes=[((1, 3, 37, 45), False)], what="resnet18 1000 classes")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual(name):
    tv, fr = build_pair(name, randomize=False, zero_init_residual=True, num_classes=10)
    assert_state_dicts_equal(fr.state_dict(), tv.state_dict(), f"{name} zero_init_residual")
    last_bn = "bn2" if name == "resnet18" else "bn3"
    blocks = [m for m in fr.modules() if isinstance(m, (fastres.BasicBlock, fastres.Bottleneck))]
    assert blocks
    for block in blocks:
        assert torch.count_nonzero(getattr(block, last_bn).weight) == 0
    # The residual branches are off: the nets still agree, in eval and in training.
    _assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:2], what=f"{name} zero_init_residual")
    x = randn(*TRAIN_SHAPE, seed=4)
    _assert_train_matches(tv, fr, x, fp32_direct=True, what=f"{name} zero_init_residual")


def test_groups_and_width_per_group():
    tv, fr = _pair_from_classes("Bottleneck", [1, 2, 1, 1], groups=4, width_per_group=8, num_classes=10)
    assert fr.layer1[0].conv2.groups == 4 and fr.layer1[0].conv2.out_channels == 4 * int(64 * 8 / 64)
    _assert_eval_matches(tv, fr, what="groups=4 width=8")
    _assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:1], backend="torch", what="groups=4 width=8")
    _assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=5), what="groups=4 width=8")


def test_replace_stride_with_dilation():
    kwargs = dict(replace_stride_with_dilation=[False, True, True], num_classes=10)
    tv, fr = _pair_from_classes("Bottleneck", [1, 1, 2, 1], **kwargs)
    assert fr.layer3[1].conv2.dilation == (2, 2) and fr.layer4[0].conv2.stride == (1, 1)
    assert fr.layer4[0].conv2.dilation == (2, 2) and fr.layer4[0].downsample[0].stride == (1, 1)
    _assert_eval_matches(tv, fr, what="dilation")
    _assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:1], backend="torch", what="dilation")
    _assert_train_matches(tv, fr, randn(2, 3, 32, 32, seed=6), what="dilation")


def test_replace_stride_with_dilation_resnet50eval_output():
    tv, fr = build_pair("resnet50", replace_stride_with_dilation=[False, True, True], num_classes=10)
    _assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:2], what="resnet50 dilation")


def test_basicblock_dilation_raises_like_torchvision():
    with pytest.raises(NotImplementedError):
        tvm.resnet18(replace_stride_with_dilation=[False, True, True])
    with pytest.raises(NotImplementedError):
        fastres.resnet18(replace_stride_with_dilation=[False, True, True])


def test_custom_batchnorm_partial_eps_and_cumulative_momentum():
    norm = functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=None)
    tv, fr = _pair_from_classes("Bottleneck", [1, 1, 1, 1], norm_layer=norm, num_classes=10)
    assert fr.bn1.eps == 1e-3 and fr.layer1[0].bn2.momentum is None
    _assert_eval_matches(tv, fr, what="eps=1e-3")
    x = randn(*TRAIN_SHAPE, seed=7)
    _assert_train_matches(tv, fr, x, what="momentum=None")
    # Cumulative average: a few steps with different batches, buffers after each.
    tv, fr = tv.double(), fr.double()
    for step in range(3):
        xs = randn(*TRAIN_SHAPE, seed=20 + step, dtype=torch.float64)
        expected = train_step(tv, xs)
        actual = train_step(fr, xs)
        compare_train_results(actual, expected, TRAIN_RTOL64, f"momentum=None step {step}")
    assert int(fr.bn1.num_batches_tracked) == 3
    _assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:2], dtype=torch.float64, what="after cumulative steps")


@pytest.mark.parametrize("block_name", ["BasicBlock", "Bottleneck"])
def test_batchnorm_without_running_stats(block_name):
    """track_running_stats=False: batch statistics in eval too, nothing to fold.
    (affine=False cannot be built by torchvision's ResNet; see the standalone block cases.)"""
    norm = functools.partial(nn.BatchNorm2d, track_running_stats=False)
    tv, fr = _pair_from_classes(block_name, [1, 1, 1, 1], norm_layer=norm, num_classes=10)
    assert fr.bn1.running_mean is None
    _assert_eval_matches(tv, fr, shapes=[(TRAIN_SHAPE, False), (TRAIN_SHAPE, True)], what="no running stats")
    _assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=8), fp32_direct=True, what="no running stats")


def _randomize_groupnorm_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


@pytest.mark.parametrize("block_name", ["BasicBlock", "Bottleneck"])
def test_groupnorm_norm_layer_falls_back(block_name):
    tv, fr = _pair_from_classes(block_name, [1, 1, 1, 1], randomize=False,
                                norm_layer=lambda c: nn.GroupNorm(4, c), num_classes=10)
    _randomize_groupnorm_(tv, 3)
    _randomize_groupnorm_(fr, 3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fr.modules())
    _assert_eval_matches(tv, fr, what=f"GroupNorm {block_name}")
    _assert_train_matches(tv, fr, randn(2, 3, 32, 32, seed=9), fp32_direct=True, what=f"GroupNorm {block_name}")


class _ShiftedBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward: fastres must not fold it as a plain BN."""

    def forward(self, x):
        return super().forward(x) * 0.5 + 0.25


def test_batchnorm_subclass_with_own_forward_is_honoured():
    tv, fr = _pair_from_classes("Bottleneck", [1, 1, 1, 1], norm_layer=_ShiftedBN, num_classes=10)
    _assert_eval_matches(tv, fr, what="BN subclass")
    _assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=10), what="BN subclass")


def test_replaced_activation_is_honoured():
    tv, fr = build_pair("resnet18", num_classes=10)
    for model in (tv, fr):
        model.relu = nn.LeakyReLU(0.2)
        model.layer2[0].relu = nn.Hardtanh(-0.5, 0.5)
        model.layer3[1].relu = nn.ELU()
    _assert_eval_matches(tv, fr, what="replaced ReLUs")
    _assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=11), fp32_direct=True, what="replaced ReLUs")


def test_forward_hooks_on_submodules_see_torchvision_values():
    """A hook on a conv must see the conv's own (unfolded) output, and a hook that changes a BN
    output must change the model output exactly as in torchvision."""
    tv, fr = build_pair("resnet50", num_classes=10)
    seen = {"tv": [], "fr": []}
    for key, model in (("tv", tv), ("fr", fr)):
        model.layer1[0].conv1.register_forward_hook(lambda m, i, o, key=key: seen[key].append(o.detach().clone()))
        model.layer2[0].bn3.register_forward_hook(lambda m, i, o: o * 1.5)
        model.layer3[0].downsample[1].register_forward_hook(lambda m, i, o: o - 0.1)
    _assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:2], what="hooks")
    assert len(seen["fr"]) == len(seen["tv"]) == 2
    for a, b in zip(seen["fr"], seen["tv"]):
        assert_rel_close(a.contiguous(), b.contiguous(), what="conv1 hook output")
    _assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=12), what="hooks")


def test_intermediate_layer_getter_and_syncbn_conversion():
    from torchvision.models._utils import IntermediateLayerGetter

    tv, fr = build_pair("resnet18", num_classes=10)
    x = randn(1, 3, 37, 45)
    tv.eval(), fr.eval()
    with torch.no_grad():
        feats_tv = IntermediateLayerGetter(tv, {"layer2": "a", "layer4": "b"})(x)
        feats_fr = IntermediateLayerGetter(fr, {"layer2": "a", "layer4": "b"})(x)
    for k in ("a", "b"):
        assert_rel_close(feats_fr[k].contiguous(), feats_tv[k].contiguous(), what=f"IntermediateLayerGetter {k}")
    sync_fr = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fr))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync_fr.modules())
    assert_rel_close(eval_on(sync_fr, x), eval_on(tv, x), what="SyncBatchNorm-converted eval")


# ---- blocks used on their own ----

def _conv1x1_bn(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


BLOCK_CASES = [
    # (block, inplanes, planes, stride, downsample (in, out, stride) or None, extra kwargs)
    ("BasicBlock", 16, 16, 1, None, {}),
    ("BasicBlock", 16, 24, 2, (16, 24, 2), {}),
    ("BasicBlock", 16, 24, 1, (16, 24, 1), {}),
    ("Bottleneck", 64, 16, 1, None, {}),
    ("Bottleneck", 32, 16, 1, (32, 64, 1), {}),
    ("Bottleneck", 32, 16, 2, (32, 64, 2), {}),
    ("Bottleneck", 32, 16, 2, (32, 64, 2), {"groups": 4, "base_width": 32}),
    ("Bottleneck", 64, 16, 1, None, {"dilation": 2}),
    ("BasicBlock", 16, 24, 2, (16, 24, 2), {"norm_layer": functools.partial(nn.BatchNorm2d, affine=False)}),
    ("Bottleneck", 32, 16, 2, (32, 64, 2), {"norm_layer": functools.partial(nn.BatchNorm2d, affine=False)}),
    ("Bottleneck", 32, 16, 1, (32, 64, 1), {"norm_layer": functools.partial(nn.BatchNorm2d, momentum=None)}),
]


def _block_id(case):
    block, inplanes, planes, stride, ds, kwargs = case
    extra = "".join(f"-{k}={getattr(v, 'keywords', v)}" for k, v in kwargs.items())
    return f"{block}-{inplanes}-{planes}-s{stride}-ds{ds is not None}{extra}".replace(" ", "")


@pytest.mark.parametrize("case", BLOCK_CASES, ids=_block_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_standalone_block_matches_torchvision(case, backend):
    block_name, inplanes, planes, stride, ds, kwargs = case
    torch.manual_seed(3)
    tv = getattr(tv_resnet, block_name)(inplanes, planes, stride, _conv1x1_bn(*ds) if ds else None, **kwargs)
    fr = getattr(fastres, block_name)(inplanes, planes, stride, _conv1x1_bn(*ds) if ds else None, **kwargs)
    assert isinstance(fr, getattr(tv_resnet, block_name))
    fr.load_state_dict(tv.state_dict())
    randomize_bn_(tv, 4)
    randomize_bn_(fr, 4)
    assert_state_dicts_equal(fr.state_dict(), tv.state_dict(), "block")
    for i, (shape, cl) in enumerate([((2, inplanes, 9, 11), False), ((2, inplanes, 9, 11), True),
                                     ((1, inplanes, 8, 8), False)]):
        x = randn(*shape, seed=30 + i, channels_last=cl)
        assert_rel_close(eval_on(fr, x, backend).contiguous(), eval_on(tv, x).contiguous(),
                         what=f"block eval {shape} cl={cl}")
    x = randn(2, inplanes, 9, 11, seed=40)
    # Blocks are shallow and well conditioned: fp32 training is compared directly.
    for dtype, rtol in ((torch.float64, TRAIN_RTOL64), (torch.float32, 1e-4)):
        tv_d, fr_d = copy.deepcopy(tv).to(dtype), copy.deepcopy(fr).to(dtype)
        expected = train_step(tv_d, x.to(dtype))
        with backend_scope(backend):
            actual = train_step(fr_d, x.to(dtype))
        compare_train_results(actual, expected, rtol, f"block train {dtype}")


# =============================================================================================
# 3. from_torchvision
# =============================================================================================

def _tv_model(name="resnet18", seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_bn_(getattr(tvm, name)(**kwargs), seed + 1)


@pytest.mark.parametrize("name,mode", [("resnet18", "train"), ("resnet18", "eval"), ("resnet50", "train"),
                                       ("resnext50_32x4d", "eval")])
def test_from_torchvision(name, mode):
    tv = _tv_model(name, num_classes=10)
    getattr(tv, mode)()
    before = {k: v.clone() for k, v in tv.state_dict().items()}
    fr = fastres.from_torchvision(tv)
    assert isinstance(fr, fastres.ResNet) and fr is not tv
    # The original is untouched: its class, blocks, mode and tensors.
    assert type(tv) is tv_resnet.ResNet
    assert all(type(m) in (tv_resnet.BasicBlock, tv_resnet.Bottleneck)
               for m in tv.modules() if isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)))
    assert_state_dicts_equal(tv.state_dict(), before, "original after conversion")
    # The copy: same tensors, same modes, fastres blocks, no shared storage.
    assert_state_dicts_equal(fr.state_dict(), before, "converted")
    assert [(n, m.training) for n, m in fr.named_modules()] == [(n, m.training) for n, m in tv.named_modules()]
    assert all(m.training == (mode == "train") for m in fr.modules())
    block = fastres.BasicBlock if name == "resnet18" else fastres.Bottleneck
    assert all(type(m) is block for m in fr.modules() if isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)))
    assert not same_storage(list(tv.parameters()) + list(tv.buffers()), list(fr.parameters()) + list(fr.buffers()))
    assert all(p.requires_grad for p in fr.parameters())
    # Same numbers.
    _assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:2], what=f"from_torchvision {name}")
    _assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=13), fp32_direct=name == "resnet18",
                          what=f"from_torchvision {name}")
    # Editing the converted model leaves the original alone (and vice versa).
    tv_before = {k: v.clone() for k, v in tv.state_dict().items()}
    with torch.no_grad():
        fr.conv1.weight.mul_(2)
        fr.layer1[0].bn1.running_var.mul_(3)
    assert_state_dicts_equal(tv.state_dict(), tv_before, "original after editing the converted model")


def test_from_torchvision_num_classes_and_eval_flag():
    tv = _tv_model("resnet18", num_classes=7).eval()
    fr = fastres.from_torchvision(tv)
    assert not fr.training and fr.fc.out_features == 7
    x = randn(2, 3, 32, 32)
    with torch.no_grad():
        y = fr(x)      # no .eval() call: the converted model must already be in eval mode
        assert y.shape == (2, 7)
        assert_rel_close(y, tv(x), what="converted eval model")
    # A converted model in eval mode must not touch its running statistics.
    assert_state_dicts_equal(fr.state_dict(), tv.state_dict(), "after eval forward")


def test_from_torchvision_of_fastres_model_and_bad_input():
    fr = fastres.from_torchvision(_tv_model("resnet18", num_classes=10))
    again = fastres.from_torchvision(fr)
    assert isinstance(again, fastres.ResNet) and again is not fr
    assert_state_dicts_equal(again.state_dict(), fr.state_dict())
    with pytest.raises((TypeError, ValueError)):
        fastres.from_torchvision(nn.Linear(3, 4))
    with pytest.raises((TypeError, ValueError)):
        fastres.from_torchvision("resnet18")


# =============================================================================================
# 4. weights=
# =============================================================================================

def _fake_weights(monkeypatch, enum_cls, name="resnet18"):
    """Monkeypatch enum_cls.get_state_dict to return a randomized torchvision state_dict."""
    tv = _tv_model(name, seed=5)
    sd = tv.state_dict()
    calls = []

    def get_state_dict(self, *args, **kwargs):
        calls.append((self, args, kwargs))
        return {k: v.clone() for k, v in sd.items()}

    monkeypatch.setattr(enum_cls, "get_state_dict", get_state_dict)
    return tv.eval(), sd, calls


@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT",
                                     "enum", "enum_default"])
def test_weights_resnet18(monkeypatch, weights):
    tv, sd, calls = _fake_weights(monkeypatch, tvm.ResNet18_Weights)
    if weights == "enum":
        weights = tvm.ResNet18_Weights.IMAGENET1K_V1
    elif weights == "enum_default":
        weights = tvm.ResNet18_Weights.DEFAULT
    fr = fastres.resnet18(weights=weights)
    assert len(calls) == 1 and calls[0][0] is tvm.ResNet18_Weights.IMAGENET1K_V1
    assert fr.fc.out_features == 1000 == len(tvm.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    assert_state_dicts_equal(fr.state_dict(), sd, "loaded weights")
    _assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:2], what="weights=")


def test_weights_progress_and_num_classes(monkeypatch):
    tv, sd, calls = _fake_weights(monkeypatch, tvm.ResNet18_Weights)
    fastres.resnet18(weights="DEFAULT", progress=False, num_classes=1000)
    assert calls[-1][2].get("progress") is False
    with pytest.raises(ValueError):
        fastres.resnet18(weights="DEFAULT", num_classes=10)
    with pytest.raises(ValueError):
        tvm.resnet18(weights="DEFAULT", num_classes=10)   # the behaviour being copied


def test_weights_resnet50_v2(monkeypatch):
    tv, sd, calls = _fake_weights(monkeypatch, tvm.ResNet50_Weights, "resnet50")
    for weights in ("IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2", tvm.ResNet50_Weights.DEFAULT):
        fr = fastres.resnet50(weights=weights)
        assert calls[-1][0] is tvm.ResNet50_Weights.IMAGENET1K_V2
        assert fr.fc.out_features == 1000
        assert_state_dicts_equal(fr.state_dict(), sd)
    _assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:1], what="resnet50 weights=")
    fastres.resnet50(weights="IMAGENET1K_V1")     # not the default: the name must be honoured
    assert calls[-1][0] is tvm.ResNet50_Weights.IMAGENET1K_V1


@pytest.mark.parametrize("bad", ["IMAGENET1K_V9", "imagenet", "ResNet50_Weights.IMAGENET1K_V1", ""])
def test_weights_unknown_name_raises_value_error(monkeypatch, bad):
    _, _, calls = _fake_weights(monkeypatch, tvm.ResNet18_Weights)
    with pytest.raises(ValueError):
        fastres.resnet18(weights=bad)
    assert not calls


def test_weights_wrong_enum_raises(monkeypatch):
    _, _, calls = _fake_weights(monkeypatch, tvm.ResNet18_Weights)
    with pytest.raises((TypeError, ValueError)):
        fastres.resnet18(weights=tvm.ResNet50_Weights.IMAGENET1K_V1)
    assert not calls


def test_every_constructor_accepts_its_weight_enum(monkeypatch):
    """Every constructor resolves "DEFAULT" through its own enum and loads what it returns
    (the returned state_dict is a fastres model's own, so nothing big is built twice)."""
    enums = {"resnet18": tvm.ResNet18_Weights, "resnet34": tvm.ResNet34_Weights, "resnet50": tvm.ResNet50_Weights,
             "resnet101": tvm.ResNet101_Weights, "resnet152": tvm.ResNet152_Weights,
             "resnext50_32x4d": tvm.ResNeXt50_32X4D_Weights, "resnext101_32x8d": tvm.ResNeXt101_32X8D_Weights,
             "resnext101_64x4d": tvm.ResNeXt101_64X4D_Weights, "wide_resnet50_2": tvm.Wide_ResNet50_2_Weights,
             "wide_resnet101_2": tvm.Wide_ResNet101_2_Weights}
    assert set(enums) == set(CONSTRUCTORS)
    for name in ("resnet34", "resnext50_32x4d", "wide_resnet50_2"):   # the rest share the same code path
        enum_cls = enums[name]
        torch.manual_seed(11)
        sd = randomize_bn_(getattr(tvm, name)(), 12).state_dict()
        monkeypatch.setattr(enum_cls, "get_state_dict", lambda self, *a, **k: sd)
        fr = getattr(fastres, name)(weights=enum_cls.DEFAULT)
        assert_state_dicts_equal(fr.state_dict(), sd, name)
        with pytest.raises(ValueError):
            getattr(fastres, name)(weights="NOPE")
        del fr, sd


# =============================================================================================
# 5. copies, state_dict round trip, pickling
# =============================================================================================

def test_deepcopy_and_state_dict_round_trip():
    tv, fr = build_pair("resnet18", num_classes=10)
    x = randn(2, 3, 32, 32)
    y = eval_on(fr, x)      # fills the fold cache
    twin = copy.deepcopy(fr)
    assert_rel_close(eval_on(twin, x), y, 1e-6, "deepcopy")
    with torch.no_grad():
        twin.layer1[0].conv1.weight.mul_(-1)
    assert rel_error(eval_on(twin, x), y) > 1e-3, "editing the copy had no effect"
    assert_exactly_equal(eval_on(fr, x), y, "original after editing its deepcopy")

    buffer = io.BytesIO()
    torch.save(fr.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)
    torch.manual_seed(123)
    fresh = fastres.resnet18(num_classes=10).eval()
    before = eval_on(fresh, x)          # a fresh model with its own cache
    assert rel_error(before, y) > 1e-3
    fresh.load_state_dict(sd)
    assert_state_dicts_equal(fresh.state_dict(), fr.state_dict(), "round trip")
    assert_rel_close(eval_on(fresh, x), y, 1e-6, "after load_state_dict")
    # The fastres state_dict loads into torchvision strictly, and the other way round.
    tv2 = tvm.resnet18(num_classes=10)
    tv2.load_state_dict(fr.state_dict(), strict=True)
    assert_rel_close(eval_on(tv2, x), eval_on(tv, x), 1e-6)


def test_train_step_on_deepcopy_matches_original():
    _, fr = build_pair("resnet18", num_classes=10)
    x = randn(*TRAIN_SHAPE, seed=14)
    twin = copy.deepcopy(fr)
    compare_train_results(train_step(twin, x), train_step(fr, x), 1e-6, "deepcopy train")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_pickle_whole_model(name):
    tv, fr = build_pair(name, num_classes=10)
    x = randn(1, 3, 37, 45)
    y = eval_on(fr, x)
    clone = pickle.loads(pickle.dumps(fr))
    assert type(clone) is fastres.ResNet and not clone.training
    assert_state_dicts_equal(clone.state_dict(), fr.state_dict(), "pickled")
    assert_rel_close(eval_on(clone, x), y, 1e-6, "pickled")
    buffer = io.BytesIO()
    torch.save(fr, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is fastres.ResNet
    assert_rel_close(eval_on(loaded, x), y, 1e-6, "torch.save(model)")
    compare_train_results(train_step(loaded, randn(*TRAIN_SHAPE)), train_step(copy.deepcopy(fr), randn(*TRAIN_SHAPE)),
                          1e-6, "pickled train")
    assert_rel_close(y, eval_on(tv, x), what="pickled vs torchvision")


# =============================================================================================
# 6. channels_last models, float64 models
# =============================================================================================

@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_model(name, backend):
    tv, fr = build_pair(name, num_classes=10)
    tv = tv.to(memory_format=torch.channels_last)
    fr = fr.to(memory_format=torch.channels_last)
    assert fr.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_eval_matches(tv, fr, backend=backend, what=f"channels_last {name}")
    if name == "resnet18":
        _assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=15, channels_last=True), backend, fp32_direct=True,
                              what="channels_last resnet18")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_modeleval_output(name, backend):
    tv, fr = build_pair(name, num_classes=10)
    tv, fr = tv.double(), fr.double()
    assert fr.conv1.weight.dtype == torch.float64
    for i, (shape, cl) in enumerate(EVAL_INPUTS[:3]):
        x = randn(*shape, seed=50 + i, dtype=torch.float64, channels_last=cl)
        y = eval_on(fr, x, backend)
        assert y.dtype == torch.float64
        assert_rel_close(y, eval_on(tv, x), 1e-10, f"float64 {name} {shape} cl={cl}")


def test_output_layout_and_dtype_like_torchvision():
    tv, fr = build_pair("resnet18", num_classes=10)
    for cl in (False, True):
        x = randn(2, 3, 32, 32, channels_last=cl)
        y, y_tv = eval_on(fr, x), eval_on(tv, x)
        assert y.shape == y_tv.shape and y.dtype == y_tv.dtype and y.is_contiguous()
    # a batch of one and a 1x1 feature map in layer4 (input 17x17)
    x = randn(1, 3, 17, 17, seed=2)
    assert_rel_close(eval_on(fr, x), eval_on(tv, x), what="17x17")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_cpu_autocast_bfloat16(name):
    """Under autocast the output is bf16 like torchvision's and no further from the fp32 answer."""
    tv, fr = build_pair(name, num_classes=10)
    x = randn(2, 3, 32, 32, seed=16)
    exact = eval_on(tv, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_tv = eval_on(fr, x), eval_on(tv, x)
    assert y.dtype == y_tv.dtype == torch.bfloat16
    assert rel_error(y, exact) <= max(0.05, 3 * rel_error(y_tv, exact)), (
        f"bf16 autocast: fastres {rel_error(y, exact):.3g} from fp32, torchvision {rel_error(y_tv, exact):.3g}")
    # training under autocast: same dtypes, gradients for every parameter, buffers stay fp32
    for model in (tv, fr):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(randn(*TRAIN_SHAPE, seed=17))
        assert out.dtype == torch.bfloat16
        out.float().logsumexp(1).sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
        assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())
    assert_rel_close(fr.bn1.running_mean, tv.bn1.running_mean, 1e-2, "running_mean after an autocast step")
