"""Whole models: resnet18/34/50/101/152 inference (forward under inference_mode) and training
step (forward + backward + SGD step), torchvision eager and torch.compile against fastres."""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
import torchvision

import fastres
from fastres.bench.config import MODES, current_settings
from fastres.models.flops import count_macs, forward_flops, training_flops
from fastres.bench.variants import STEPS, prepare, synthetic_input
from fastres.bench.verify import randomize_batch_norm_

BASELINE = "torchvision"
_PAIRS: Dict[str, Tuple[torch.nn.Module, torch.nn.Module, int]] = {}


def model_pair(name: str, size: int):
    """(torchvision model, fastres twin with the same weights, MACs per image), built once per
    session: constructing resnet152 takes seconds on a CPU."""
    if name not in _PAIRS:
        torch.manual_seed(0)
        tv = randomize_batch_norm_(getattr(torchvision.models, name)())
        _PAIRS[name] = (tv, fastres.from_torchvision(tv), count_macs(tv, torch.randn(1, 3, size, size)))
    return _PAIRS[name]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", current_settings().models)
def test_model(measure, settings, variant, model, mode, batch):
    tv, fast, macs = model_pair(model, settings.size)
    x = synthetic_input((batch, 3, settings.size, settings.size), variant, settings.device)
    module = prepare(tv, fast, variant, settings.device)
    flops = (training_flops if mode == "train" else forward_flops)(macs * batch)
    smallest = model == settings.models[0] and mode == "infer" and settings.smallest(variant.dtype, variant.layout)
    measure(STEPS[mode](module, x, variant), variant, group=f"models {model} {mode} batch={batch}",
            images=batch, flops=flops, smallest=smallest)
