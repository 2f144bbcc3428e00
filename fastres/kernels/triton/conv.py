"""Implicit-GEMM conv2d with a fused epilogue: y = relu(conv(x, w) [+ conv1x1(x2[::s, ::s], w2)] + bias + residual).

GEMM view: M = N*P*Q output pixels, N = output channels of one group, K = R*S*C_group
input taps. Activations are addressed through their strides, so NCHW and channels_last
inputs both work without a copy (channels_last is the fast layout: the K loads are
contiguous). Weights are packed once, per weight tensor and version, into the [K_out,
R*S*C_group (+ C2)] row-major matrix the kernel streams (K index = (r*S + s)*C_group + c).

ONE flattened K loop runs over every step of the reduction, so the software pipeline never
drains at a filter tap:
- tap mode: step i -> (r, s) = divmod(i // CB, S), c0 = (i % CB) * BLOCK_K with CB =
  ceil(C_group / BLOCK_K) (BLOCK_K is chosen to divide C_group where it can);
- packed mode (the 7x7 stem, C=3, and other small/odd C_group): the K index itself is
  decoded per element, kk -> (r, s, c), so 147 real taps cost 160 MMA lanes instead of
  49 taps x 64 channels (an NHWC row over (s, c) is contiguous);
- the optional second operand (x2, w2), the projection shortcut of a Bottleneck, adds
  ceil(C2 / BLOCK_K) more steps of the same loop (concatenated K): conv3 and the shortcut
  cost one launch and one output write.
Programs are visited in grouped (swizzled) order, GROUP_M row tiles at a time, for L2 reuse.
Split-K (small M, e.g. batch-1 layer4) writes fp32 partials, and a second kernel sums them
in a fixed order and applies the epilogue: results stay bitwise repeatable. Accumulation is
fp32; offsets are int64 so tensors past 2**31 elements index correctly.

No @triton.autotune (it could fire during CUDA-graph capture): `configs()` lists a few
configurations per call for fastres's own tuner, and "" is the static heuristic.
"""
from __future__ import annotations

import dataclasses
import re
import weakref
from typing import List, Optional

import torch
import triton
from torch.utils.weak import WeakTensorKeyDictionary
import triton.language as tl

from .batch_norm import _chan_merge

HOPPER_SMS = 132

try:  # host-side TMA descriptors (triton >= 3.4); older triton streams the weight with pointer loads
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover - triton < 3.4
    _TensorDescriptor = None
_TMA = True  # tests flip it to check both weight paths


