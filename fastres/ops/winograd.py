"""CPU inference: 3x3 stride-1 convolutions by Winograd F(MxM, 3x3) (the operator is
csrc/cpu/winograd.cpp, its kernel csrc/cpu/winograd_kernel.h).

oneDNN's direct convolution runs near the CPU's fp32 peak with AVX-512 (and below it with AVX2), so
the 3x3 convolutions (most of a ResNet's FLOPs after the 1x1s) get faster only with fewer multiplies:
- F(4x4, 3x3), 4x fewer, where the image is a whole number of 4x4 tiles (ResNet-50's 56x56 and
  28x28 stages; timings in benchmarks/results/cpu-winograd.md). Its rounding error is ~20x the
  direct sum's, still ~5e-6 relative at 256 input channels;
- F(2x2, 3x3), 2.25x fewer, elsewhere: only additions in its transforms, so results stay within
  a few ulps of the direct sum (tests/test_winograd.py bounds both errors).
Used by the CPU fast path (onednn.py) for channels_last float32 inference on x86-64 CPUs with
AVX-512 or AVX2 + FMA: the kernel is compiled for both, and runs on the instruction set torch's own
CPU kernels use (`torch.backends.cpu.get_cpu_capability()`, which ATEN_CPU_CAPABILITY=avx2 lowers).
FASTRES_WINOGRAD=0 turns it off; FASTRES_WINOGRAD=2 keeps F(2x2, 3x3) only (direct-sum accuracy).

Transformed weights U = G w G^T are packed once per weight version as
((M+2)^2 transform points, Cout/32 panels, Cin, 32): per input channel the GEMM kernel reads a
panel row of 32 floats as two AVX-512 vectors, or in two passes of two AVX2 vectors.
"""
from __future__ import annotations

import functools
import os

import torch

PANEL = 32  # output channels per packed panel (kPanel in csrc/cpu/winograd.h)
# Below this many 2x2 tiles per thread oneDNN's direct convolution wins (see `applies`), per
# instruction set: oneDNN's direct AVX2 convolution is further from the machine's peak than its
# AVX-512 one, so Winograd pays off sooner there.
MIN_TILES_PER_THREAD = {"avx512": 96, "avx2": 32}
# G of F(MxM, 3x3) for the output tile sizes M the kernel has (csrc/cpu/winograd.h has B^T, A^T)
_G = {
    2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    4: ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0)),
}
_available = None


def _cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


@functools.lru_cache(maxsize=None)
def supported_isas() -> tuple:
    """The kernel's instruction sets this CPU runs, widest first, as torch sees the CPU:
    ("avx512", "avx2"), ("avx2",) or () (not x86-64, or fastres._C not built)."""
    try:
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("fastres::conv3x3_winograd", "CPU")
    except RuntimeError:  # fastres._C not loaded: the operator does not exist
        has_kernel = False
    capability = _cpu_capability()
    if not has_kernel:
        return ()
    if capability.startswith("AVX512"):
        return ("avx512", "avx2")
    return ("avx2",) if capability == "AVX2" else ()


def isa() -> str:
    """The instruction set the fast path runs the kernel on: the widest of supported_isas()."""
    isas = supported_isas()
    if not isas:
        raise RuntimeError("fastres Winograd: no instruction set of the kernel (AVX-512, AVX2 + FMA) is usable "
                           f"here (torch's CPU capability: {_cpu_capability() or 'unknown'}, "
                           "or fastres._C is not built)")
    return isas[0]


def available() -> bool:
    """fastres._C has the kernel, this CPU runs one of its instruction sets and nobody turned it off."""
    global _available
    if _available is None:
        _available = bool(supported_isas()) and os.environ.get("FASTRES_WINOGRAD") != "0"
    return _available


def covers(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups, tile: int = 2) -> bool:
    """A 3x3, stride 1, padding 1 convolution the kernel computes (x already checked channels_last fp32);
    F(4x4) also needs H and W to be multiples of 4 (whole tiles) and FASTRES_WINOGRAD != "2"."""
    if not (tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(padding) == (1, 1)
            and tuple(dilation) == (1, 1) and groups == 1 and x.shape[1] % 16 == 0
            and weight.shape[0] % PANEL == 0 and available()):
        return False
    return tile == 2 or tile_size(x) == 4


def enough_tiles(x: torch.Tensor) -> bool:
    """The static rule (used where auto does not measure): enough 2x2 tiles per thread to pay for
    reading the transformed weights (16/9 of the weights' size) from memory. The thresholds were
    measured in ResNet-50 at batch 8 on 2 cores (benchmarks/results/cpu-resnet50-bs8.md)."""
    n, _, h, w = x.shape
    return n * ((h + 1) // 2) * ((w + 1) // 2) >= MIN_TILES_PER_THREAD[isa()] * torch.get_num_threads()


def applies(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups) -> bool:
    """covers() and enough_tiles(): the static rule for taking Winograd."""
    return covers(x, weight, stride, padding, dilation, groups) and enough_tiles(x)


def tile_size(x: torch.Tensor) -> int:
    """The output tile M for x: 4 where the image is whole 4x4 tiles (no wasted work), else 2."""
    _, _, h, w = x.shape
    return 4 if h % 4 == 0 and w % 4 == 0 and os.environ.get("FASTRES_WINOGRAD") != "2" else 2


def pack_weight(weight: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """(Cout, Cin, 3, 3) -> U = G w G^T of F(tile x tile, 3x3), packed as ((tile+2)^2, Cout/32, Cin, 32)
    float32 (computed in float64)."""
    cout, cin = weight.shape[:2]
    g = torch.tensor(_G[tile], dtype=torch.float64, device=weight.device)
    u = torch.einsum("ak,oikl,bl->aboi", g, weight.detach().double(), g)
    return u.reshape(len(g) ** 2, cout // PANEL, PANEL, cin).transpose(2, 3).contiguous().float()


def conv3x3(x, packed_weight, bias, residual, relu, isa_name=None):
    """relu(conv3x3(x) + bias + residual) with operands checked finite by the caller, on `isa_name`
    (default: isa())."""
    return torch.ops.fastres.conv3x3_winograd(x, packed_weight, bias, residual, relu, isa_name or isa())
