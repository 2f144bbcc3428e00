"""CPU inference fast path: oneDNN convolutions with the epilogue fused as post-ops.

(3x3 stride-1 convolutions take Winograd instead where it applies: winograd.py.)

PyTorch ships oneDNN's fused convolution (the operator Inductor emits for CPU):
conv + bias + (residual add) + ReLU in one pass over the output. Weights are
pre-packed once per input shape into oneDNN's preferred layout; without the shape
oneDNN picks a poor layout for some layers (measured: 20 ms instead of 8 ms for the
1024->512 1x1 conv of ResNet-50 at 14x14, batch 8). No autograd: used only when
nothing needs a gradient, on channels_last float32 CPU tensors.

NaN: oneDNN's fused ReLU maps NaN to 0 where torch.relu keeps it. So a call with a ReLU
takes this path only when its operands are finite: weights are checked once when packed,
activations by one summation per call (a NaN or Inf makes the sum non-finite; a finite
overflow just sends the call to the exact path). A ResNet forward whose input is finite
skips the per-call activation checks (`finite_activations`): with finite weights every
activation stays finite unless an fp32 sum overflows, where torch's own result depends on
the summation order.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Optional

import torch

from ..layout import conv_output_size
from . import checks, dispatch, reference, winograd

try:
    from torch.utils.weak import WeakIdKeyDictionary
except ImportError:  # pragma: no cover - very old torch
    WeakIdKeyDictionary = None  # type: ignore[assignment]

_mkldnn = getattr(torch.ops, "mkldnn", None)
AVAILABLE = bool(
    torch.backends.mkldnn.is_available()
    and WeakIdKeyDictionary is not None
    and _mkldnn is not None
    and hasattr(_mkldnn, "_convolution_pointwise")
    and hasattr(_mkldnn, "_reorder_convolution_weight")
)
INPLACE_AVAILABLE = AVAILABLE and hasattr(_mkldnn, "_convolution_pointwise_")  # (see reusable_activations)

# weight tensor -> {(weight version, input shape and conv geometry, or ("winograd", tile)): (packed weight,
# weight is finite)}.
# Weakly keyed, so packed copies die with the (folded) weight they came from.
_packed = WeakIdKeyDictionary() if AVAILABLE else None
_MAX_SHAPES_PER_WEIGHT = 8
_bias_finite = WeakIdKeyDictionary() if AVAILABLE else None  # bias tensor -> (version, is finite)
_joined = WeakIdKeyDictionary() if AVAILABLE else None  # conv3 weight -> (shortcut weight ref, versions, [w3|wd])
# .activations_finite: set by a ResNet forward that checked its input; .reusable: see reusable_activations
_local = threading.local()


@contextlib.contextmanager
def finite_activations(finite: bool):
    """Within this block (this thread), activations count as finite while every weight is."""
    saved = getattr(_local, "activations_finite", False)
    _local.activations_finite = finite
    try:
        yield
    finally:
        _local.activations_finite = saved


def all_finite(*tensors: Optional[torch.Tensor]) -> bool:
    """No NaN or Inf in any of them: one sum each, no temporary mask (a finite sum that overflows
    says False, which only costs the exact path)."""
    return all(t is None or bool(torch.isfinite(t.sum())) for t in tensors)


def applies(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """Whether this call can take the oneDNN path (checked after argument validation)."""
    if not AVAILABLE or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (residual is not None and residual.requires_grad)):
        return False
    if torch.compiler.is_compiling() or weight.is_inference():  # is_inference() breaks tracing
        return False
    if checks._autocast_enabled("cpu"):
        return False  # autocast asked for low-precision convolutions: the reference runs them like torch
    return x.numel() > 0 and x.is_contiguous(memory_format=torch.channels_last)


def _packed_weight(weight, key, pack):
    """pack(dense weight), cached per weight tensor, weight version and key; with whether it is finite."""
    key = (weight._version,) + key
    per_weight = _packed.get(weight)
    if per_weight is None:
        per_weight = _packed[weight] = {}
    packed = per_weight.get(key)
    if packed is None:
        if len(per_weight) >= _MAX_SHAPES_PER_WEIGHT:
            per_weight.pop(next(iter(per_weight)))
        dense = weight.detach().contiguous(memory_format=torch.channels_last)
        packed = per_weight[key] = (pack(dense), all_finite(dense))
    return packed


def _finite_bias(bias) -> bool:
    """all_finite(bias), remembered per bias version: the folded biases are the same tensors every call."""
    if bias is None:
        return True
    if bias.is_inference():  # made in this forward (a projection tail's summed bias): no version to key on
        return all_finite(bias)
    known = _bias_finite.get(bias)
    if known is None or known[0] != bias._version:
        known = _bias_finite[bias] = (bias._version, all_finite(bias))
    return known[1]


@contextlib.contextmanager
def reusable_activations(enabled: bool):
    """Within this block (this thread), a convolution whose residual was made by an earlier call of
    this fast path in the block writes its output over that residual instead of a new tensor.

    For a ResNet forward whose activations nobody else can see (fastres blocks only, no hooks): a
    block's input is dead once its residual add has read it, and a fresh 25 MB output costs ~6000
    page faults on the CPU (measured: resnet50 at batch 8 ran ~10% faster with the outputs in place)."""
    saved = getattr(_local, "reusable", None)
    _local.reusable = weakref.WeakValueDictionary() if enabled else None  # id -> tensor made here
    try:
        yield
    finally:
        _local.reusable = saved


@contextlib.contextmanager
def _within_forward(context: "dispatch.ForwardContext"):
    with finite_activations(context.input_finite), reusable_activations(context.private_activations):
        yield


dispatch.on_forward_context(_within_forward)


def _made_here(out: torch.Tensor) -> torch.Tensor:
    reusable = getattr(_local, "reusable", None)
    if reusable is not None:
        reusable[id(out)] = out
    return out


def residual_reusable(residual: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a conv2d_act on x here would write its output over `residual`: the tuner's question, apart
    from the conv's own `_reusable` (which tests/test_cpu_fast_path.py counts)."""
    return _reusable(residual, x)


