"""Argument checks shared by the public ops: clear errors instead of crashes or wrong numbers."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..layout import conv_output_size

IntPair = Union[int, Sequence[int]]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(value: object, name: str, *, ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64); got {value.dtype}")
    return value


def _autocast_enabled(device_type: str) -> bool:
    # Under autocast the convolution casts its operands itself, so mixed dtypes are fine.
    return torch.is_autocast_enabled(device_type)


def same_place(value: torch.Tensor, name: str, like: torch.Tensor, like_name: str, *, dtype: bool = True) -> None:
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but {like_name} is on {like.device}; expected the same device")
    if dtype and value.dtype != like.dtype and not _autocast_enabled(like.device.type):
        raise TypeError(f"{name} has dtype {value.dtype} but {like_name} has {like.dtype}; expected the same dtype")


def per_channel(value: object, name: str, channels: int, like: torch.Tensor, like_name: str) -> Optional[torch.Tensor]:
    """An optional 1-D tensor with one value per channel (bias, BN parameters and buffers)."""
    if value is None:
        return None
    tensor(value, name, ndim=1)
    if value.numel() != channels:
        raise ValueError(f"{name} must have {channels} elements (one per channel); got {value.numel()}")
    same_place(value, name, like, like_name, dtype=False)
    return value


def pair(value: IntPair, name: str, *, minimum: int) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints; got a bool")
    if isinstance(value, int):
        value = (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints; got {type(value).__name__}") from None
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints; got {value!r}")
    if min(items) < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return items  # type: ignore[return-value]


def flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def residual(value: object, expected_shape: Sequence[int], like: torch.Tensor) -> Optional[torch.Tensor]:
    if value is None:
        return None
    tensor(value, "residual")
    if tuple(value.shape) != tuple(expected_shape):
        raise ValueError(f"residual must have the output's shape {tuple(expected_shape)}; got {tuple(value.shape)}")
    same_place(value, "residual", like, "x")
    return value


def conv_args(x: object, weight: object, stride, padding, dilation, groups) -> tuple:
    """The checks every convolution op makes: x and weight 4-d tensors on one device with one dtype,
    the geometry as int pairs, channels consistent with groups. Returns (stride, padding, dilation)."""
    tensor(x, "x", ndim=4)
    tensor(weight, "weight", ndim=4)
    same_place(weight, "weight", x, "x")
    stride = pair(stride, "stride", minimum=1)
    padding = pair(padding, "padding", minimum=0)
    dilation = pair(dilation, "dilation", minimum=1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int; got {groups!r}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {weight.shape[1]} x groups={groups} = "
                         f"{weight.shape[1] * groups}")
    if weight.shape[0] % groups:
        raise ValueError(f"weight's {weight.shape[0]} output channels are not divisible by groups={groups}")
    return stride, padding, dilation


def batch_norm_args(running_mean, running_var, momentum, eps) -> None:
    """The BatchNorm arguments every training op takes: running buffers as a pair, momentum in [0, 1],
    eps >= 0 (the buffers' shapes are checked by per_channel)."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    if (momentum is None or isinstance(momentum, bool) or not isinstance(momentum, (int, float))
            or not 0 <= momentum <= 1):
        raise ValueError(f"momentum must be a number in [0, 1] (the module turns momentum=None into 1/num_batches); "
                         f"got {momentum!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps must be a non-negative number; got {eps!r}")


def conv_output_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple[int, int, int, int]:
    n, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    out_h, out_w = conv_output_size(h, w, (kh, kw), stride, padding, dilation)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"x of spatial size {h}x{w} is too small for a {kh}x{kw} kernel with stride {stride}, "
            f"padding {padding} and dilation {dilation}"
        )
    return n, weight.shape[0], out_h, out_w


def model_input(x: object, first_conv: object) -> torch.Tensor:
    """A network's input against its first convolution: errors that name the input, not an inner layer.
    Returns x, so that a traced graph (the models make this an FX leaf) keeps the check in its data path."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"the model input must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"the model input must be 4-D (N, C, H, W); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"the model input must have a floating dtype; got {x.dtype}")
    weight = getattr(first_conv, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        return x  # a replaced stem: it checks its own input
    expected = weight.shape[1] * getattr(first_conv, "groups", 1)
    if x.shape[1] != expected:
        raise ValueError(f"the model input has {x.shape[1]} channels but the model's first conv expects {expected}")
    if x.device != weight.device:
        raise ValueError(f"the model input is on {x.device} but the model's parameters are on {weight.device}; "
                         f"expected the same device")
    if x.dtype != weight.dtype and not _autocast_enabled(x.device.type):
        raise TypeError(f"the model input has dtype {x.dtype} but the model's parameters have {weight.dtype}; "
                        f"convert one of them (for example model.to(x.dtype))")
    return x
