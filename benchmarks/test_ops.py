"""Each fused op against the unfused PyTorch chain it replaces, at each ResNet stage's shape:

- conv2d_act:          conv2d_act(x, folded W, b)            vs conv2d -> batch_norm(eval) -> relu
- conv2d_act_residual: conv2d_act(x, W, b, residual=r)       vs conv2d -> batch_norm(eval) -> + r -> relu
- bottleneck_tail:   bottleneck_tail(h, W3, x, Wd, b)      vs conv3 -> bn3, downsample conv -> bn, add, relu
- batch_norm_act_train: batch_norm_act(training=True, residual=r) vs batch_norm(training) -> + r -> relu,
                     forward (graph recorded) and forward + backward
- norm_conv_train:   norm_conv(x, W, scale, shift, relu=True) (the previous BN's apply + ReLU as the conv's
                     prologue, the next BN's batch statistics from its epilogue) vs batch_norm(training) ->
                     relu -> conv2d -> var_mean (the next BN's statistics), forward and forward + backward
                     (the loss reads y and the statistics, so their gradient reaches y on both sides).
                     The fused op is given the previous BN's batch statistics, as the NormConv chain has
                     them from the previous conv's epilogue; the eager chain computes them.

Inference ops run under inference_mode with BN folded once beforehand, as the fastres modules
cache it. "compile" is torch.compile of the unfused chain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres.models.flops import conv_macs, forward_flops, training_flops
from fastres.bench.variants import Variant, backend_scope, synthetic_input

BASELINE = "pytorch"
STAGES = (1, 2, 3, 4)
OPS = {  # op -> modes it is timed in
    "conv2d_act": ("infer",),
    "conv2d_act_residual": ("infer",),
    "bottleneck_tail": ("infer",),
    "batch_norm_act_train": ("forward", "forward_backward"),
    "norm_conv_train": ("forward", "forward_backward"),
}
CASES = [(op, mode) for op, modes in OPS.items() for mode in modes]


def _bn(channels: int, device, seed: int = 0):
    """BN weight, bias, running mean and variance (fp32, as a model under autocast keeps them)."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g) * 0.1,
              torch.randn(channels, generator=g) * 0.1, torch.rand(channels, generator=g) + 0.5)
    return [v.to(device) for v in values]


def _weight(out_c: int, in_c: int, k: int, variant: Variant, device):
    w = torch.randn(out_c, in_c, k, k, device=device) * (2.0 / (in_c * k * k)) ** 0.5
    return w.to(variant.torch_dtype).contiguous(memory_format=variant.memory_format)


def _input(shape, variant: Variant, device, seed: int):
    return synthetic_input(shape, variant, device, seed).to(variant.torch_dtype)


def _folded(w, bn, variant: Variant):
    weight, bias = fastres.ops.fold_bn(w.float(), None, *bn, eps=1e-5)
    return (weight.to(variant.torch_dtype).contiguous(memory_format=variant.memory_format),
            bias.to(variant.torch_dtype))


def _bn_eval(y, bn):
    return F.batch_norm(y, bn[2], bn[3], bn[0], bn[1], training=False, eps=1e-5)


