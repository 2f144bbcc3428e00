"""NormConv backward: the weight and input gradients of y = conv2d(relu?(x * scale + shift)) from the RAW x.

Neither kernel reads a stored relu(bn(x)): the forward never wrote one.

- wgrad (conv2d_wgrad_kernel): dW[k, (r, s, c)] = sum over output pixels of g[pixel, k] *
  a[pixel at tap (r, s), c], with a = relu?(x * scale + shift) recomputed as each x tile is loaded (the
  forward's `normalise` prologue, padded taps masked to zero after the affine). GEMM view: M = K_group
  output channels, N = R*S*C_group filter columns, reduction over the N*P*Q output pixels. Columns are
  one tap x BLOCK_N channels (tap mode) or decoded per element (packed mode: the C=3 stem and narrow
  groups, as in the forward). Small weights have few tiles, so the pixel reduction is split over
  program_id(1): every split owns a fixed pixel range and writes fp32 partials that are summed in split
  order, so the result is bitwise repeatable (no atomics).
- dgrad (conv2d_dgrad_kernel): dA = the transposed conv of g with W. A stride-s conv is split into its
  s*s output phases (program_id(1)): the input pixels (h, w) with h % s, w % s fixed see the same
  filter taps, so every program loops over exactly the taps that reach its pixels (no masked-out MMA
  work; a 1x1 stride-2 conv's odd pixels run zero steps). Its epilogue is the prologue's backward,
  where dA is in registers: the x tile is reloaded, gz = dA where x * scale + shift > 0 (dReLU),
  dx = gz * scale, and per-tile partial sums of gz * x and gz per channel give d scale and d shift
  (summed over tiles in a fixed order).

fp32 accumulation; operands in the tensors' dtype (fp32 operands in the interpreter, whose 16-bit dot is
wrong). Covered: groups, padding, stride, dilation; dgrad needs stride 1 or dilation 1 (the phase split
assumes one of them), `covers()` says so and the caller runs torch's conv backward otherwise.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from .conv import HOPPER_SMS, Config, Launch, Problem, _output_like, decode_tap, grouped_tile, normalise, precision, run


@triton.jit
def conv2d_wgrad_kernel(
    g_ptr, x_ptr, scale_ptr, shift_ptr, dw_ptr,
    N, C_group, H, W, K_group, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, sdk, sdc, sdr, sds, split_stride,
    STEPS_PER_SPLIT,
    PROLOGUE: tl.constexpr, PROLOGUE_RELU: tl.constexpr, PACKED: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    split = tl.program_id(1)
    group = tl.program_id(2)
    columns = R * S * C_group
    if PACKED:
        num_n = tl.cdiv(columns, BLOCK_N)
    else:
        num_n = R * S * tl.cdiv(C_group, BLOCK_N)
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(K_group, BLOCK_M), num_n, GROUP_M)

    k_local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_ok = k_local < K_group
    k_ch = (group * K_group + k_local).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    if PACKED:
        col = pid_n * BLOCK_N + offs_n
        col_ok = col < columns
        r, s, c = decode_tap(col, S, C_group)
    else:
        cb = tl.cdiv(C_group, BLOCK_N)
        rs = pid_n // cb
        c = (pid_n - rs * cb) * BLOCK_N + offs_n
        col_ok = c < C_group
        r = rs // S + tl.zeros_like(c)
        s = rs % S + tl.zeros_like(c)
    ch = group * C_group + c
    ch_off = ch.to(tl.int64) * sxc
    M = N * P * Q

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    step_lo = split * STEPS_PER_SPLIT
    step_hi = tl.minimum(step_lo + STEPS_PER_SPLIT, tl.cdiv(M, BLOCK_K))
    for i in range(step_lo, step_hi):
        pix = i * BLOCK_K + tl.arange(0, BLOCK_K)
        pix_ok = pix < M
        n_idx = (pix // (P * Q)).to(tl.int64)
        pq = pix % (P * Q)
        oh = pq // Q
        ow = pq % Q
        # g^T tile [BLOCK_M channels, BLOCK_K pixels]
        g_off = k_ch[:, None] * sgc + (n_idx * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw)[None, :]
        gt = tl.load(g_ptr + g_off, mask=k_ok[:, None] & pix_ok[None, :], other=0.0)
        # input tile [BLOCK_K pixels, BLOCK_N columns] at each column's tap
        ih = (oh * stride_h - pad_h)[:, None] + (r * dil_h)[None, :]
        iw = (ow * stride_w - pad_w)[:, None] + (s * dil_w)[None, :]
        a_mask = pix_ok[:, None] & col_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_off = (n_idx * sxn)[:, None] + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw + ch_off[None, :]
        a = tl.load(x_ptr + a_off, mask=a_mask, other=0.0)
        if PROLOGUE:
            a = normalise(a, a_mask, ch, col_ok, scale_ptr, shift_ptr, PROLOGUE_RELU)
        if UPCAST:
            acc += tl.dot(gt.to(tl.float32), a.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(gt, a, input_precision=PRECISION)

    dw_off = (split.to(tl.int64) * split_stride + k_ch[:, None] * sdk + c.to(tl.int64)[None, :] * sdc
              + r.to(tl.int64)[None, :] * sdr + s.to(tl.int64)[None, :] * sds)
    tl.store(dw_ptr + dw_off, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


@triton.jit
def conv2d_dgrad_kernel(
    g_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, dx_ptr, pdot_ptr, psum_ptr,
    N, C_group, H, W, K_group, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HP, WP,
    sgn, sgc, sgh, sgw, swr, sws, swk, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    PROLOGUE: tl.constexpr, PROLOGUE_RELU: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    phase = tl.program_id(1)
    group = tl.program_id(2)
    M = N * HP * WP  # the pixels of one phase (h % stride_h, w % stride_w), rounded up to whole rows
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, tl.cdiv(C_group, BLOCK_N), GROUP_M)

    ph = phase // stride_w
    pw = phase % stride_w
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_idx = (offs_m // (HP * WP)).to(tl.int64)
    hw = offs_m % (HP * WP)
    h = ph + (hw // WP) * stride_h
    w = pw + (hw % WP) * stride_w
    m_ok = (offs_m < M) & (h < H) & (w < W)
    c_local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c_local < C_group
    ch = group * C_group + c_local
    offs_k = tl.arange(0, BLOCK_K)

    # The taps that reach this phase: r = r0 + t * stride_h (stride 1 or dilation 1, see covers()).
    r0 = (ph + pad_h) % stride_h
    s0 = (pw + pad_w) % stride_w
    taps_r = tl.maximum(tl.cdiv(R - r0, stride_h), 0)
    taps_s = tl.maximum(tl.cdiv(S - s0, stride_w), 0)
    kb = tl.cdiv(K_group, BLOCK_K)
    g_pix = g_ptr + n_idx * sgn
    w_cols = w_ptr + c_local.to(tl.int64)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, taps_r * taps_s * kb):
        t = i // kb
        k = (i - t * kb) * BLOCK_K + offs_k
        k_ok = k < K_group
        r = r0 + (t // taps_s) * stride_h
        s = s0 + (t % taps_s) * stride_w
        oh = (h + pad_h - r * dil_h) // stride_h  # exact: the phase makes it a multiple
        ow = (w + pad_w - s * dil_w) // stride_w
        pix_ok = m_ok & (oh >= 0) & (oh < P) & (ow >= 0) & (ow < Q)
        k_ch = (group * K_group + k).to(tl.int64)
        g = tl.load(g_pix[:, None] + (oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw)[:, None]
                    + k_ch[None, :] * sgc, mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + r * swr + s * sws + k_ch[:, None] * swk, mask=k_ok[:, None] & c_ok[None, :],
                    other=0.0)
        if UPCAST:
            acc += tl.dot(g.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(g, b, input_precision=PRECISION)

    out_mask = m_ok[:, None] & c_ok[None, :]
    pixel = n_idx * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    dx_off = (n_idx * sdn + h.to(tl.int64) * sdh + w.to(tl.int64) * sdw)[:, None] + ch.to(tl.int64)[None, :] * sdc
    if PROLOGUE:
        # The prologue's backward while dA is in registers: dReLU from the recomputed x * scale + shift,
        # dx = gz * scale, and this tile's sums of gz * x and gz per input channel.
        xv = tl.load(x_ptr + pixel[:, None] + ch.to(tl.int64)[None, :] * sxc, mask=out_mask, other=0.0)
        xv = xv.to(tl.float32)
        sc = tl.load(scale_ptr + ch, mask=c_ok, other=0.0)
        gz = acc
        if PROLOGUE_RELU:
            sh = tl.load(shift_ptr + ch, mask=c_ok, other=0.0)
            gz = tl.where(xv * sc[None, :] + sh[None, :] > 0, acc, 0.0)  # NaN input: no gradient, as torch
        tl.store(dx_ptr + dx_off, (gz * sc[None, :]).to(dx_ptr.dtype.element_ty), mask=out_mask)
        tile = (phase * num_m + pid_m).to(tl.int64) * (C_group * tl.num_programs(2)) + ch
        tl.store(pdot_ptr + tile, tl.sum(tl.where(out_mask, gz * xv, 0.0), axis=0), mask=c_ok)
        tl.store(psum_ptr + tile, tl.sum(tl.where(out_mask, gz, 0.0), axis=0), mask=c_ok)
    else:
        tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=out_mask)


# ------------------------------------------------------------------ launch plans (tiles: conv.Config)

def _dividing(n: int, wanted: int) -> int:
    """The largest of wanted, wanted/2, wanted/4 (>= 16) dividing n, else a power of two covering n."""
    for b in (wanted, wanted // 2, wanted // 4):
        if b >= 16 and n % b == 0:
            return b
    return max(16, min(wanted, triton.next_power_of_2(n)))


def covers(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> Optional[str]:
    """None when the dgrad kernel covers the call, else why not (the wgrad covers every conv)."""
    if (stride[0] > 1 and dilation[0] > 1) or (stride[1] > 1 and dilation[1] > 1):
        return "dgrad of a conv with both stride and dilation > 1 is not covered"
    return None


def _tiles(config: str, default: Config, packed: bool = False) -> Config:
    """The tiles of one backward launch: `config` (a conv.Config string, e.g. one of backward_configs) or
    the plan's default. A packed wgrad decodes (r, s, c) per column in steps of at most 32."""
    if not config:
        return default
    tiles = Config.parse(config)
    return dataclasses.replace(tiles, block_n=32) if packed and tiles.block_n > 32 else tiles


