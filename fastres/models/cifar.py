"""CIFAR-10 ResNets of the paper's section 4.2 (He et al. 2015): a 3x3 stem with 16 channels,
three stages of n BasicBlocks with 16/32/64 channels (depth = 6n + 2), global average pooling, fc.

shortcut="A" (the paper's CIFAR choice): identity shortcuts; where the shape changes, the input is
subsampled with stride 2 and the extra channels are zeros, appended after the input's channels
(no parameters). shortcut="B": a 1x1 conv + BN projection where the shape changes.

The blocks are fastres.BasicBlock (fused conv+BN+ReLU, conv+BN+add+ReLU), so module names and
state_dict keys follow torchvision's: conv1, bn1, layer1..3.k.conv1/bn1/conv2/bn2[/downsample.0/1], fc.
"""
from __future__ import annotations

from typing import Any, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import conv_bn_act, fusable_relu
from ..ops.checks import model_input
from .init import init_like_torchvision_
from .resnet import BasicBlock, _InvalidatesFolds

# FX leaf functions (see tracing.py): under torch.fx.symbolic_trace these calls become graph nodes.
torch.fx.wrap("conv_bn_act")
torch.fx.wrap("model_input")

__all__ = ["CifarResNet", "ZeroPadShortcut", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44",
           "cifar_resnet56", "cifar_resnet110", "cifar_resnet1202"]


class ZeroPadShortcut(nn.Module):
    """Option A: x[:, :, ::stride, ::stride] with (out_channels - in_channels) zero channels appended."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"out_channels must be >= in_channels ({in_channels}); got {out_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class CifarResNet(_InvalidatesFolds, nn.Module):
    def __init__(self, layers: List[int], num_classes: int = 10, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B'; got {shortcut!r}")
        if not isinstance(layers, (list, tuple)) or len(layers) != 3 or not all(
                isinstance(n, int) and n >= 1 for n in layers):
            raise ValueError(f"layers must be three positive ints; got {layers!r}")
        self.shortcut = shortcut
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, layers[0], 1)
        self.layer2 = self._make_layer(32, layers[1], 2)
        self.layer3 = self._make_layer(64, layers[2], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_like_torchvision_(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            if self.shortcut == "A":
                downsample = ZeroPadShortcut(self.inplanes, planes, stride)
            else:
                downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(planes))
        units = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        units += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*units)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return self._plain_forward(x)
        if torch.jit.is_tracing():
            return self._plain_forward(x)
        x = model_input(x, self.conv1)  # under torch.fx a graph node (an FX leaf), run on the real input
        if not fusable_relu(self.relu):
            return self._plain_forward(x)
        x = conv_bn_act(self.conv1, self.bn1, x, relu=True)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def _plain_forward(self, x: Tensor) -> Tensor:
        """Module by module (TorchScript, jit.trace, a replaced stem ReLU)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _cifar(depth: int, **kwargs: Any) -> CifarResNet:
    n = (depth - 2) // 6
    return CifarResNet([n, n, n], **kwargs)


def cifar_resnet20(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (0.27M parameters with option A)."""
    return _cifar(20, **kwargs)


def cifar_resnet32(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32 (0.46M)."""
    return _cifar(32, **kwargs)


def cifar_resnet44(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44 (0.66M)."""
    return _cifar(44, **kwargs)


def cifar_resnet56(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (0.85M)."""
    return _cifar(56, **kwargs)


def cifar_resnet110(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-110 (1.7M)."""
    return _cifar(110, **kwargs)


def cifar_resnet1202(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-1202 (19.4M)."""
    return _cifar(1202, **kwargs)
