"""Check a fastres model against its torchvision twin: eval outputs, and one training step's
outputs, gradients and BatchNorm buffers. Used by the CLI before it times anything."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from ..models.convert import from_torchvision


def randomize_batch_norm_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-default affine parameters and running statistics, so that a
    comparison cannot pass by accident (defaults make BN nearly the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().double().abs().max().clamp_min(1e-12)
    return ((actual.detach().double() - expected.detach().double()).abs().max() / scale).item()


@dataclass
class Check:
    what: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def verify_against_torchvision(tv_model: nn.Module, x: torch.Tensor, tolerance: float = 1e-4,
                               timed_x: Optional[torch.Tensor] = None,
                               autocast_dtype: Optional[torch.dtype] = None) -> List[Check]:
    """Compare fastres.from_torchvision(tv_model) with tv_model on input x (fp32 numerics, TF32 off):
    eval output, and one training step (outputs, gradients, running statistics). With timed_x, also
    the eval output at the timed shape: some kernels are chosen by shape (the CPU path's Winograd
    convolutions need enough tiles), so a small check input alone would not test what is timed.
    With autocast_dtype (the benchmarked bf16/fp16), also the eval output under that autocast: its
    error against the fp32 torchvision output may be at most twice torchvision's own under the same
    autocast (plus 1e-3), since both round to that dtype."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        reference = copy.deepcopy(tv_model).eval()  # the training step must not touch the caller's model
        fast = from_torchvision(reference)
        with torch.inference_mode():
            checks = [Check("eval output", relative_error(fast(x), reference(x)), tolerance)]
            if timed_x is not None:
                checks.append(Check(f"eval output at {tuple(timed_x.shape)}",
                                    relative_error(fast(timed_x), reference(timed_x)), tolerance))
            if autocast_dtype is not None and autocast_dtype != torch.float32:
                truth = reference(x)
                with torch.autocast(x.device.type, dtype=autocast_dtype):
                    ours, theirs = fast(x), reference(x)
                name = str(autocast_dtype).replace("torch.", "")
                own = relative_error(theirs, truth)
                checks.append(Check(f"eval output, {name} autocast", relative_error(ours, truth), 2 * own + 1e-3))
        reference.train(), fast.train()
        x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, out_fast = reference(x_ref), fast(x_fast)
        checks.append(Check("train output", relative_error(out_fast, out_ref), tolerance))
        out_ref.square().mean().backward()
        out_fast.square().mean().backward()
        checks.append(Check("train input grad", relative_error(x_fast.grad, x_ref.grad), tolerance))
        grads = [relative_error(pf.grad, pr.grad) for pf, pr in zip(fast.parameters(), reference.parameters())]
        checks.append(Check("train parameter grads (worst)", max(grads), tolerance))
        buffers = [relative_error(bf.float(), br.float()) for bf, br in zip(fast.buffers(), reference.buffers())]
        checks.append(Check("BN running stats after the step (worst)", max(buffers), tolerance))
        return checks
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
