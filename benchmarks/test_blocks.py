"""One residual block at each ResNet stage's shape, eval and train: torchvision's BasicBlock /
Bottleneck against fastres' (same weights through load_state_dict), for the first block of a
stage (projection shortcut, stride 2 from stage 2 on) and an identity block."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

import fastres
from fastres.bench.config import MODES
from fastres.models.flops import count_macs, forward_flops, training_flops
from fastres.bench.variants import STEPS, prepare, synthetic_input
from fastres.bench.verify import randomize_batch_norm_

BASELINE = "torchvision"
KINDS = {"basic": (tv_resnet.BasicBlock, fastres.BasicBlock), "bottleneck": (tv_resnet.Bottleneck, fastres.Bottleneck)}
STAGES = (1, 2, 3, 4)
POSITIONS = ("first", "identity")


def block_shape(kind: str, stage: int, position: str, size: int):
    """(inplanes, planes, stride, input height/width) of a block of a torchvision ResNet at
    image size `size` (stage 1 runs at size/4: 56x56 for 224)."""
    expansion = KINDS[kind][0].expansion
    planes = 64 * 2 ** (stage - 1)
    out_hw = max(1, size // 4 // 2 ** (stage - 1))
    if position == "identity":
        return planes * expansion, planes, 1, out_hw
    stride = 1 if stage == 1 else 2
    inplanes = 64 if stage == 1 else planes // 2 * expansion
    return inplanes, planes, stride, out_hw * stride


def _projection(inplanes: int, planes: int, stride: int, expansion: int) -> nn.Module:
    # the shortcut torchvision's ResNet._make_layer builds
    return nn.Sequential(nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False),
                         nn.BatchNorm2d(planes * expansion))


def block_pair(kind: str, inplanes: int, planes: int, stride: int):
    """(torchvision block, fastres block) with the same weights and BN statistics."""
    tv_cls, fast_cls = KINDS[kind]
    projected = stride != 1 or inplanes != planes * tv_cls.expansion
    pair = [cls(inplanes, planes, stride, _projection(inplanes, planes, stride, cls.expansion) if projected else None)
            for cls in (tv_cls, fast_cls)]
    randomize_batch_norm_(pair[0])
    pair[1].load_state_dict(pair[0].state_dict())
    return pair


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("stage", STAGES, ids=[f"stage{s}" for s in STAGES])
@pytest.mark.parametrize("kind", list(KINDS))
def test_block(measure, settings, variant, kind, stage, position, mode, batch):
    inplanes, planes, stride, hw = block_shape(kind, stage, position, settings.size)
    tv, fast = block_pair(kind, inplanes, planes, stride)
    macs = count_macs(tv, torch.randn(1, inplanes, hw, hw)) * batch
    x = synthetic_input((batch, inplanes, hw, hw), variant, settings.device)
    module = prepare(tv, fast, variant, settings.device)
    smallest = (kind, stage, position, mode) == ("basic", 4, "identity", "infer") and \
        settings.smallest(variant.dtype, variant.layout)
    measure(STEPS[mode](module, x, variant), variant,
            group=f"blocks {kind} stage{stage} {position} ({inplanes}->{planes}, {hw}x{hw}, stride {stride}) "
                  f"{mode} batch={batch}",
            images=batch, flops=(training_flops if mode == "train" else forward_flops)(macs), smallest=smallest)
