"""pytest configuration for tests/: the environment every test runs in, and its fixtures.
The shared helpers (tolerances, random inputs, layouts, conv cases, model pairs, comparisons)
live in tests/helpers.py."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The switch is
# read when the kernels are defined, so it must be set before fastres imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# auto's measured choice is tested in test_tuner.py; elsewhere the static choices keep every test's
# path fixed, and no test reads or writes the user's tuning cache.
os.environ.setdefault("FASTRES_AUTOTUNE", "0")
if "FASTRES_CACHE_DIR" not in os.environ:
    import tempfile as _tempfile

    os.environ["FASTRES_CACHE_DIR"] = _tempfile.mkdtemp(prefix="fastres-test-cache-")


@pytest.fixture(autouse=True)
def _deterministic_numerics():
    """No TF32 anywhere and a fixed seed for every test."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Fresh tensors start as NaN, so an element a kernel forgot to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