def reusable_copy(residual: torch.Tensor) -> torch.Tensor:
    """A private channels_last copy of residual that this block's fast path may overwrite."""
    return _made_here(residual.detach().clone(memory_format=torch.channels_last))


def _reusable(residual: torch.Tensor, x: torch.Tensor) -> bool:
    reusable = getattr(_local, "reusable", None)
    return (reusable is not None and INPLACE_AVAILABLE and reusable.get(id(residual)) is residual
            and residual.is_contiguous(memory_format=torch.channels_last)
            and residual.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())


def conv2d_act(x, weight, bias, stride, padding, dilation, groups, residual, relu, method=None):
    """method: "direct" (oneDNN), "winograd4" / "winograd2" (F(4x4) / F(2x2), where winograd.covers),
    or None for the static rule (winograd.applies, F(4x4) where the image is whole 4x4 tiles)."""
    return _made_here(_conv2d_act(x, weight, bias, stride, padding, dilation, groups, residual, relu, method))


def _conv2d_act(x, weight, bias, stride, padding, dilation, groups, residual, relu, method=None):
    # 3x3 stride-1 convolutions go to Winograd (winograd.py) when every operand is finite:
    # its transforms would turn one Inf into NaNs across a tile.
    if method is None:
        use_winograd = winograd.applies(x, weight, stride, padding, dilation, groups)
        tile = winograd.tile_size(x)
    else:
        use_winograd = method.startswith("winograd")
        tile = int(method[len("winograd"):]) if use_winograd else 0
    if use_winograd:
        packed, weight_finite = _packed_weight(weight, ("winograd", tile),
                                               lambda dense: winograd.pack_weight(dense, tile))
    else:
        packed, weight_finite = _packed_weight(
            weight, (tuple(x.shape), stride, padding, dilation, groups),
            lambda dense: _mkldnn._reorder_convolution_weight(
                dense, list(padding), list(stride), list(dilation), groups, list(x.shape)))
    parameters_finite = weight_finite and _finite_bias(bias)
    if not parameters_finite:
        _local.activations_finite = False  # NaN/Inf enter this forward's activations here
    if relu or use_winograd:
        finite = parameters_finite and (getattr(_local, "activations_finite", False) or all_finite(x, residual))
        if not finite:
            return reference.conv2d_act(x, weight, bias, stride, padding, dilation, groups, residual, relu)
    bias = None if bias is None else bias.detach()
    if use_winograd:
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
        return winograd.conv3x3(x, packed, None if bias is None else bias.contiguous(), residual, relu)
    if residual is None:
        return _mkldnn._convolution_pointwise(
            x, packed, bias, list(padding), list(stride), list(dilation), groups,
            "relu" if relu else "none", [], "")
    geometry = (bias, list(padding), list(stride), list(dilation), groups, "add", None, "relu" if relu else None,
                [], "")
    if _reusable(residual, x):  # the in-place form takes the residual first, then x
        return _mkldnn._convolution_pointwise_.binary(residual, x, packed, *geometry)
    return _mkldnn._convolution_pointwise.binary(x, residual.contiguous(memory_format=torch.channels_last),
                                                 packed, *geometry)


