"""fastres's model zoo against torchvision: every constructor against its torchvision twin: eval and one training step.

CPU-sized on purpose: the shapes and the comparisons are tests/helpers.py's.
"""
from __future__ import annotations


import pytest
from torch import nn
from torchvision.models import resnet as tv_resnet

import fastres
from helpers import (BACKENDS, BIG, CONSTRUCTORS, TRAIN_SHAPE, assert_eval_matches, assert_state_dicts_equal,
                     assert_train_matches, build_pair, randn, randomize_bn_)


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
    assert_eval_matches(tv, fr, backend=backend, what=name)
    assert not fr.training


def test_constructor_train_matches_torchvision(zoo_pair):
    name, tv, fr, _ = zoo_pair
    x = randn(*TRAIN_SHAPE, seed=3)
    assert_train_matches(tv, fr, x, fp32_direct=name in ("resnet18", "resnet34"), what=name)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_constructor_train_matches_torchvision_torchbackend_scope(name):
    """The "torch" backend in training, on one net of each block kind."""
    tv, fr = build_pair(name, num_classes=10)
    assert_train_matches(tv, fr, randn(*TRAIN_SHAPE, seed=3), "torch", fp32_direct=name == "resnet18", what=name)
