"""Functional fused ops (docs/design.md, "One op across the tree") and the backend switch.

Kernel developers: the reference chain of each op is in `reference.py`; the CPU fast
path in `onednn.py`; argument checks in `checks.py`; the one dispatch in `dispatch.py`, reading the
table of implementations in `implementations.py` (auto measures in `tuner.py`).
"""
from .backend import available_backends, get_backend, mark_available, set_backend, use_backend
from .functional import add_relu, batch_norm_act, bottleneck_tail, conv2d_act, fold_bn, norm_conv
from .registry import triton_status

mark_available("triton", *triton_status())

__all__ = [
    "add_relu", "batch_norm_act", "bottleneck_tail", "conv2d_act", "fold_bn", "norm_conv",
    "available_backends", "get_backend", "set_backend", "use_backend",
]
