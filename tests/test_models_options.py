"""fastres's model zoo against torchvision: constructor options and blocks
used on their own.

CPU-sized on purpose: the shapes and the comparisons are tests/helpers.py's.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import resnet as tv_resnet

import fastres
from helpers import (BACKENDS, EVAL_INPUTS, TOLERANCE, TRAIN_RTOL64, TRAIN_SHAPE, assert_eval_matches, assert_rel_close,
                     assert_state_dicts_equal, assert_train_matches, backend_scope, build_pair, compare_train_results,
                     eval_on, randn, randomize_bn_, train_step)


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
    assert_eval_matches(tv, fr, shapes=[((1, 3, 37, 45), False)], what="resnet18 1000 classes")


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
    assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:2], what=f"{name} zero_init_residual")
    x = randn(*TRAIN_SHAPE, seed=4)
    assert_train_matches(tv, fr, x, fp32_direct=True, what=f"{name} zero_init_residual")


def test_groups_and_width_per_group():
    tv, fr = _pair_from_classes("Bottleneck", [1, 2, 1, 1], groups=4, width_per_group=8, num_classes=10)
    assert fr.layer1[0].conv2.groups == 4 and fr.layer1[0].conv2.out_channels == 4 * int(64 * 8 / 64)
    assert_eval_matches(tv, fr, what="groups=4 width=8")
    assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:1], backend="torch", what="groups=4 width=8")
    assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=5), what="groups=4 width=8")


def test_replace_stride_with_dilation():
    kwargs = dict(replace_stride_with_dilation=[False, True, True], num_classes=10)
    tv, fr = _pair_from_classes("Bottleneck", [1, 1, 2, 1], **kwargs)
    assert fr.layer3[1].conv2.dilation == (2, 2) and fr.layer4[0].conv2.stride == (1, 1)
    assert fr.layer4[0].conv2.dilation == (2, 2) and fr.layer4[0].downsample[0].stride == (1, 1)
    assert_eval_matches(tv, fr, what="dilation")
    assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:1], backend="torch", what="dilation")
    assert_train_matches(tv, fr, randn(2, 3, 32, 32, seed=6), what="dilation")


def test_replace_stride_with_dilation_resnet50eval_output():
    tv, fr = build_pair("resnet50", replace_stride_with_dilation=[False, True, True], num_classes=10)
    assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:2], what="resnet50 dilation")


def test_basicblock_dilation_raises_like_torchvision():
    with pytest.raises(NotImplementedError):
        tvm.resnet18(replace_stride_with_dilation=[False, True, True])
    with pytest.raises(NotImplementedError):
        fastres.resnet18(replace_stride_with_dilation=[False, True, True])


def test_custom_batchnorm_partial_eps_and_cumulative_momentum():
    norm = functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=None)
    tv, fr = _pair_from_classes("Bottleneck", [1, 1, 1, 1], norm_layer=norm, num_classes=10)
    assert fr.bn1.eps == 1e-3 and fr.layer1[0].bn2.momentum is None
    assert_eval_matches(tv, fr, what="eps=1e-3")
    x = randn(*TRAIN_SHAPE, seed=7)
    assert_train_matches(tv, fr, x, what="momentum=None")
    # Cumulative average: a few steps with different batches, buffers after each.
    tv, fr = tv.double(), fr.double()
    for step in range(3):
        xs = randn(*TRAIN_SHAPE, seed=20 + step, dtype=torch.float64)
        expected = train_step(tv, xs)
        actual = train_step(fr, xs)
        compare_train_results(actual, expected, TRAIN_RTOL64, f"momentum=None step {step}")
    assert int(fr.bn1.num_batches_tracked) == 3
    assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:2], dtype=torch.float64, what="after cumulative steps")


@pytest.mark.parametrize("block_name", ["BasicBlock", "Bottleneck"])
def test_batchnorm_without_running_stats(block_name):
    """track_running_stats=False: batch statistics in eval too, nothing to fold.
    (affine=False cannot be built by torchvision's ResNet; see the standalone block cases.)"""
    norm = functools.partial(nn.BatchNorm2d, track_running_stats=False)
    tv, fr = _pair_from_classes(block_name, [1, 1, 1, 1], norm_layer=norm, num_classes=10)
    assert fr.bn1.running_mean is None
    assert_eval_matches(tv, fr, shapes=[(TRAIN_SHAPE, False), (TRAIN_SHAPE, True)], what="no running stats")
    assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=8), fp32_direct=True, what="no running stats")


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
    assert_eval_matches(tv, fr, what=f"GroupNorm {block_name}")
    assert_train_matches(tv, fr, randn(2, 3, 32, 32, seed=9), fp32_direct=True, what=f"GroupNorm {block_name}")


