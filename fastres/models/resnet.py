"""The torchvision ResNet zoo on fastres's fused ops.

The classes subclass torchvision's, so construction, weight initialisation (and its
random-number stream), submodule names, state_dict keys and `isinstance` checks are
torchvision's own; only the forward passes change. A block whose submodules were
replaced or hooked in a way the fused path cannot honour runs torchvision's forward.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Type, Union

import torch
import torchvision.models as tvm
from torch import Tensor, nn
from torch.fx import Proxy
from torchvision.models import resnet as tv_resnet

from .. import ops
from ..nn import (batch_norm_act, bn_prologue, cheap_to_recompute, conv_bn_act, conv_bn_stats, folded_conv_bn,
                  fusable_pair, fusable_relu, memory_format_of, norm_conv_chain_applies, recomputed,
                  uses_running_stats)
from ..nn.folding import invalidate_all
from ..nn.fused import _no_global_hooks, has_hooks, norm_conv_chain_pair
from ..ops import checks, dispatch
from .tracing import unfused_forward
from .weights import legacy_interface, load_weights, verify_weights

__all__ = [
    "ResNet", "BasicBlock", "Bottleneck",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]


def model_input(x: Tensor, conv1: nn.Module, bn1: nn.Module) -> Tensor:
    """The ResNet forward's input checks and activation layout, as one FX graph node (a leaf: run on
    the real input when the graph runs; bn1's mode stands for the model's)."""
    checks.model_input(x, conv1)
    layout = dispatch.preferred_memory_format(x, bn1.training)
    return x if layout is None else x.contiguous(memory_format=layout)


# FX leaf functions (see tracing.py): under torch.fx.symbolic_trace these calls become graph nodes.
torch.fx.wrap("conv_bn_act")
torch.fx.wrap("model_input")


def _projection(downsample: Optional[nn.Module]):
    """(conv, bn) of a standard `Sequential(conv1x1, BatchNorm2d)` shortcut, else None."""
    if type(downsample) is nn.Sequential and len(downsample) == 2 \
            and not has_hooks(downsample) \
            and fusable_pair(downsample[0], downsample[1]):
        return downsample[0], downsample[1]
    return None


def _shortcut(block, x: Tensor) -> Tensor:
    if block.downsample is None:
        return x
    pair = _projection(block.downsample)
    if pair is None:
        return block.downsample(x)
    return conv_bn_act(pair[0], pair[1], x, relu=False)


class _InvalidatesFolds:
    """Mode switches and conversions of a fastres module make cached folds stale: training
    forwards change running statistics, `.to()`/`.half()` replace every tensor."""

    def train(self, mode: bool = True):
        invalidate_all()
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        invalidate_all()
        return super()._apply(*args, **kwargs)


def _chain_projection(block):
    """(conv, bn) of the block's projection shortcut where it can run in the chain (statistics from its
    conv's epilogue), else None."""
    pair = _projection(block.downsample)
    return pair if pair is not None and norm_conv_chain_pair(*pair) else None


def _chain_shortcut(block, x: Tensor, reruns: Optional[dict]) -> Tensor:
    pair = _chain_projection(block)
    if pair is None:
        return _shortcut(block, x)
    y, mean, invstd = conv_bn_stats(pair[0], pair[1], x, reruns=reruns)
    return batch_norm_act(pair[1], y, relu=False, stats=(mean, invstd))


def _tail_recomputed(block, last_conv) -> bool:
    """Whether the block's tail (last conv + its BN + the shortcut + ReLU) is recomputed in the backward
    rather than its conv outputs saved: where every conv in it is cheap to recompute (layer1 of a
    ResNet-50: 1x1 convs from 64 channels) and the shortcut is the identity or a chain projection (a
    module shortcut could have state a rerun would update twice)."""
    if not cheap_to_recompute(last_conv):
        return False
    if block.downsample is None:
        return True
    pair = _chain_projection(block)
    return pair is not None and cheap_to_recompute(pair[0])


