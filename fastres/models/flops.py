"""Multiply-accumulates of convolutions and fully connected layers, the work a ResNet's
TFLOP/s figure is made of (FLOPs = 2 x MACs; BN, ReLU, adds and pooling are left out, as
in the published ResNet figures: ResNet-50 at 224x224 is 4.09 GMACs)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def conv_macs(output_shape: Sequence[int], weight_shape: Sequence[int], groups: int = 1) -> int:
    """MACs of one conv: every output element takes (in_channels / groups) x kh x kw products."""
    out_elements = 1
    for size in output_shape:
        out_elements *= int(size)
    per_output = 1
    for size in weight_shape[1:]:  # weight is (out, in / groups, kh, kw); in / groups is already per group
        per_output *= int(size)
    return out_elements * per_output


def linear_macs(output_shape: Sequence[int], in_features: int) -> int:
    out_elements = 1
    for size in output_shape:
        out_elements *= int(size)
    return out_elements * int(in_features)


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of one forward of `model` on `example` (whole batch), counted with forward hooks
    on every nn.Conv2d and nn.Linear. Runs the forward once, under no_grad, in eval mode
    (so BatchNorm's running statistics are not touched), then restores the mode."""
    total = 0

    def on_conv(module: nn.Conv2d, inputs, output) -> None:
        nonlocal total
        total += conv_macs(output.shape, module.weight.shape, module.groups)

    def on_linear(module: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += linear_macs(output.shape, module.in_features)

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(on_conv))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(on_linear))
    was_training = model.training
    try:
        # A hook makes fastres run the module itself: the count is that of the same convolutions.
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total


def forward_flops(macs: int) -> int:
    return 2 * macs


def training_flops(macs: int) -> int:
    """Forward + backward of a training step: the usual 3x forward (the backward computes
    input and weight gradients, each about one forward's work)."""
    return 3 * forward_flops(macs)
