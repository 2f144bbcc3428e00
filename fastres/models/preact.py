"""Pre-activation ResNet v2 (He et al. 2016, "Identity Mappings in Deep Residual Networks").

Each unit is BN -> ReLU -> conv (x2 basic, x3 bottleneck) with a clean identity shortcut; a
projection shortcut (a plain 1x1 conv) is taken from the pre-activated input. The stem is a 7x7
conv + max pool (the first unit's pre-activation follows it); a final BN + ReLU precedes pooling.

Fused: each unit's first BN+ReLU is `batch_norm_act` (it cannot fold into the previous conv, the
shortcut needs the raw sum), every inner conv -> BN -> ReLU is `conv_bn_act` (folded in eval), and
the last conv adds the shortcut in its epilogue (`ops.conv2d_act(residual=...)`). Any hook or
replaced submodule makes the unit run its modules one by one.
Keys: conv1, layerN.k.{bn1, conv1, bn2, conv2[, bn3, conv3], downsample.0}, final_bn, fc.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.checks import model_input
from ..nn import batch_norm_act, conv_bn_act, fusable_relu
from ..nn.fused import _no_global_hooks, fusable_bn, fusable_conv
from .init import init_like_torchvision_
from .resnet import _InvalidatesFolds
from .tracing import unfused_forward

# FX leaf functions (see tracing.py): under torch.fx.symbolic_trace these calls become graph nodes.
torch.fx.wrap("batch_norm_act")
torch.fx.wrap("model_input")

__all__ = ["PreActBasicBlock", "PreActBottleneck", "ResNetV2", "resnet_v2_18", "resnet_v2_34", "resnet_v2_50",
           "resnet_v2_101", "resnet_v2_152", "resnet_v2_200"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _fusable(unit: nn.Module) -> bool:
    if not (fusable_relu(unit.relu) and _no_global_hooks()) or any(m._forward_hooks or m._forward_pre_hooks
                                                                  for m in (unit,)):
        return False
    for m in unit.modules():
        if isinstance(m, nn.Conv2d) and not fusable_conv(m):
            return False
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not fusable_bn(m):
            return False
    return unit.downsample is None or (type(unit.downsample) is nn.Sequential and len(unit.downsample) == 1
                                       and not unit.downsample._forward_hooks
                                       and not unit.downsample._forward_pre_hooks)


def _conv_add(conv: nn.Conv2d, x: Tensor, residual: Tensor) -> Tensor:
    return ops.conv2d_act(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                          residual=residual, relu=False)


class _PreActUnit(_InvalidatesFolds, nn.Module):
    """What both units share: the forward (pre-activation, shortcut, inner conv -> BN -> ReLU stages,
    the last conv adding the shortcut) and the plain path's head."""

    def _stages(self):
        """([(conv, bn of its output)] of the inner stages, the last conv)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return self._plain_forward(x)
        other = unfused_forward(self, x, _fusable(self))
        if other is not None:
            return other
        pre = batch_norm_act(self.bn1, x, relu=True)
        shortcut = x if self.downsample is None else self.downsample[0](pre)
        inner, last = self._stages()
        out = pre
        for conv, bn in inner:
            out = conv_bn_act(conv, bn, out, relu=True)
        return _conv_add(last, out, shortcut)

    def _plain_head(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(relu(bn2(conv1(relu(bn1(x))))), the shortcut), module by module."""
        pre = self.relu(self.bn1(x))
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(pre)
        return self.relu(self.bn2(self.conv1(pre))), shortcut


class PreActBasicBlock(_PreActUnit):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.downsample = downsample
        self.stride = stride

    def _stages(self):
        return [(self.conv1, self.bn2)], self.conv2

    def _plain_forward(self, x: Tensor) -> Tensor:
        """Module by module (TorchScript, jit.trace, units the fused path cannot honour)."""
        out, shortcut = self._plain_head(x)
        return self.conv2(out) + shortcut


class PreActBottleneck(_PreActUnit):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.downsample = downsample
        self.stride = stride

    def _stages(self):
        return [(self.conv1, self.bn2), (self.conv2, self.bn3)], self.conv3

    def _plain_forward(self, x: Tensor) -> Tensor:
        """Module by module (TorchScript, jit.trace, units the fused path cannot honour)."""
        out, shortcut = self._plain_head(x)
        out = self.relu(self.bn3(self.conv2(out)))
        return self.conv3(out) + shortcut


class ResNetV2(_InvalidatesFolds, nn.Module):
    def __init__(self, block: Type[Union[PreActBasicBlock, PreActBottleneck]], layers: List[int],
                 num_classes: int = 1000) -> None:
        super().__init__()
        if block not in (PreActBasicBlock, PreActBottleneck):
            raise TypeError(f"block must be PreActBasicBlock or PreActBottleneck; got {block!r}")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.final_bn = nn.BatchNorm2d(512 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_like_torchvision_(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride))
        units = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        units += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return self._plain_forward(x)
        if torch.jit.is_tracing():
            return self._plain_forward(x)
        x = model_input(x, self.conv1)  # under torch.fx a graph node (an FX leaf), run on the real input
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if fusable_relu(self.relu) and fusable_bn(self.final_bn) and _no_global_hooks():
            x = batch_norm_act(self.final_bn, x, relu=True)
        else:
            x = self.relu(self.final_bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def _plain_forward(self, x: Tensor) -> Tensor:
        """Module by module (TorchScript, jit.trace)."""
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu(self.final_bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _v2(block, layers, **kwargs: Any) -> ResNetV2:
    return ResNetV2(block, layers, **kwargs)


def resnet_v2_18(**kwargs: Any) -> ResNetV2:
    return _v2(PreActBasicBlock, [2, 2, 2, 2], **kwargs)


def resnet_v2_34(**kwargs: Any) -> ResNetV2:
    return _v2(PreActBasicBlock, [3, 4, 6, 3], **kwargs)


def resnet_v2_50(**kwargs: Any) -> ResNetV2:
    return _v2(PreActBottleneck, [3, 4, 6, 3], **kwargs)


def resnet_v2_101(**kwargs: Any) -> ResNetV2:
    return _v2(PreActBottleneck, [3, 4, 23, 3], **kwargs)


def resnet_v2_152(**kwargs: Any) -> ResNetV2:
    return _v2(PreActBottleneck, [3, 8, 36, 3], **kwargs)


def resnet_v2_200(**kwargs: Any) -> ResNetV2:
    return _v2(PreActBottleneck, [3, 24, 36, 3], **kwargs)