def _norm_conv_chain(block, pairs, x: Tensor) -> Tensor:
    """Training NormConv chain: each conv emits its BN's batch statistics and the next conv applies that
    BN + ReLU in its prologue, so relu(bn(y)) of the inner convs is never written; the last BN (+ the
    shortcut, ReLU) is the block's output, applied with the statistics the last conv emitted. Where that
    tail is cheap to recompute, the backward recomputes it and its conv outputs are not held."""
    (first_conv, first_bn), *middle, (last_conv, last_bn) = pairs
    y, mean, invstd = conv_bn_stats(first_conv, first_bn, x)
    previous = first_bn
    for conv, bn in middle:
        y, mean, invstd = conv_bn_stats(conv, bn, y, prologue=bn_prologue(previous, mean, invstd))
        previous = bn

    def tail(reruns, y, mean, invstd, x):
        y, last_mean, last_invstd = conv_bn_stats(last_conv, last_bn, y, prologue=bn_prologue(previous, mean, invstd),
                                                  reruns=reruns)
        return batch_norm_act(last_bn, y, residual=_chain_shortcut(block, x, reruns), relu=True,
                              stats=(last_mean, last_invstd))

    if _tail_recomputed(block, last_conv):
        return recomputed(tail, y, mean, invstd, x)
    return tail(None, y, mean, invstd, x)


def _stem_chain_applies(model, x: Tensor) -> bool:
    """Whether the training stem runs as conv (statistics in its epilogue) -> BN + ReLU + max-pool
    recomputed in the backward: a plain max-pool and a chain pair a fast norm_conv covers."""
    return (type(model.maxpool) is nn.MaxPool2d and not has_hooks(model.maxpool)
            and norm_conv_chain_applies([(model.conv1, model.bn1)], x))


def _block_forward(block, x: Tensor, pairs) -> Tensor:
    """A v1 block's forward after TorchScript's branch: the plain or traced forward where that is what
    runs (tracing.unfused_forward), the NormConv chain in training where a fast norm_conv covers it,
    else the block's phase-A fused forward."""
    other = unfused_forward(block, x, fusable_relu(block.relu))
    if other is not None:
        return other
    if block.training and norm_conv_chain_applies(pairs, x):
        return _norm_conv_chain(block, pairs, x)
    return block._fused_forward(x)


class BasicBlock(_InvalidatesFolds, tv_resnet.BasicBlock):
    """torchvision's BasicBlock; forward = two fused conv+BN(+add)+ReLU (in training, where a fast
    norm_conv covers it, the NormConv chain)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return self._plain_forward(x)
        return _block_forward(self, x, [(self.conv1, self.bn1), (self.conv2, self.bn2)])

    def _fused_forward(self, x: Tensor) -> Tensor:
        out = conv_bn_act(self.conv1, self.bn1, x, relu=True)
        return conv_bn_act(self.conv2, self.bn2, out, residual=_shortcut(self, x), relu=True)

    def _plain_forward(self, x: Tensor) -> Tensor:
        """torchvision's forward, module by module (TorchScript, jit.trace, blocks the fused path cannot
        honour)."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def _move_stride_to_1x1(block) -> None:
    """ResNet v1 (the paper): the Bottleneck's stride on its first 1x1 conv instead of the 3x3
    (torchvision's v1.5). Weight shapes, names and initialisation are unchanged."""
    stride = block.conv2.stride
    if stride != (1, 1):
        block.conv1.stride = stride
        block.conv2.stride = (1, 1)


