"""fastres's model zoo against torchvision: fastres.from_torchvision: sharing, modes, unsupported models.

CPU-sized on purpose: the shapes and the comparisons are tests/helpers.py's.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

import fastres
from helpers import (EVAL_INPUTS, TRAIN_SHAPE, assert_eval_matches, assert_rel_close, assert_state_dicts_equal,
                     assert_train_matches, randn, same_storage, tv_model)


@pytest.mark.parametrize("name,mode", [("resnet18", "train"), ("resnet18", "eval"), ("resnet50", "train"),
                                       ("resnext50_32x4d", "eval")])
def test_from_torchvision(name, mode):
    tv = tv_model(name, num_classes=10)
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
    assert_eval_matches(tv, fr, shapes=EVAL_INPUTS[:2], what=f"from_torchvision {name}")
    assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=13), fp32_direct=name == "resnet18",
                          what=f"from_torchvision {name}")
    # Editing the converted model leaves the original alone (and vice versa).
    tv_before = {k: v.clone() for k, v in tv.state_dict().items()}
    with torch.no_grad():
        fr.conv1.weight.mul_(2)
        fr.layer1[0].bn1.running_var.mul_(3)
    assert_state_dicts_equal(tv.state_dict(), tv_before, "original after editing the converted model")


def test_from_torchvision_num_classes_and_eval_flag():
    tv = tv_model("resnet18", num_classes=7).eval()
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
    fr = fastres.from_torchvision(tv_model("resnet18", num_classes=10))
    again = fastres.from_torchvision(fr)
    assert isinstance(again, fastres.ResNet) and again is not fr
    assert_state_dicts_equal(again.state_dict(), fr.state_dict())
    with pytest.raises((TypeError, ValueError)):
        fastres.from_torchvision(nn.Linear(3, 4))
    with pytest.raises((TypeError, ValueError)):
        fastres.from_torchvision("resnet18")
