"""Loads the compiled extension fastres._C, or says once why it is missing.

fastres works without it: the ops fall back to the "torch" backend.
"""
from __future__ import annotations

import warnings

from .ops.backend import mark_available

try:
    from . import _C  # noqa: F401  (registers the torch.ops.fastres kernels)
    _error = None
except ImportError as error:  # not built: FASTRES_SKIP_EXT=1, no compiler, or a source checkout
    _error = error

if _error is not None:
    warnings.warn(f"fastres._C is not available ({_error}); the 'cpp' backend is off and fastres uses "
                  f"the 'torch' backend. Reinstall with `pip install --no-build-isolation -e .` to build it.",
                  RuntimeWarning, stacklevel=2)
if _error is None:
    from .ops.registry import register_compiled_ops

    register_compiled_ops()
mark_available("cpp", _error is None, f"fastres._C could not be loaded: {_error}")


def extension_loaded() -> bool:
    """Whether the compiled extension fastres._C was imported."""
    return _error is None


def build_info() -> dict:
    """What the installed fastres._C was compiled with:

    cuda_kernels (bool), cudnn_graphs (bool: the cudnn-frontend graph ops), cudnn_frontend_version
    (str or None), cudnn_compiled_version (int or None: CUDNN_VERSION of the headers), archs (the
    CUDA architectures compiled, e.g. ["sm_90"]), extension (bool: fastres._C loaded at all),
    iostreams_ok (bool or None: C++ number formatting inside _C works, i.e. _C uses the process's
    libstdc++ and carries no exported copy of its own; see setup.py's LINK_FLAGS).
    """
    if _error is not None:
        return {"extension": False, "cuda_kernels": False, "cudnn_graphs": False, "cudnn_frontend_version": None,
                "cudnn_compiled_version": None, "archs": [], "iostreams_ok": None}
    from . import _C
    return {"extension": True, **_C.build_info()}
