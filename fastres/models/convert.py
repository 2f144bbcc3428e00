"""fastres.convert: fastres's fused ResNet and blocks wherever a torchvision or timm ResNet goes.

`convert(module)` walks the whole module tree (detection and segmentation backbones,
`IntermediateLayerGetter`, `nn.Sequential`, user models) and replaces, in place,
- every torchvision `ResNet` by `fastres.ResNet` and every torchvision `BasicBlock` / `Bottleneck`
  by fastres's: the class of the module is swapped, nothing else changes (fastres's classes
  subclass torchvision's and add no state);
- every timm `BasicBlock` / `Bottleneck` by a fastres block built from the timm block's own
  submodules (timm_blocks.py).
Only what converts exactly is converted (the rules are `_torchvision_block_converts` and
`timm_blocks.replacement`); everything else is left as it is. Parameters and buffers are the same
objects (values, dtype, device, requires_grad; an optimizer built before keeps working), state_dict
keys and every module's train/eval flag are unchanged.
"""
from __future__ import annotations

import copy
from typing import Dict, Tuple

from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from ..nn.folding import invalidate_all
from . import timm_blocks
from .resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["convert", "from_torchvision"]

_TORCHVISION_BLOCKS = {tv_resnet.BasicBlock: BasicBlock, tv_resnet.Bottleneck: Bottleneck}
# The norms whose blocks convert: BatchNorm2d (fused), SyncBatchNorm (the block runs it as a module, as
# torchvision does), torchvision's FrozenBatchNorm2d (eval-mode BN in every mode: folded like one).
CONVERTIBLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


def _torchvision_block_converts(block: nn.Module) -> bool:
    """A torchvision block with its own submodules: plain convs, ReLU, a BatchNorm kind (any shortcut:
    fastres runs a non-standard one as the module it is)."""
    names = ("1", "2", "3") if type(block) is tv_resnet.Bottleneck else ("1", "2")
    convs = [getattr(block, "conv" + n, None) for n in names]
    norms = [getattr(block, "bn" + n, None) for n in names]
    return (type(getattr(block, "relu", None)) is nn.ReLU and all(type(c) is nn.Conv2d for c in convs)
            and all(type(n) in CONVERTIBLE_NORMS for n in norms))


def _replacement(module: nn.Module) -> nn.Module:
    kind = type(module)
    if kind is tv_resnet.ResNet:
        module.__class__ = ResNet
        return module
    fast = _TORCHVISION_BLOCKS.get(kind)
    if fast is not None:
        if _torchvision_block_converts(module):
            module.__class__ = fast
        return module
    replacement = timm_blocks.replacement(module)
    return module if replacement is None else replacement


def convert(module: nn.Module) -> nn.Module:
    """Replace, in place, every torchvision `ResNet` and every torchvision or timm `BasicBlock` /
    `Bottleneck` inside `module` (at any depth, `module` itself included) by fastres's equivalent, and
    return the result: `module` itself, unless `module` is a timm block (then its replacement).

    Sharing: the converted modules hold the very same parameters and buffers (an optimizer built
    before still trains them), so the state_dict (keys and values), dtypes, devices, requires_grad and
    each module's train/eval flag are unchanged, and so are the outputs (eval: BN folded, rounding
    within 1e-5 relative in float32; training: torchvision's arithmetic, running statistics included).
    Blocks that cannot be converted exactly are left as they are: subclasses, attention / SE,
    drop-path, DropBlock, anti-aliasing, non-ReLU activations, norms other than BatchNorm2d,
    SyncBatchNorm and torchvision's FrozenBatchNorm2d, timm blocks with hooks of their own. To keep
    the original, convert a copy: `fastres.convert(copy.deepcopy(model))`.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    memo: Dict[int, Tuple[nn.Module, nn.Module]] = {}
    converted = _convert(module, memo)
    invalidate_all()
    return converted


def _convert(module: nn.Module, memo: Dict[int, Tuple[nn.Module, nn.Module]]) -> nn.Module:
    seen = memo.get(id(module))
    if seen is not None:  # a module shared by two parents gets one replacement
        return seen[1]
    replacement = _replacement(module)
    memo[id(module)] = (module, replacement)  # the original too: its id stays unique while we walk
    for name, child in list(replacement._modules.items()):
        if child is not None:
            new = _convert(child, memo)
            if new is not child:
                replacement._modules[name] = new
    return replacement


def from_torchvision(model: nn.Module) -> ResNet:
    """A fastres.ResNet with the same configuration, weights, buffers and train/eval state as a
    torchvision ResNet: `convert` of a copy, so the argument is left untouched (the result owns copies
    of its tensors). Blocks `convert` leaves alone (e.g. GroupNorm ones) stay torchvision's."""
    if not isinstance(model, nn.Module) or type(model) not in (tv_resnet.ResNet, ResNet):
        raise TypeError(f"model must be a torchvision.models.ResNet (or fastres.ResNet); got {type(model).__name__}")
    return convert(copy.deepcopy(model))