def _joined_weight(w3, wd):
    """[w3 | wd] along the input channels, kept while both tensors and their versions stay the same
    (they are folded weights, the same tensors every call), so its packed form is cached too."""
    known = _joined.get(w3)
    if known is not None:
        wd_ref, versions, joined = known
        if wd_ref() is wd and versions == (w3._version, wd._version):
            return joined
    with torch.inference_mode(False):  # a normal tensor, whose version the packing cache can key on
        joined = torch.cat([w3.detach(), wd.detach()], dim=1)
    _joined[w3] = (weakref.ref(wd), (w3._version, wd._version), joined)
    return joined


def unsupported(x, weight, stride, padding, dilation, residual):
    """None, or why this torch's oneDNN cannot run the call. torch 2.11's fused binary convolution
    fails ("could not create a memory") for a residual add whose output is 1x1 spatial (fine on 2.14):
    probed once per process on a tiny such convolution, not guessed from the version."""
    if residual is None:
        return None
    out_h, out_w = conv_output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    if out_h * out_w == 1 and not _binary_1x1_works():
        return "not covered: this torch's oneDNN fails a fused residual add on a 1x1 output"
    return None


@functools.lru_cache(maxsize=None)
def _binary_1x1_works() -> bool:
    try:
        with torch.no_grad():
            x = torch.ones(1, 8, 1, 1).contiguous(memory_format=torch.channels_last)
            w = torch.ones(8, 8, 1, 1)
            packed = _mkldnn._reorder_convolution_weight(w, [0, 0], [1, 1], [1, 1], 1, [1, 8, 1, 1])
            y = _mkldnn._convolution_pointwise.binary(x, x.clone(), packed, None, [0, 0], [1, 1], [1, 1], 1, "add",
                                                      None, "relu", [], "")
        return bool(torch.all(y == 9))
    except RuntimeError:
        return False


def bottleneck_tail(h, w3, x, wd, bias, stride, relu):
    # conv3 and the projection shortcut as one 1x1 convolution over the concatenated input channels:
    # one output pass instead of writing the shortcut and reading it back as conv3's residual
    # (measured at ResNet-50's layer1, batch 8: 11 ms instead of 19 ms).
    # (applies() sent inference-mode weights elsewhere: both have version counters.)
    shortcut_input = x if tuple(stride) == (1, 1) else x[:, :, ::stride[0], ::stride[1]]
    joined_input = torch.cat([h, shortcut_input], dim=1).contiguous(memory_format=torch.channels_last)
    return conv2d_act(joined_input, _joined_weight(w3, wd), bias, (1, 1), (0, 0), (1, 1), 1, None, relu)
