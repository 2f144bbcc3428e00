"""The implementations a torchvision module is timed against, shared by the CLI and the
pytest suites: torchvision eager, torch.compile of torchvision, and fastres on a backend,
each at a dtype (fp32, or bf16/fp16 through autocast) and a memory layout.

Every variant gets its own copy of the same weights (training steps update them) and is fed
the same input tensor, so the figures compare implementations, nothing else.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Optional

import torch
from torch import nn

import fastres

from .config import DTYPES, LAYOUTS

COMPILE_MODES = {"compile": "default", "compile-max-autotune": "max-autotune"}


class CompileUnavailable(RuntimeError):
    """torch.compile could not build this variant here (no C++ compiler or Triton, ...)."""


@dataclass(frozen=True)
class Variant:
    impl: str    # "torchvision" / "pytorch" (eager), "compile", "compile-max-autotune", "fastres-<backend>"
    dtype: str   # a key of DTYPES
    layout: str  # a key of LAYOUTS

    @property
    def name(self) -> str:
        return f"{self.impl} {self.layout} {self.dtype}"

    @property
    def backend(self) -> Optional[str]:
        return self.impl[len("fastres-"):] if self.impl.startswith("fastres-") else None

    @property
    def compile_mode(self) -> Optional[str]:
        return COMPILE_MODES.get(self.impl)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def memory_format(self) -> torch.memory_format:
        return LAYOUTS[self.layout]


def backend_scope(variant: Variant) -> ContextManager:
    """fastres variants run on their backend; the others do not call fastres."""
    return fastres.use_backend(variant.backend) if variant.backend else contextlib.nullcontext()


@contextlib.contextmanager
def running(variant: Variant, device: torch.device) -> Iterator[None]:
    """Autocast to the variant's dtype (fp32: no autocast) and select its fastres backend."""
    with backend_scope(variant), torch.autocast(device.type, dtype=variant.torch_dtype,
                                                enabled=variant.dtype != "fp32"):
        yield


def synthetic_input(shape, variant: Variant, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A reproducible fp32 input made on the device (autocast casts it), in the variant's layout."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(*shape, generator=generator, device=device)
    return x.contiguous(memory_format=variant.memory_format)


def prepare(torchvision_module: nn.Module, fastres_module: nn.Module, variant: Variant,
            device: torch.device) -> nn.Module:
    """A private copy of the module this variant runs, on the device and in its layout
    (torch.compile wraps the torchvision copy; compilation itself happens on the first call)."""
    base = fastres_module if variant.backend else torchvision_module
    module = copy.deepcopy(base).to(device=device, memory_format=variant.memory_format)
    if variant.compile_mode:
        module = torch.compile(module, mode=variant.compile_mode)
    return module


def infer_step(module: nn.Module, x: torch.Tensor, variant: Variant) -> Callable[[], object]:
    module.eval()

    def step():
        with torch.inference_mode(), running(variant, x.device):
            return module(x)
    return step


def train_step(module: nn.Module, x: torch.Tensor, variant: Variant) -> Callable[[], object]:
    """forward + backward + SGD step. The loss is a cheap reduction of the output, so the step
    is the network's work; fp16 takes a GradScaler as AMP training does."""
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(x.device.type, enabled=variant.dtype == "fp16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with running(variant, x.device):
            loss = module(x).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss
    return step


STEPS = {"infer": infer_step, "train": train_step}


def first_call(step: Callable[[], object], variant: Variant) -> float:
    """Run the step once (compilation for torch.compile variants) and return its seconds; a
    compile variant that cannot be built here raises CompileUnavailable with the reason."""
    began = time.perf_counter()
    try:
        step()
    except Exception as error:  # inductor reports a missing toolchain as many different errors
        if variant.compile_mode:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CompileUnavailable(
                f"torch.compile failed here: {type(error).__name__}: {first_line[:200]}") from error
        raise
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began