def _finisher(backward: bool, grad: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """out -> out, after out.backward(grad) in a forward + backward case."""
    def finish(out):
        if backward:
            out.backward(grad)
        return out
    return finish


@dataclass
class Case:
    eager: Callable[[], torch.Tensor]   # the unfused chain, also what torch.compile compiles
    fused: Callable[[], torch.Tensor]   # the fastres op (run under the variant's backend)
    macs: Optional[int]                 # None: a memory-bound op (no TFLOP/s figure)
    images: int


def conv_case(op: str, variant: Variant, stage: int, batch: int, size: int, device) -> Case:
    """A BasicBlock 3x3 conv (C -> C) at the stage's resolution, with or without the residual."""
    c, hw = 64 * 2 ** (stage - 1), max(1, size // 4 // 2 ** (stage - 1))
    x = _input((batch, c, hw, hw), variant, device, seed=1)
    r = _input((batch, c, hw, hw), variant, device, seed=2) if op == "conv2d_act_residual" else None
    w, bn = _weight(c, c, 3, variant, device), _bn(c, device)
    wf, bf = _folded(w, bn, variant)

    def eager():
        y = _bn_eval(F.conv2d(x, w, None, 1, 1), bn)
        return torch.relu(y if r is None else y + r)

    def fused():
        return fastres.ops.conv2d_act(x, wf, bf, 1, 1, residual=r, relu=True)
    return Case(eager, fused, conv_macs((batch, c, hw, hw), w.shape), batch)


def tail_case(variant: Variant, stage: int, batch: int, size: int, device) -> Case:
    """A projection Bottleneck's tail: conv3 (width -> 4 width) + the strided 1x1 shortcut."""
    width, hw = 64 * 2 ** (stage - 1), max(1, size // 4 // 2 ** (stage - 1))
    stride, inplanes = (1, 64) if stage == 1 else (2, 2 * width)
    h = _input((batch, width, hw, hw), variant, device, seed=1)
    x = _input((batch, inplanes, hw * stride, hw * stride), variant, device, seed=2)
    w3, wd = _weight(4 * width, width, 1, variant, device), _weight(4 * width, inplanes, 1, variant, device)
    bn3, bnd = _bn(4 * width, device), _bn(4 * width, device, seed=1)
    (w3f, b3f), (wdf, bdf) = _folded(w3, bn3, variant), _folded(wd, bnd, variant)

    def eager():
        return torch.relu(_bn_eval(F.conv2d(h, w3), bn3) + _bn_eval(F.conv2d(x, wd, stride=stride), bnd))

    def fused():
        return fastres.ops.bottleneck_tail(h, w3f, x, wdf, b3f + bdf, stride=stride, relu=True)
    out = (batch, 4 * width, hw, hw)
    return Case(eager, fused, conv_macs(out, w3.shape) + conv_macs(out, wd.shape), batch)


def bn_train_case(variant: Variant, stage: int, batch: int, size: int, device, backward: bool) -> Case:
    """Training BN + residual + ReLU on a Bottleneck's output (4 x width channels)."""
    c, hw = 256 * 2 ** (stage - 1), max(1, size // 4 // 2 ** (stage - 1))
    x = _input((batch, c, hw, hw), variant, device, seed=1).requires_grad_(True)
    r = _input((batch, c, hw, hw), variant, device, seed=2).requires_grad_(True)
    weight, bias, mean, var = _bn(c, device)
    weight.requires_grad_(True), bias.requires_grad_(True)
    finish = _finisher(backward, _input((batch, c, hw, hw), variant, device, seed=3))

    def eager():
        return finish(torch.relu(F.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.1) + r))

    def fused():
        return finish(fastres.ops.batch_norm_act(x, weight, bias, mean, var, training=True, momentum=0.1,
                                                 residual=r, relu=True))
    return Case(eager, fused, None, batch)


def norm_conv_case(variant: Variant, stage: int, batch: int, size: int, device, backward: bool) -> Case:
    """A BasicBlock's second 3x3 conv (C -> C) in training, as the NormConv chain runs it."""
    c, hw = 64 * 2 ** (stage - 1), max(2, size // 4 // 2 ** (stage - 1))
    x = _input((batch, c, hw, hw), variant, device, seed=1).requires_grad_(backward)
    w = _weight(c, c, 3, variant, device).requires_grad_(backward)
    gamma, beta, running_mean, running_var = _bn(c, device)
    gamma.requires_grad_(backward), beta.requires_grad_(backward)
    next_mean, next_var = torch.zeros(c, device=device), torch.ones(c, device=device)
    with torch.no_grad():  # what the previous conv's epilogue emitted
        var_x, mean_x = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
        invstd_x = torch.rsqrt(var_x + 1e-5)
    grad = _input((batch, c, hw, hw), variant, device, seed=3)
    # The next BN's statistics take part in the loss, as in the chain: their gradient reaches y too (the
    # fused side's output-gradient pass, the eager side's var_mean backward).
    stats_grads = [torch.randn(c, generator=torch.Generator().manual_seed(seed)).to(device) * 1e-3
                   for seed in (4, 5)]

    def finish(y, *stats):
        if backward:
            torch.autograd.backward([y, *stats], [grad, *stats_grads])
        return y

    def eager():
        a = torch.relu(F.batch_norm(x, running_mean, running_var, gamma, beta, training=True, momentum=0.1))
        y = F.conv2d(a, w, None, 1, 1)
        var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)  # the next BN's statistics
        return finish(y, mean, var)

    def fused():
        scale = invstd_x * gamma
        y, mean, invstd = fastres.ops.norm_conv(x, w, 1, 1, scale=scale, shift=beta - mean_x * scale, relu=True,
                                                running_mean=next_mean, running_var=next_var, momentum=0.1)
        return finish(y, mean, invstd)
    return Case(eager, fused, conv_macs((batch, c, hw, hw), w.shape), batch)


def make_case(op: str, mode: str, variant: Variant, stage: int, batch: int, size: int, device) -> Case:
    if op == "bottleneck_tail":
        return tail_case(variant, stage, batch, size, device)
    if op == "batch_norm_act_train":
        return bn_train_case(variant, stage, batch, size, device, backward=mode == "forward_backward")
    if op == "norm_conv_train":
        return norm_conv_case(variant, stage, batch, size, device, backward=mode == "forward_backward")
    return conv_case(op, variant, stage, batch, size, device)


def runner(case: Case, variant: Variant, mode: str) -> Callable[[], object]:
    if variant.backend:
        fn = case.fused
    elif variant.compile_mode:
        fn = torch.compile(case.eager, mode=variant.compile_mode)
    else:
        fn = case.eager
    # inference ops as the eval-mode modules call them; the training op records its graph
    grad_mode = torch.inference_mode if mode == "infer" else torch.enable_grad

    def step():
        with grad_mode(), backend_scope(variant):
            return fn()
    return step


@pytest.mark.parametrize("stage", STAGES, ids=[f"stage{s}" for s in STAGES])
@pytest.mark.parametrize("op,mode", CASES, ids=[f"{op}-{mode}" for op, mode in CASES])
def test_op(measure, settings, variant, op, mode, stage, batch):
    case = make_case(op, mode, variant, stage, batch, settings.size, settings.device)
    flops = None
    if case.macs is not None:
        flops = (training_flops if mode == "forward_backward" else forward_flops)(case.macs)
    smallest = stage == STAGES[-1] and settings.smallest(variant.dtype, variant.layout)
    measure(runner(case, variant, mode), variant, group=f"ops {op} {mode} stage{stage} batch={batch}",
            images=case.images, flops=flops, smallest=smallest)