class Bottleneck(_InvalidatesFolds, tv_resnet.Bottleneck):
    """torchvision's Bottleneck (v1.5: stride on the 3x3; `stride_in_1x1=True`: v1, the paper's,
    stride on the first 1x1). In eval, conv3 and the projection shortcut run as one fused
    `bottleneck_tail` (exact once BN is folded into both)."""

    def __init__(self, *args: Any, stride_in_1x1: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if stride_in_1x1:
            _move_stride_to_1x1(self)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return self._plain_forward(x)
        return _block_forward(self, x, [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)])

    def _fused_forward(self, x: Tensor) -> Tensor:
        out = conv_bn_act(self.conv1, self.bn1, x, relu=True)
        out = conv_bn_act(self.conv2, self.bn2, out, relu=True)
        tail = self._fused_tail_pairs()
        if tail is not None:
            (conv3, bn3), (conv_d, bn_d) = tail
            w3, b3 = folded_conv_bn(conv3, bn3, memory_format_of(out))
            wd, bd = folded_conv_bn(conv_d, bn_d, memory_format_of(x))
            return ops.bottleneck_tail(out, w3, x, wd, b3 + bd, stride=conv_d.stride, relu=True)
        return conv_bn_act(self.conv3, self.bn3, out, residual=_shortcut(self, x), relu=True)

    def _plain_forward(self, x: Tensor) -> Tensor:
        """torchvision's forward, module by module (TorchScript, jit.trace, blocks the fused path cannot
        honour)."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)

    def _fused_tail_pairs(self):
        projection = _projection(self.downsample)
        if projection is None or not fusable_pair(self.conv3, self.bn3):
            return None
        conv_d, bn_d = projection
        if not (uses_running_stats(self.bn3) and uses_running_stats(bn_d)):
            return None
        plain_1x1 = all(c.kernel_size == (1, 1) and c.padding == (0, 0) and c.dilation == (1, 1) and c.groups == 1
                        for c in (self.conv3, conv_d))
        return ((self.conv3, self.bn3), projection) if plain_1x1 and self.conv3.stride == (1, 1) else None


_FASTRES_BLOCK = {tv_resnet.BasicBlock: BasicBlock, tv_resnet.Bottleneck: Bottleneck}


class ResNet(_InvalidatesFolds, tv_resnet.ResNet):
    """torchvision's ResNet with fused blocks. Same constructor, same state_dict; one more option,
    `stride_in_1x1=True`, puts each Bottleneck's stride on its first 1x1 conv (ResNet v1).

    In CPU float32 inference the activations run channels_last internally (oneDNN's
    fastest layout); the output (N, num_classes) is the same either way.
    """

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[List[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, stride_in_1x1: bool = False) -> None:
        super().__init__(_FASTRES_BLOCK.get(block, block), layers, num_classes, zero_init_residual, groups,
                         width_per_group, replace_stride_with_dilation, norm_layer)
        if stride_in_1x1:  # v1 placement in every Bottleneck (BasicBlocks have no 1x1 to move it to)
            for module in self.modules():
                if isinstance(module, tv_resnet.Bottleneck):
                    _move_stride_to_1x1(module)

    def _forward_impl(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return self._plain_forward(x)
        if torch.jit.is_tracing():
            return self._plain_forward(x)
        if isinstance(x, Proxy):  # torch.fx: checks and layout as a graph node, then the fused nodes
            x = model_input(x, self.conv1, self.bn1)
            return self._fused_forward(x) if fusable_relu(self.relu) else self._plain_forward(x)
        checks.model_input(x, self.conv1)
        if not fusable_relu(self.relu):
            return self._plain_forward(x)
        layout = dispatch.preferred_memory_format(x, self.training)
        if layout is not None:
            x = x.contiguous(memory_format=layout)
            if not torch.compiler.is_compiling():  # traced graphs never take the CPU fast path
                # One check of the (small) input spares the fast paths a NaN check per layer.
                with dispatch.forward_context(input_finite=bool(torch.isfinite(x.sum())),
                                              private_activations=self._activations_private()):
                    return self._fused_forward(x)
        return self._fused_forward(x)

    def _plain_forward(self, x: Tensor) -> Tensor:
        """torchvision's forward, module by module (TorchScript, jit.trace, a replaced stem ReLU)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def _fused_forward(self, x: Tensor) -> Tensor:
        x = self._stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def _stem(self, x: Tensor) -> Tensor:
        """conv1 -> bn1 -> ReLU -> max-pool. In training where the chain applies, bn1's statistics come
        from conv1's epilogue and BN + ReLU + max-pool are recomputed in the backward from conv1's output
        (which BN's backward needs anyway): neither relu(bn1(y)) nor the pool's indices are held."""
        if self.training and not isinstance(x, Proxy) and _stem_chain_applies(self, x):
            y, mean, invstd = conv_bn_stats(self.conv1, self.bn1, x)
            return recomputed(lambda _, y, mean, invstd: self.maxpool(
                batch_norm_act(self.bn1, y, relu=True, stats=(mean, invstd))), y, mean, invstd)
        return self.maxpool(conv_bn_act(self.conv1, self.bn1, x, relu=True))

    def _activations_private(self) -> bool:
        """Whether only this forward sees the blocks' outputs (so a block may write its output over its
        dead input): every block is a fastres block, and no hook anywhere could keep an output."""
        if not _no_global_hooks():
            return False
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if type(layer) is not nn.Sequential or any(type(block) not in (BasicBlock, Bottleneck) for block in layer):
                return False
        return not any(has_hooks(module) for module in self.modules())


# ---- constructors: torchvision's signatures, weights through torchvision's own loader ----

