"""Which implementation the fused ops run: the process-wide backend switch.

Names: "auto" (pick per call from what is available and fastest), "torch" (the plain
PyTorch reference, always available), "triton" and "cpp" (fast paths, present only
when their kernels exist in this build). The default comes from ``FASTRES_BACKEND``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

KNOWN_BACKENDS = ("auto", "torch", "triton", "cpp")

# Fast paths register themselves here when importable (see fastres/ops/__init__.py).
_AVAILABLE: dict[str, bool] = {"auto": True, "torch": True, "triton": False, "cpp": False}
_WHY_UNAVAILABLE: dict[str, str] = {
    "triton": "triton is not usable here",
    "cpp": "the compiled extension fastres._C is not loaded",
}

# A process-wide default plus a per-thread override, so `use_backend` in one thread
# cannot change what another thread's inference runs.
_state = threading.local()
_default = "auto"


def _check_name(name: object, argument: str = "name") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str, one of {list(KNOWN_BACKENDS)}; got {type(name).__name__}")
    key = name.strip().lower()
    if key not in KNOWN_BACKENDS:
        raise ValueError(f"{argument} must be one of {list(KNOWN_BACKENDS)}; got {name!r}")
    if not _AVAILABLE[key]:
        raise ValueError(
            f"backend {key!r} is not available: {_WHY_UNAVAILABLE.get(key, 'not built')}; "
            f"available: {available_backends()}"
        )
    return key


def mark_available(name: str, available: bool, why: str = "") -> None:
    """Called by a fast path at import time to say whether it can run here."""
    _AVAILABLE[name] = available
    if not available and why:
        _WHY_UNAVAILABLE[name] = why


def available_backends() -> list[str]:
    """The backend names `set_backend` accepts in this process."""
    return [name for name in KNOWN_BACKENDS if _AVAILABLE[name]]


def get_backend() -> str:
    return getattr(_state, "override", None) or _default


def set_backend(name: str) -> None:
    """Set the process-wide backend ("auto", "torch", "triton", "cpp")."""
    global _default
    _default = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed code on backend `name` (this thread only), then restore."""
    key = _check_name(name)
    previous = getattr(_state, "override", None)
    _state.override = key
    try:
        yield key
    finally:
        _state.override = previous


def _default_from_environment() -> None:
    value = os.environ.get("FASTRES_BACKEND")
    if value:
        try:
            set_backend(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"environment variable FASTRES_BACKEND: {error}") from None
