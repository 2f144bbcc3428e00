"""Bitwise reproducibility: the same model and input give the same bits, run after run.

fastres's own kernels reduce in a fixed order (no atomics), the fold cache hands out the same
folded weights, and a fresh copy of a model folds to the same bits. Covered: eval forwards on
every backend (repeated, on a deep copy, and in a separate process), and whole training steps
(forward, backward, SGD, running statistics) on the CPU backends. On a GPU, cuDNN's
backward may use atomics: training bits there are only reproducible with
torch.backends.cudnn.deterministic = True, which the GPU test sets.
"""
from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastres

from helpers import randn, randomize_bn_

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Triton on the CPU interpreter is deterministic too (tests/test_batch_norm_act.py checks its
# statistics bit for bit) but too slow for whole models here.
BACKENDS = [b for b in fastres.available_backends() if b != "triton" or torch.cuda.is_available()]


def _model(name="resnet18", device="cpu"):
    torch.manual_seed(0)
    return randomize_bn_(getattr(fastres, name)(num_classes=10)).to(device)


def _eval(model, x, backend):
    model.eval()
    with fastres.use_backend(backend), torch.no_grad():
        return model(x)


def _train_steps(model, x, backend, steps=2):
    """SGD steps; returns every parameter, gradient and buffer afterwards."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    labels = torch.arange(x.shape[0], device=x.device) % 10
    with fastres.use_backend(backend):
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()
    return ([p.detach().clone() for p in model.parameters()] + [p.grad.clone() for p in model.parameters()]
            + [b.clone() for b in model.buffers()])


def _assert_bitwise(first, second, what):
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"{what}: tensor {i} differs (max diff {(a.double() - b.double()).abs().max()})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_eval_is_bitwise_reproducible(name, backend, device):
    model = _model(name, device)
    for channels_last in (False, True):
        x = randn(3, 3, 32, 32, seed=1, channels_last=channels_last).to(device)
        first = _eval(model, x, backend)
        _assert_bitwise([_eval(model, x, backend)], [first], f"{name} second run")
        _assert_bitwise([_eval(copy.deepcopy(model), x, backend)], [first], f"{name} on a fresh copy")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_training_is_bitwise_reproducible_on_cpu(backend):
    model = _model("resnet18")
    x = randn(4, 3, 32, 32, seed=2)
    first = _train_steps(copy.deepcopy(model), x, backend)
    _assert_bitwise(_train_steps(copy.deepcopy(model), x, backend), first, "second training run")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_is_bitwise_reproducible_on_gpu_with_deterministic_cudnn(backend, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model = _model("resnet18", "cuda")
    x = randn(4, 3, 32, 32, seed=2).cuda()
    first = _train_steps(copy.deepcopy(model), x, backend)
    _assert_bitwise(_train_steps(copy.deepcopy(model), x, backend), first, "second training run (GPU)")


def _digest() -> str:
    """Hash of a default-backend eval output and of a training step: the same in every process."""
    model = _model("resnet18")
    x = randn(2, 3, 32, 32, seed=3)
    h = hashlib.sha256()
    for t in [_eval(model, x, "auto")] + _train_steps(model, randn(4, 3, 32, 32, seed=4), "auto", steps=1):
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_bits_are_the_same_in_another_process():
    code = "import test_determinism as t; print(t._digest())"
    here = os.path.dirname(os.path.abspath(__file__))
    runs = [subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    digests = [run.stdout.strip().splitlines()[-1] for run in runs]
    assert digests[0] == digests[1] == _digest(), f"digests differ across processes: {digests}"