# The large backward tile (both kernels): 128 x 128 with 8 warps (two warpgroups sharing the tile, the
# Hopper GEMM shape), 3 stages. On sm_90 (audit) the wgrad takes 160-180 registers and the dgrad with the
# prologue's backward 244-246, no spills; the 4-warp 128 x 64 / 64 x 128 tiles reach 234-252 in the dgrad.
WIDE = "m128n128k64w8s3x1g8"


def backward_configs(x: torch.Tensor, weight: torch.Tensor, groups: int) -> list:
    """Backward tiles auto may time beside the default ("") for a training call: WIDE where both GEMMs are
    large 16-bit ones (>= 128 output and input channels per group, >= 8192 output pixels), else none."""
    k, c_group = weight.shape[0] // groups, weight.shape[1]
    n, _, h, w = x.shape
    if x.device.type == "cpu" or x.element_size() > 2 or min(k, c_group) < 128 or n * h * w < 8192:
        return []
    return [WIDE]


def wgrad_plan(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
               prologue: Optional[tuple] = None, split: Optional[int] = None, config: str = "") -> tuple:
    """(out, [Launch], reduce): the weight gradient of conv2d(relu?(x * scale + shift)) given its output
    gradient g. Unsplit, out is dW (weight's shape and dtype) and reduce None; split over pixels, out holds
    the fp32 partials and reduce(out) is dW. `split` forces a split (tests), None = the heuristic's;
    `config`: the tiles (a conv.Config string), "" = the heuristic's."""
    n, c, h, w = x.shape
    k, c_group, r, s = weight.shape
    p, q = g.shape[2:]
    interpret = x.device.type == "cpu"
    k_group = k // groups
    packed = Problem(0, k_group, groups, c_group, r * s, 0, x.element_size()).packed  # as the forward decodes
    if interpret:  # few, large programs and steps: each interpreted step costs milliseconds
        tiles = Config(256, 64 if packed else 256, 128, 4, 1)
    else:
        wide = 64 if x.element_size() <= 2 else 32
        tiles = Config(128 if k_group >= 128 else 64, 32 if packed else _dividing(c_group, wide), wide, 4, 3)
    tiles = _tiles(config, tiles, packed)
    cols = triton.cdiv(r * s * c_group, tiles.block_n) if packed else r * s * triton.cdiv(c_group, tiles.block_n)
    grid_tiles = triton.cdiv(k_group, tiles.block_m) * cols * groups
    steps = triton.cdiv(n * p * q, tiles.block_k)
    if split is None:  # two waves of the SMs, at least 8 pixel steps per split
        split = 1 if interpret else max(1, min(triton.cdiv(2 * HOPPER_SMS, grid_tiles), steps // 8, 256))
    per_split = triton.cdiv(steps, max(1, min(split, steps)))
    split = triton.cdiv(steps, per_split)  # no empty split
    dw = torch.empty(weight.shape, device=x.device, dtype=weight.dtype)
    out = dw if split == 1 else torch.empty((split, *weight.shape), device=x.device, dtype=torch.float32)
    scale, shift, relu = prologue if prologue is not None else (x, x, False)
    launch = Launch(
        conv2d_wgrad_kernel, (grid_tiles // groups, split, groups),
        [g, x, scale, shift, out, n, c_group, h, w, k_group, p, q, r, s, *stride, *padding, *dilation,
         *g.stride(), *x.stride(), *dw.stride(), dw.numel() if split > 1 else 0, per_split],
        dict(PROLOGUE=prologue is not None, PROLOGUE_RELU=bool(relu), PACKED=packed, UPCAST=interpret,
             PRECISION=precision(x.dtype, interpret), GROUP_M=tiles.group_m,
             BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k),
        tiles.num_warps, tiles.num_stages,
        mma_issued=grid_tiles * tiles.block_m * tiles.block_n * steps * tiles.block_k,
        mma_useful=k * r * s * c_group * n * p * q)
    if split == 1:
        return dw, [launch], None
    return out, [launch], lambda partials: partials.sum(0).to(weight.dtype)  # split order: deterministic


def dgrad_plan(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
               prologue: Optional[tuple] = None, config: str = "") -> tuple:
    """((dx, pdot, psum), [Launch]): the input gradient of conv2d(relu?(x * scale + shift)) given g. With a
    prologue dx is the gradient of the RAW x and pdot/psum [tiles, C] the per-tile sums of gz * x and gz
    (summed over tiles they are d scale and d shift); without one dx is the conv's input gradient.
    `config`: the tiles (a conv.Config string), "" = the heuristic's."""
    n, c, h, w = x.shape
    k, c_group, r, s = weight.shape
    p, q = g.shape[2:]
    interpret = x.device.type == "cpu"
    k_group = k // groups
    hp, wp = triton.cdiv(h, stride[0]), triton.cdiv(w, stride[1])
    if interpret:
        tiles = Config(128, 256, _dividing(k_group, 256), 4, 1)
    else:
        wide = 64 if x.element_size() <= 2 else 32
        # The prologue's backward holds the x tile beside the accumulator: at 4 warps a 128 x 64 or 64 x 128
        # tile reaches 242-254 registers and spills in places (sm_90 audit), so 64 x 64 there.
        fused = prologue is not None
        block_m = 128 if n * hp * wp >= 8192 and c_group <= 64 and not fused else 64
        block_n = 64 if fused and c_group >= 64 else 128 if c_group >= 128 else 64 if c_group >= 64 else 32
        tiles = Config(block_m, block_n, _dividing(k_group, wide), 4, 3)
    tiles = _tiles(config, tiles)
    num_m = triton.cdiv(n * hp * wp, tiles.block_m)
    phases = stride[0] * stride[1]
    wt = weight.detach().permute(2, 3, 0, 1).contiguous()  # [R, S, K, C_group]: channel rows contiguous
    dx = _output_like(x, x.shape, x.dtype)
    f32 = dict(device=x.device, dtype=torch.float32)
    pdot, psum = (torch.empty((phases * num_m, c), **f32) for _ in range(2)) if prologue is not None else (dx, dx)
    scale, shift, relu = prologue if prologue is not None else (x, x, False)
    # Useful work: every (pixel, tap) pair that lands inside y; issued: whole tiles over each phase's taps.
    taps = sum(len(range((ph + padding[0]) % stride[0], r, stride[0]))
               * len(range((pw + padding[1]) % stride[1], s, stride[1]))
               for ph in range(stride[0]) for pw in range(stride[1]))
    launch = Launch(
        conv2d_dgrad_kernel, (num_m * triton.cdiv(c_group, tiles.block_n), phases, groups),
        [g, wt, x, scale, shift, dx, pdot, psum, n, c_group, h, w, k_group, p, q, r, s, *stride, *padding,
         *dilation, hp, wp, *g.stride(), wt.stride(0), wt.stride(1), wt.stride(2), *x.stride(), *dx.stride()],
        dict(PROLOGUE=prologue is not None, PROLOGUE_RELU=bool(relu), UPCAST=interpret,
             PRECISION=precision(x.dtype, interpret), GROUP_M=tiles.group_m,
             BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k),
        tiles.num_warps, tiles.num_stages,
        mma_issued=num_m * tiles.block_m * triton.cdiv(c_group, tiles.block_n) * tiles.block_n * groups * taps
        * triton.cdiv(k_group, tiles.block_k) * tiles.block_k,
        mma_useful=n * p * q * k * r * s * c_group)
    return (dx, pdot, psum), [launch]


def conv2d_wgrad(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
                 prologue: Optional[tuple] = None, split: Optional[int] = None, config: str = "") -> torch.Tensor:
    """The weight gradient (weight's shape and dtype). `prologue` = (scale, shift, relu), fp32 per input
    channel, as the forward's; `split` forces a pixel split (tests), None = the plan's; `config`: tiles."""
    out, launches, reduce = wgrad_plan(g, x, weight, stride, padding, dilation, groups, prologue, split, config)
    run(launches)
    return out if reduce is None else reduce(out)


def conv2d_dgrad(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
                 prologue: Optional[tuple] = None, config: str = ""):
    """dx, or with a prologue (dx, d scale, d shift): the gradient of the raw x through relu?(x * scale +
    shift) and the sums of gz * x and gz per channel (fp32). `config`: the tiles, "" = the plan's."""
    (dx, pdot, psum), launches = dgrad_plan(g, x, weight, stride, padding, dilation, groups, prologue, config)
    run(launches)
    if prologue is None:
        return dx
    return dx, pdot.sum(0), psum.sum(0)  # a fixed order over tiles: deterministic
