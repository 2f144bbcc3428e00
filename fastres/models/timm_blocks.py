"""timm's ResNet blocks as fastres blocks (`fastres.convert`). timm is optional: nothing here imports it;
a module is recognised as a timm block only when `timm.models.resnet` is already loaded.

A timm `BasicBlock` is conv1 -> bn1 -> drop_block -> act1 -> aa -> conv2 -> bn2 -> se -> drop_path,
+ downsample(x), -> act2 (a `Bottleneck` likewise with conv3/bn3/act3). With drop_block and aa the
identity, no se, no drop_path and ReLU activations this is torchvision's block exactly, whatever the
convolutions' strides, dilations and groups (fastres reads them from the convs) and whatever the
shortcut (fastres runs a non-standard one, e.g. resnet-D's avg-pool + conv + BN, as the module it is).
The fastres block is built from the timm block's own submodules, registered in the order that keeps
timm's state_dict keys; `relu` is timm's act1 (act2/act3 are stateless ReLUs like it).
"""
from __future__ import annotations

import sys
from typing import Optional

from torch import nn

from .resnet import BasicBlock, Bottleneck

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


class TimmBasicBlock(BasicBlock):
    """A timm BasicBlock converted by `fastres.convert`: fastres's fused BasicBlock over timm's modules."""

    def zero_init_last(self) -> None:
        """timm's: the last BatchNorm's weight to zero."""
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)


class TimmBottleneck(Bottleneck):
    """A timm Bottleneck converted by `fastres.convert`: fastres's fused Bottleneck over timm's modules."""

    def zero_init_last(self) -> None:
        """timm's: the last BatchNorm's weight to zero."""
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)


def _bare(module: Optional[nn.Module]) -> bool:
    return not any(getattr(module, name, None) for name in _HOOK_DICTS)


def _identity(module: Optional[nn.Module]) -> bool:
    return module is None or (type(module) is nn.Identity and _bare(module))


def replacement(block: nn.Module) -> Optional[nn.Module]:
    """The fastres block equivalent to timm block `block`, or None (not a timm block, or not exactly
    convertible)."""
    timm_resnet = sys.modules.get("timm.models.resnet")
    if timm_resnet is None:
        return None
    from .convert import CONVERTIBLE_NORMS

    if type(block) is timm_resnet.BasicBlock:
        cls, depth = TimmBasicBlock, 2
    elif type(block) is timm_resnet.Bottleneck:
        cls, depth = TimmBottleneck, 3
    else:
        return None
    names = [str(i) for i in range(1, depth + 1)]
    convs = [getattr(block, "conv" + n, None) for n in names]
    norms = [getattr(block, "bn" + n, None) for n in names]
    acts = [getattr(block, "act" + n, None) for n in names]
    if not (_bare(block) and not block._parameters and not block._buffers
            and all(type(c) is nn.Conv2d for c in convs) and all(type(n) in CONVERTIBLE_NORMS for n in norms)
            and all(type(a) is nn.ReLU and _bare(a) for a in acts)
            and _identity(getattr(block, "drop_block", None)) and _identity(getattr(block, "aa", None))
            and getattr(block, "se", None) is None and _identity(getattr(block, "drop_path", None))):
        return None
    fast = cls.__new__(cls)
    nn.Module.__init__(fast)
    fast.training = block.training  # the block's own flag; its submodules keep theirs
    for n, conv, norm in zip(names, convs, norms):
        setattr(fast, "conv" + n, conv)
        setattr(fast, "bn" + n, norm)
    fast.relu = acts[0]
    fast.downsample = block.downsample
    fast.stride = block.stride
    fast.dilation = getattr(block, "dilation", 1)
    return fast