def _set_named_param(kwargs: dict, name: str, value: Any) -> None:
    if name in kwargs and kwargs[name] != value:
        raise ValueError(f"The parameter '{name}' expected value {value} but got {kwargs[name]} instead.")
    kwargs[name] = value


def _resnet(block, layers, enum_cls, weights, progress: bool, **kwargs: Any) -> ResNet:
    weights = verify_weights(enum_cls, weights)
    if weights is not None:
        _set_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        model.load_state_dict(load_weights(weights, progress))
    return model


@legacy_interface(tvm.ResNet18_Weights.IMAGENET1K_V1)
def resnet18(*, weights: Optional[tvm.ResNet18_Weights] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 (torchvision's `resnet18`)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], tvm.ResNet18_Weights, weights, progress, **kwargs)


@legacy_interface(tvm.ResNet34_Weights.IMAGENET1K_V1)
def resnet34(*, weights: Optional[tvm.ResNet34_Weights] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 (torchvision's `resnet34`)."""
    return _resnet(BasicBlock, [3, 4, 6, 3], tvm.ResNet34_Weights, weights, progress, **kwargs)


@legacy_interface(tvm.ResNet50_Weights.IMAGENET1K_V1)
def resnet50(*, weights: Optional[tvm.ResNet50_Weights] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 (torchvision's `resnet50`)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], tvm.ResNet50_Weights, weights, progress, **kwargs)


@legacy_interface(tvm.ResNet101_Weights.IMAGENET1K_V1)
def resnet101(*, weights: Optional[tvm.ResNet101_Weights] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 v1.5 (torchvision's `resnet101`)."""
    return _resnet(Bottleneck, [3, 4, 23, 3], tvm.ResNet101_Weights, weights, progress, **kwargs)


@legacy_interface(tvm.ResNet152_Weights.IMAGENET1K_V1)
def resnet152(*, weights: Optional[tvm.ResNet152_Weights] = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 v1.5 (torchvision's `resnet152`)."""
    return _resnet(Bottleneck, [3, 8, 36, 3], tvm.ResNet152_Weights, weights, progress, **kwargs)


def _grouped(kwargs: dict, groups: int, width_per_group: int) -> dict:
    _set_named_param(kwargs, "groups", groups)
    _set_named_param(kwargs, "width_per_group", width_per_group)
    return kwargs


@legacy_interface(tvm.ResNeXt50_32X4D_Weights.IMAGENET1K_V1)
def resnext50_32x4d(*, weights: Optional[tvm.ResNeXt50_32X4D_Weights] = None, progress: bool = True,
                    **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (torchvision's `resnext50_32x4d`)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], tvm.ResNeXt50_32X4D_Weights, weights, progress,
                   **_grouped(kwargs, 32, 4))


@legacy_interface(tvm.ResNeXt101_32X8D_Weights.IMAGENET1K_V1)
def resnext101_32x8d(*, weights: Optional[tvm.ResNeXt101_32X8D_Weights] = None, progress: bool = True,
                     **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d (torchvision's `resnext101_32x8d`)."""
    return _resnet(Bottleneck, [3, 4, 23, 3], tvm.ResNeXt101_32X8D_Weights, weights, progress,
                   **_grouped(kwargs, 32, 8))


@legacy_interface(tvm.ResNeXt101_64X4D_Weights.IMAGENET1K_V1)
def resnext101_64x4d(*, weights: Optional[tvm.ResNeXt101_64X4D_Weights] = None, progress: bool = True,
                     **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d (torchvision's `resnext101_64x4d`)."""
    return _resnet(Bottleneck, [3, 4, 23, 3], tvm.ResNeXt101_64X4D_Weights, weights, progress,
                   **_grouped(kwargs, 64, 4))


@legacy_interface(tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1)
def wide_resnet50_2(*, weights: Optional[tvm.Wide_ResNet50_2_Weights] = None, progress: bool = True,
                    **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (torchvision's `wide_resnet50_2`)."""
    _set_named_param(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 6, 3], tvm.Wide_ResNet50_2_Weights, weights, progress, **kwargs)


@legacy_interface(tvm.Wide_ResNet101_2_Weights.IMAGENET1K_V1)
def wide_resnet101_2(*, weights: Optional[tvm.Wide_ResNet101_2_Weights] = None, progress: bool = True,
                     **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2 (torchvision's `wide_resnet101_2`)."""
    _set_named_param(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 23, 3], tvm.Wide_ResNet101_2_Weights, weights, progress, **kwargs)
