"""Layout facts every layer asks about, written once: which memory format a tensor is in, an empty
tensor in the same format, and a convolution's output size. Imports only torch, so kernels, ops,
nn and models can all use it without an import cycle."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

__all__ = ["is_channels_last", "memory_format_of", "empty_in_format_of", "conv_output_size"]


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-d tensor dense in NHWC order and not also NCHW-contiguous (C == 1 or H == W == 1 is both:
    that counts as NCHW, the default)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def empty_in_format_of(like: torch.Tensor, shape: Sequence[int], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """torch.empty(shape) on like's device, in like's dtype (or dtype) and memory format."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format_of(like))


def conv_output_size(h, w, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int]) -> Tuple[int, int]:
    """(out_h, out_w) of a 2-d convolution (ints or SymInts; may be <= 0: the caller checks)."""
    out_h = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return out_h, out_w
