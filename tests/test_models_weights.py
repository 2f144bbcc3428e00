"""fastres's model zoo against torchvision: weights= and torchvision's weight enums.

CPU-sized on purpose: the shapes and the comparisons are tests/helpers.py's.
"""
from __future__ import annotations


import pytest
import torch
import torchvision.models as tvm

import fastres
from helpers import (CONSTRUCTORS, EVAL_INPUTS, assert_eval_matches, assert_state_dicts_equal, randomize_bn_, tv_model)


def _fake_weights(monkeypatch, enum_cls, name="resnet18"):
    """Monkeypatch enum_cls.get_state_dict to return a randomized torchvision state_dict."""
    tv = tv_model(name, seed=5)
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
    assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:2], what="weights=")


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
    assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:1], what="resnet50 weights=")
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
        monkeypatch.setattr(enum_cls, "get_state_dict", lambda self, *a, sd=sd, **k: sd)
        fr = getattr(fastres, name)(weights=enum_cls.DEFAULT)
        assert_state_dicts_equal(fr.state_dict(), sd, name)
        with pytest.raises(ValueError):
            getattr(fastres, name)(weights="NOPE")
        del fr, sd
