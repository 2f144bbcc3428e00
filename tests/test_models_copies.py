"""fastres's model zoo against torchvision: copies, state_dict round trips and pickling.

CPU-sized on purpose: the shapes and the comparisons are tests/helpers.py's.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torchvision.models as tvm

import fastres
from helpers import (TRAIN_SHAPE, assert_exactly_equal, assert_rel_close, assert_state_dicts_equal, build_pair,
                     compare_train_results, eval_on, randn, rel_error, train_step)


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