@triton.jit
def _epilogue(acc, offs_m, m_mask, offs_n, n_mask, bias_ptr, res_ptr, y_ptr, P, Q,
              srn, src, srh, srw, syn, syc, syh, syw, cnt_ptr, smean_ptr, sm2_ptr, tile_m, k_total,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr):
    n_idx = (offs_m // (P * Q)).to(tl.int64)
    pq = offs_m % (P * Q)
    oh64 = (pq // Q).to(tl.int64)
    ow64 = (pq % Q).to(tl.int64)
    ch64 = offs_n.to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        r_off = (n_idx * srn + oh64 * srh + ow64 * srw)[:, None] + ch64[None, :] * src
        acc += tl.load(res_ptr + r_off, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # not maximum(): it drops NaN on the GPU, torch.relu keeps it
    y_off = (n_idx * syn + oh64 * syh + ow64 * syw)[:, None] + ch64[None, :] * syc
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + y_off, out, mask=out_mask)
    if STATS:
        # This tile's (count, mean, M2) per output channel, of the values as stored (BatchNorm reads
        # y); merged across tiles in a fixed order by norm_stats_merge_kernel (Chan).
        v = out.to(tl.float32)
        n_b = tl.sum(m_mask.to(tl.float32), axis=0)
        mean_b = tl.sum(tl.where(out_mask, v, 0.0), axis=0) / tl.maximum(n_b, 1.0)
        dev = tl.where(out_mask, v - mean_b[None, :], 0.0)
        s_off = tile_m.to(tl.int64) * k_total + ch64
        tl.store(cnt_ptr + s_off, tl.zeros_like(mean_b) + n_b, mask=n_mask)
        tl.store(smean_ptr + s_off, mean_b, mask=n_mask)
        tl.store(sm2_ptr + s_off, tl.sum(dev * dev, axis=0), mask=n_mask)


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP_M row tiles sweep all column tiles
    before the next rows (L2 reuse of the column operand)."""
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % rows, (pid % in_group) // rows


@triton.jit
def decode_tap(kk, S, C_group):
    """(r, s, c) of packed K indices kk = (r * S + s) * C_group + c (the weight's packed column order)."""
    r = kk // (S * C_group)
    rem = kk - r * (S * C_group)
    s = rem // C_group
    return r, s, rem - s * C_group


@triton.jit
def normalise(a, a_mask, ch, ch_ok, scale_ptr, shift_ptr, RELU: tl.constexpr):
    """NormConv's prologue: relu?(a * scale[ch] + shift[ch]) of a raw [rows, channels] input tile as it is
    loaded (fp32 math, back to a's dtype). Padded taps and tails are masked again afterwards: zero padding
    is of the normalised input, not of the raw one."""
    sc = tl.load(scale_ptr + ch, mask=ch_ok, other=0.0)
    sh = tl.load(shift_ptr + ch, mask=ch_ok, other=0.0)
    af = a.to(tl.float32) * sc[None, :] + sh[None, :]
    if RELU:
        af = tl.where(af < 0, 0.0, af)  # keeps NaN, as torch.relu
    return tl.where(a_mask, af, 0.0).to(a.dtype)


@triton.jit
def conv2d_act_kernel(
    x_ptr, x_desc, w_ptr, w_desc, x2_ptr, bias_ptr, res_ptr, y_ptr, part_ptr,
    scale_ptr, shift_ptr, cnt_ptr, smean_ptr, sm2_ptr,
    N, C_group, H, W, K_group, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    C2, stride2_h, stride2_w,
    sxn, sxc, sxh, sxw, s2n, s2c, s2h, s2w, swk,
    srn, src, srh, srw, syn, syc, syh, syw,
    STEPS1, STEPS, STEPS_PER_SPLIT,
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    PROLOGUE: tl.constexpr, PROLOGUE_RELU: tl.constexpr, STATS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, PACKED: tl.constexpr, SPLIT_K: tl.constexpr,
    X_DESC: tl.constexpr, W_DESC: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    group = tl.program_id(2)
    M = N * P * Q
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K_group, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n_idx = (offs_m // (P * Q)).to(tl.int64)
    pq = offs_m % (P * Q)
    oh = pq // Q
    ow = pq % Q
    offs_n = group * K_group + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) < K_group
    offs_k = tl.arange(0, BLOCK_K)
    c_base = group * C_group
    w_rows = w_ptr + offs_n.to(tl.int64)[None, :] * swk
    x_pix = x_ptr + n_idx * sxn
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    reduction1 = R * S * C_group
    cb = tl.cdiv(C_group, BLOCK_K)
    if HAS_SECOND:
        x2_pix = x2_ptr + n_idx * s2n + (oh * stride2_h).to(tl.int64) * s2h + (ow * stride2_w).to(tl.int64) * s2w

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    step_lo = pid_k * STEPS_PER_SPLIT
    step_hi = tl.minimum(step_lo + STEPS_PER_SPLIT, STEPS)
    for i in range(step_lo, step_hi):
        if PACKED:
            kk = i * BLOCK_K + offs_k
            k_ok = kk < reduction1
            r, s, c = decode_tap(kk, S, C_group)
            ih = ih0[:, None] + (r * dil_h)[None, :]
            iw = iw0[:, None] + (s * dil_w)[None, :]
            a_mask = m_mask[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = (x_pix[:, None] + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
                      + (c_base + c).to(tl.int64)[None, :] * sxc)
            w_col = kk
            k0 = i * BLOCK_K
        else:
            rs = i // cb
            c = (i - rs * cb) * BLOCK_K + offs_k
            r = rs // S
            s = rs - r * S
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            c_ok = c < C_group
            k_ok = c_ok & (i < STEPS1)
            pixel_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_mask = pixel_ok[:, None] & k_ok[None, :]
            a_ptrs = (x_pix + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] + \
                (c_base + c).to(tl.int64)[None, :] * sxc
            w_col = rs * C_group + c
            k0 = rs * C_group + (i - rs * cb) * BLOCK_K
            if HAS_SECOND:
                # Steps past STEPS1 are the shortcut's 1x1 GEMM over x2's strided pixels.
                second = i >= STEPS1
                c2 = (i - STEPS1) * BLOCK_K + offs_k
                k2_ok = (c2 < C2) & second
                a_ptrs = tl.where(second, x2_pix[:, None] + c2.to(tl.int64)[None, :] * s2c, a_ptrs)
                a_mask = tl.where(second, m_mask[:, None] & k2_ok[None, :], a_mask)
                w_col = tl.where(second, reduction1 + c2, w_col)
                k0 = tl.where(second, reduction1 + (i - STEPS1) * BLOCK_K, k0)
                k_ok = k_ok | k2_ok
        if X_DESC:
            # TMA: a 1x1 stride-1 conv over channels_last x is a plain GEMM over the [N*H*W, C] matrix.
            a = x_desc.load([pid_m * BLOCK_M, i * BLOCK_K])
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if PROLOGUE:
            a = normalise(a, a_mask, c_base + c, k_ok, scale_ptr, shift_ptr, PROLOGUE_RELU)
        if W_DESC:
            # TMA: the packed weight's [BLOCK_N, BLOCK_K] box (zero past its edges; BLOCK_K divides each
            # operand's channels, so a box never straddles two taps).
            b = w_desc.load([group * K_group + pid_n * BLOCK_N, k0]).T
        else:
            b = tl.load(w_rows + w_col.to(tl.int64)[:, None], mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(a, b, input_precision=PRECISION)

    k_total = K_group * tl.num_programs(2)
    if SPLIT_K == 1:
        _epilogue(acc, offs_m, m_mask, offs_n, n_mask, bias_ptr, res_ptr, y_ptr, P, Q,
                  srn, src, srh, srw, syn, syc, syh, syw, cnt_ptr, smean_ptr, sm2_ptr, pid_m, k_total,
                  HAS_BIAS, HAS_RESIDUAL, RELU, STATS)
    else:
        # fp32 partials [SPLIT_K, M, K_total], summed in a fixed order by splitk_reduce_kernel.
        p_off = (pid_k * M + offs_m).to(tl.int64)[:, None] * k_total + offs_n.to(tl.int64)[None, :]
        tl.store(part_ptr + p_off, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def splitk_reduce_kernel(part_ptr, bias_ptr, res_ptr, y_ptr, M, K_total, P, Q,
                         srn, src, srh, srw, syn, syc, syh, syw, cnt_ptr, smean_ptr, sm2_ptr,
                         SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         RELU: tl.constexpr, STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum the split-K partials in split order (deterministic) and apply the conv's epilogue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < K_total
    mask = m_mask[:, None] & n_mask[None, :]
    off = offs_m.to(tl.int64)[:, None] * K_total + offs_n.to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(SPLIT_K):  # not unrolled: 16 fp32 tiles in flight spilled (fp32 sm_90 audit)
        acc += tl.load(part_ptr + split * M.to(tl.int64) * K_total + off, mask=mask, other=0.0)
    _epilogue(acc, offs_m, m_mask, offs_n, n_mask, bias_ptr, res_ptr, y_ptr, P, Q,
              srn, src, srh, srw, syn, syc, syh, syw, cnt_ptr, smean_ptr, sm2_ptr, tl.program_id(0), K_total,
              HAS_BIAS, HAS_RESIDUAL, RELU, STATS)


@triton.jit
def norm_stats_merge_kernel(cnt_ptr, pmean_ptr, pm2_ptr, tiles, C, mean_ptr, var_ptr, BLOCK_C: tl.constexpr):
    """Merge the conv epilogue's per-tile (count, mean, M2) in tile order (deterministic): the batch
    mean and biased variance per channel."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile in range(0, tiles):
        off = tile * C + cols
        count, mean, m2 = _chan_merge(count, mean, m2, tl.load(cnt_ptr + off, mask=c_ok, other=0.0),
                                      tl.load(pmean_ptr + off, mask=c_ok, other=0.0),
                                      tl.load(pm2_ptr + off, mask=c_ok, other=0.0))
    tl.store(mean_ptr + cols, mean, mask=c_ok)
    tl.store(var_ptr + cols, m2 / tl.maximum(count, 1.0), mask=c_ok)


# ------------------------------------------------------------------ configurations

@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    group_m: int = 8

    def __str__(self) -> str:
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}"
                f"x{self.split_k}g{self.group_m}")

    @classmethod
    def parse(cls, text: str) -> "Config":
        match = re.fullmatch(r"m(\d+)n(\d+)k(\d+)w(\d+)s(\d+)x(\d+)g(\d+)", text)
        if match is None:
            raise ValueError(f"config: expected a string like 'm128n64k64w4s3x1g8', got {text!r}")
        return cls(*map(int, match.groups()))


@dataclasses.dataclass(frozen=True)
class Problem:
    """The GEMM a conv call is: sizes only (what tiles and configs depend on)."""
    m: int
    k_group: int
    groups: int
    c_group: int
    taps: int  # R*S
    c2: int  # the second operand's channels (0: none)
    element_size: int
    prologue: bool = False  # the previous BN's scale/shift (+ ReLU) applied to every loaded x tile

    @property
    def packed(self) -> bool:
        # Decode (r, s, c) per element when channel blocks would waste most of the MMA's K:
        # the stem (C=3) and narrow grouped convs. A 1x1 conv never needs it.
        return self.taps > 1 and self.c2 == 0 and (self.c_group < 16 or self.c_group % 16 != 0)

    def block_k_for(self, wanted: int) -> int:
        """BLOCK_K <= wanted that divides C_group where possible (no masked tail per tap)."""
        if self.packed:
            return min(wanted, 32)
        for bk in (wanted, wanted // 2, wanted // 4):
            if bk >= 16 and self.c_group % bk == 0 and (self.c2 == 0 or self.c2 % bk == 0):
                return bk
        return max(16, min(wanted, triton.next_power_of_2(self.c_group)))

    def steps(self, block_k: int) -> tuple:
        """(steps of the first operand, all steps)."""
        if self.packed:
            first = triton.cdiv(self.taps * self.c_group, block_k)
        else:
            first = self.taps * triton.cdiv(self.c_group, block_k)
        return first, first + (triton.cdiv(self.c2, block_k) if self.c2 else 0)

    def tiles(self, cfg: Config) -> int:
        return triton.cdiv(self.m, cfg.block_m) * triton.cdiv(self.k_group, cfg.block_n) * self.groups

    def split_for(self, cfg: Config) -> int:
        """Split K when the grid would leave most of the SMs idle, keeping >= 4 steps per split."""
        tiles, steps = self.tiles(cfg), self.steps(cfg.block_k)[1]
        if tiles * 2 > HOPPER_SMS or steps < 8:
            return 1
        return max(1, min(HOPPER_SMS // tiles, steps // 4, 16))


def _interpret_config(problem: Problem) -> Config:
    # The CPU interpreter costs milliseconds per program and step: big tiles, few programs.
    return Config(128, 256, problem.block_k_for(128), 4, 1, 1, 8)


def pick_config(problem: Problem, interpret: bool) -> Config:
    """The static heuristic (config ""): 128 x 64 / 64 x 128 tiles for the large GEMMs, 64-wide ones
    for narrow/late layers; fp32 halves the K step to stay within shared memory; split-K when the grid
    is small. 4 warps everywhere: a flattened-loop conv miscompiled at num_warps >= 8 (pytorch 173068)."""
    if interpret:
        return _interpret_config(problem)
    block_n = 128 if problem.k_group >= 128 else 64 if problem.k_group >= 64 else 32
    # 128 x 128 at 4 warps holds a 128-register accumulator per thread and spills with the epilogue
    # (sm_90 audit): the large GEMMs take 128 x 64 (or 64 x 128), 4 stages.
    # With the NormConv prologue (x tile transformed in registers) 128 x 64 at 4 warps spills on
    # triton 3.6 (255 registers, sm_90 audit): 64-row tiles there.
    block_m = 128 if problem.m >= 8192 and block_n <= 64 and not problem.prologue else 64
    block_k = problem.block_k_for(64 if problem.element_size <= 2 else 32)
    cfg = Config(block_m, block_n, block_k, 4, 3 if block_m * block_n < 8192 else 4, 1, 8)
    return dataclasses.replace(cfg, split_k=problem.split_for(cfg))


def configs_for_problem(problem: Problem, interpret: bool) -> List[str]:
    """A short list (<= 8) of configurations worth measuring for this call; the first is the heuristic."""
    base = pick_config(problem, interpret)
    out = [base]
    if interpret:
        # Small tiles and a forced split so the tests exercise every code path cheaply.
        bk = problem.block_k_for(16)
        out += [Config(32, 32, bk, 4, 1, 1, 4), Config(64, 32, bk, 4, 1, min(3, problem.steps(bk)[1]), 1)]
    else:
        wide = 64 if problem.element_size <= 2 else 32
        # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). 128 x 128 tiles spill at 4 warps (sm_90 audit); at
        # 8 warps (two warpgroups sharing the tile, the Hopper GEMM shape) they fit (<= 177 registers,
        # with the prologue and statistics too) and are candidates for the large 16-bit GEMMs. 128 x 256
        # at 8 warps spills with the residual epilogue (255 registers + 384 bytes, triton 3.8): left out.
        # A flattened-loop conv once miscompiled at num_warps >= 8 (pytorch 173068): auto checks every
        # candidate against the float64 reference before it may win, so a miscompiled one is rejected,
        # never used. On the H200 (2026-12-04) every 4-warp tile was 1.5-3x slower than cuDNN at batch
        # 256 (benchmarks/results/gpu-check-runs.md).
        shapes = [(128, 64, wide, 4, 4), (64, 128, wide, 4, 4), (64, 64, wide, 5, 4),
                  (128, 64, 32 if wide == 64 else 16, 3, 4), (64, 32, wide, 5, 4)]
        if problem.element_size <= 2 and problem.m >= 8192 and problem.k_group >= 128:
            shapes.append((128, 128, 64, 3, 8))
        if problem.prologue:  # 128 x 64 x 64 spills with the prologue (triton 3.6, sm_90 audit)
            shapes = [t for t in shapes if t[:3] != (128, 64, 64)]
        for bm, bn, bk, stages, warps in shapes:
            cfg = Config(bm, min(bn, max(32, triton.next_power_of_2(problem.k_group))),
                         problem.block_k_for(bk), warps, stages, 1, 8)
            out.append(dataclasses.replace(cfg, split_k=problem.split_for(cfg)))
    unique = list(dict.fromkeys(out))[:8]
    return [""] + [str(c) for c in unique[1:]]


def problem_of(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
               second_channels: int = 0, prologue: bool = False) -> Problem:
    n, c, h, w = x.shape
    k, c_group, r, s = weight.shape
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return Problem(n * p * q, k // groups, groups, c_group, r * s, second_channels, x.element_size(), prologue)


def configs(x: torch.Tensor, weight: torch.Tensor, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
            second_channels: int = 0, prologue: bool = False) -> List[str]:
    """Config strings for one conv call ("" = the static heuristic); `second_channels` = the bottleneck
    tail's shortcut input channels; `prologue`: a NormConv call with the previous BN's scale/shift."""
    return configs_for_problem(problem_of(x, weight, stride, padding, dilation, groups, second_channels, prologue),
                               x.device.type == "cpu")


# ------------------------------------------------------------------ packed weights

_packed = WeakTensorKeyDictionary()  # keyed on tensor identity (a plain WeakKeyDictionary compares values)
_MAX_PER_WEIGHT = 4


def _pack(weight: torch.Tensor, second: Optional[torch.Tensor], dtype) -> torch.Tensor:
    k = weight.shape[0]
    parts = [weight.detach().permute(0, 2, 3, 1).reshape(k, -1)]
    if second is not None:
        parts.append(second.detach().reshape(k, -1))
    cols = sum(p.shape[1] for p in parts)
    padded = triton.cdiv(cols, 16) * 16  # 16-element rows: every row starts 16-byte aligned (cp.async/TMA)
    packed = torch.zeros(k, padded, device=weight.device, dtype=dtype)
    packed[:, :cols].copy_(torch.cat(parts, 1))
    return packed


def packed_weight(weight: torch.Tensor, second: Optional[torch.Tensor] = None,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """[K, R*S*C_group (+ C2)] row-major in `dtype`, cached weakly per weight tensor and its _version
    (and the second weight's identity and version), so a refold or in-place edit repacks."""
    dtype = dtype or weight.dtype
    if weight.is_inference() or (second is not None and second.is_inference()) or weight.device.type == "meta":
        return _pack(weight, second, dtype)  # no version counter to key on
    key = (weight._version, dtype, weight.device, None if second is None else (id(second), second._version))
    per_weight = _packed.get(weight)
    if per_weight is None:
        per_weight = _packed[weight] = {}
    hit = per_weight.get(key)
    if hit is not None and (second is None or hit[1]() is second):
        return hit[0]
    if len(per_weight) >= _MAX_PER_WEIGHT:
        per_weight.pop(next(iter(per_weight)))
    packed = _pack(weight, second, dtype)
    per_weight[key] = (packed, None if second is None else weakref.ref(second))
    return packed


# ------------------------------------------------------------------ launch plan

_REDUCE_BLOCK = 64  # rows per split-K reduce program (and per statistics tile after a split-K conv)

@dataclasses.dataclass
class Launch:
    """One kernel launch: what conv2d_act runs and what the audit compiles."""
    kernel: object
    grid: tuple
    args: list
    constexprs: dict
    num_warps: int
    num_stages: int
    mma_issued: int = 0
    mma_useful: int = 0


def precision(dtype, interpret: bool) -> str:
    """tl.dot's input precision: fp32 follows torch's TF32 switch for convolutions, so "exact fp32" means
    the same thing here as in cuDNN."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpret else "ieee"


def run(launches) -> None:
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.constexprs, num_warps=launch.num_warps,
                                   num_stages=launch.num_stages)


def _output_like(x: torch.Tensor, shape, dtype) -> torch.Tensor:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(shape, device=x.device, dtype=dtype,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def plan(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
         groups: int, residual: Optional[torch.Tensor], relu: bool, *, second: Optional[tuple] = None,
         config: str = "", prologue: Optional[tuple] = None, stats: bool = False) -> tuple:
    """(y, [Launch]) for one call (arguments already checked); works on meta tensors too.

    NormConv (training): `prologue` = (scale, shift, relu) convolves relu?(x * scale[c] + shift[c])
    instead of x (fp32 per input channel); `stats` makes the output (y, mean, var): y's per-channel
    batch mean and biased variance in fp32, from per-tile partials written by the epilogue and
    merged in a fixed order. Neither goes with bias, residual, ReLU or a second operand."""
    if (prologue is not None or stats) and (bias is not None or residual is not None or relu or second is not None):
        raise ValueError("a prologue or statistics conv takes no bias, residual, ReLU or second operand")
    n, c, h, w = x.shape
    k, c_group, r, s = weight.shape
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    y = _output_like(x, (n, k, p, q), x.dtype)
    if y.numel() == 0:
        if stats:
            raise ValueError("statistics of an empty output")
        return y, []
    interpret = x.device.type == "cpu"
    problem = problem_of(x, weight, stride, padding, dilation, groups, second[0].shape[1] if second else 0,
                         prologue is not None)
    cfg = Config.parse(config) if config else pick_config(problem, interpret)
    if problem.packed and cfg.block_k > 32:
        cfg = dataclasses.replace(cfg, block_k=32)
    stage_bytes = (cfg.block_m + cfg.block_n) * cfg.block_k * x.element_size()
    while cfg.num_stages > 2 and cfg.num_stages * stage_bytes > 200_000:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)  # a 16-bit config asked of fp32: fit smem
    steps1, steps = problem.steps(cfg.block_k)
    split = max(1, min(cfg.split_k, steps))
    per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, per_split)  # no empty split
    if second is not None:
        x2, w2, stride2 = second
        c2, x2_strides = x2.shape[1], x2.stride()
    else:
        x2, w2, stride2, c2, x2_strides = x, None, (1, 1), 0, (0, 0, 0, 0)
    wp = packed_weight(weight, w2, x.dtype)
    use_desc = _TensorDescriptor is not None and _TMA and wp.data_ptr() % 16 == 0 and (
        problem.packed or (c_group % cfg.block_k == 0 and c2 % cfg.block_k == 0))
    x_as_matrix = (r == 1 and s == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and groups == 1
                   and second is None and x.stride(1) == 1 and x.stride(3) == c and x.stride(2) == w * c
                   and x.stride(0) == h * w * c and (c * x.element_size()) % 16 == 0
                   and x.data_ptr() % 16 == 0)
    use_x_desc = _TensorDescriptor is not None and _TMA and x_as_matrix
    x_desc = (_TensorDescriptor(x, [n * h * w, c], [c, 1], [cfg.block_m, cfg.block_k]) if use_x_desc else x)
    w_desc = _TensorDescriptor(wp, list(wp.shape), list(wp.stride()), [cfg.block_n, cfg.block_k]) if use_desc else wp
    res = residual if residual is not None else y
    m = n * p * q
    part = torch.empty((split, m, k), device=x.device, dtype=torch.float32) if split > 1 else y
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu)
    bias_arg = bias if bias is not None else wp
    tiles = problem.tiles(cfg)
    scale, shift, prologue_relu = prologue if prologue is not None else (wp, wp, False)
    stat_tiles = triton.cdiv(m, cfg.block_m if split == 1 else _REDUCE_BLOCK)
    f32 = dict(device=x.device, dtype=torch.float32)
    partials = [torch.empty((stat_tiles, k), **f32) for _ in range(3)] if stats else [wp, wp, wp]
    launches = [Launch(
        conv2d_act_kernel, (tiles // groups, split, groups),
        [x, x_desc, wp, w_desc, x2, bias_arg, res, y, part, scale, shift, *partials,
         n, c_group, h, w, k // groups, p, q, r, s,
         stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
         c2, stride2[0], stride2[1],
         *x.stride(), *x2_strides, wp.stride(0), *res.stride(), *y.stride(),
         steps1, steps, per_split],
        dict(HAS_SECOND=second is not None, **flags, PROLOGUE=prologue is not None,
             PROLOGUE_RELU=bool(prologue_relu), STATS=stats and split == 1,
             # The interpreter's bf16 dot is wrong (docs/design.md, "Measured facts"): accumulate from fp32
             # operands there.
             UPCAST=interpret,
             PRECISION=precision(x.dtype, interpret),
             PACKED=problem.packed, SPLIT_K=split, X_DESC=use_x_desc, W_DESC=use_desc, GROUP_M=cfg.group_m,
             BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k),
        cfg.num_warps, cfg.num_stages,
        mma_issued=tiles * cfg.block_m * cfg.block_n * steps * cfg.block_k,
        mma_useful=m * k * (c_group * r * s + c2))]
    if split > 1:
        rb_m, rb_n = _REDUCE_BLOCK, 64
        launches.append(Launch(
            splitk_reduce_kernel, (triton.cdiv(m, rb_m), triton.cdiv(k, rb_n), 1),
            [part, bias_arg, res, y, m, k, p, q, *res.stride(), *y.stride(), *partials],
            dict(SPLIT_K=split, **flags, STATS=stats, BLOCK_M=rb_m, BLOCK_N=rb_n), 4, 1))
    if not stats:
        return y, launches
    mean, var = torch.empty(k, **f32), torch.empty(k, **f32)
    launches.append(Launch(norm_stats_merge_kernel, (triton.cdiv(k, 64),), [*partials, stat_tiles, k, mean, var],
                           dict(BLOCK_C=64), 4, 1))
    return (y, mean, var), launches


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
               groups: int, residual: Optional[torch.Tensor], relu: bool, *,
               second: Optional[tuple] = None, config: str = "", prologue: Optional[tuple] = None,
               stats: bool = False):
    """Launch the kernel(s). `second` = (x2, w2, (stride_h, stride_w)): a 1x1 strided conv accumulated
    into the same output (the Bottleneck projection shortcut). `config`: one of configs(...), "" = heuristic.
    `prologue`, `stats`: NormConv's input normalisation and output statistics (see plan); with stats the
    result is (y, mean, var)."""
    out, launches = plan(x, weight, bias, stride, padding, dilation, groups, residual, relu, second=second,
                         config=config, prologue=prologue, stats=stats)
    run(launches)
    return out