def _counted(fn, calls, pairs, *args, **kwargs):
    calls.append(pairs)
    return fn(*args, **kwargs)


@pytest.mark.parametrize("block_name", ["BasicBlock", "Bottleneck"])
def test_frozen_batch_norm_is_folded(block_name, monkeypatch):
    """torchvision's FrozenBatchNorm2d (detection backbones) is eval-mode BN in every mode: fastres folds it
    into the convs (every conv + FrozenBN pair runs in one fused op, in train mode too) with eval BN's
    accuracy: the model tolerance in fp32, 1e-10 in float64."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    tv, fr = _pair_from_classes(block_name, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d, num_classes=10)
    pairs = len([m for m in fr.modules() if isinstance(m, FrozenBatchNorm2d)])
    calls = []   # conv + BN pairs run by the fused ops: conv2d_act runs one, bottleneck_tail two
    for name, count in (("conv2d_act", 1), ("bottleneck_tail", 2)):
        monkeypatch.setattr(fastres.ops, name, functools.partial(_counted, getattr(fastres.ops, name), calls, count))
    for mode in ("eval", "train"):
        calls.clear()
        x = randn(*TRAIN_SHAPE, seed=11)
        with torch.no_grad():
            expected = tv.train(mode == "train")(x)
            assert_rel_close(fr.train(mode == "train")(x), expected, what=f"FrozenBN {block_name} {mode}")
        assert sum(calls) == pairs, f"{mode}: {sum(calls)} of {pairs} conv + FrozenBN pairs fused"
    assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=12), what=f"FrozenBN {block_name}")
    assert_eval_matches(copy.deepcopy(tv).double(), copy.deepcopy(fr).double(), shapes=[(TRAIN_SHAPE, False)],
                        dtype=torch.float64, what=f"FrozenBN {block_name} float64")


class _ShiftedBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward: fastres must not fold it as a plain BN."""

    def forward(self, x):
        return super().forward(x) * 0.5 + 0.25


def test_batchnorm_subclass_with_own_forward_is_honoured():
    tv, fr = _pair_from_classes("Bottleneck", [1, 1, 1, 1], norm_layer=_ShiftedBN, num_classes=10)
    assert_eval_matches(tv, fr, what="BN subclass")
    assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=10), what="BN subclass")


def test_replaced_activation_is_honoured():
    tv, fr = build_pair("resnet18", num_classes=10)
    for model in (tv, fr):
        model.relu = nn.LeakyReLU(0.2)
        model.layer2[0].relu = nn.Hardtanh(-0.5, 0.5)
        model.layer3[1].relu = nn.ELU()
    assert_eval_matches(tv, fr, what="replaced ReLUs")
    assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=11), fp32_direct=True, what="replaced ReLUs")


def test_forward_hooks_on_submodules_see_torchvision_values():
    """A hook on a conv must see the conv's own (unfolded) output, and a hook that changes a BN
    output must change the model output exactly as in torchvision."""
    tv, fr = build_pair("resnet50", num_classes=10)
    seen = {"tv": [], "fr": []}
    for key, model in (("tv", tv), ("fr", fr)):
        model.layer1[0].conv1.register_forward_hook(lambda m, i, o, key=key: seen[key].append(o.detach().clone()))
        model.layer2[0].bn3.register_forward_hook(lambda m, i, o: o * 1.5)
        model.layer3[0].downsample[1].register_forward_hook(lambda m, i, o: o - 0.1)
    assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:2], what="hooks")
    assert len(seen["fr"]) == len(seen["tv"]) == 2
    for a, b in zip(seen["fr"], seen["tv"]):
        assert_rel_close(a.contiguous(), b.contiguous(), what="conv1 hook output")
    assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=12), what="hooks")


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
    for dtype, rtol in ((torch.float64, TRAIN_RTOL64), (torch.float32, TOLERANCE["model"][torch.float32])):
        tv_d, fr_d = copy.deepcopy(tv).to(dtype), copy.deepcopy(fr).to(dtype)
        expected = train_step(tv_d, x.to(dtype))
        with backend_scope(backend):
            actual = train_step(fr_d, x.to(dtype))
        compare_train_results(actual, expected, rtol, f"block train {dtype}")
