"""Implicit-GEMM conv2d with a fused epilogue: y = relu(conv(x, w) [+ conv1x1(x2[::s, ::s], w2)] + bias + residual).

GEMM view: M = N*P*Q output pixels, N = output channels of one group, K = R*S*C_group
input taps. Tensors are addressed through their strides, so NCHW and channels_last
inputs both work without a copy (channels_last makes the K loads contiguous); a 1x1
conv is then a plain GEMM over the NHWC matrix view and a strided 1x1 reads the strided
pixels in place. The optional second operand (x2, w2) is the projection shortcut of a
Bottleneck: its 1x1 GEMM accumulates into the same tile (concatenated K), so conv3 and
the shortcut cost one launch and one output write. Accumulation is fp32; offsets are
int64 so tensors past 2**31 elements index correctly.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_tile_accumulate(acc, x_ptr, w_ptr, n_idx, oh, ow, m_mask, offs_n, n_mask, group,
                          C_group, H, W, R, S, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                          sxn, sxc, sxh, sxw, swk, swc, swr, sws,
                          BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    c_base = group * C_group
    for r in range(0, R):
        ih = oh * stride_h - pad_h + r * dil_h
        for s in range(0, S):
            iw = ow * stride_w - pad_w + s * dil_w
            pixel_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = n_idx * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            w_col = offs_n.to(tl.int64) * swk + r * swr + s * sws
            for c0 in range(0, C_group, BLOCK_K):
                c = c0 + offs_k
                c_ok = c < C_group
                a = tl.load(x_ptr + x_row[:, None] + (c_base + c).to(tl.int64)[None, :] * sxc,
                            mask=pixel_ok[:, None] & c_ok[None, :], other=0.0)
                b = tl.load(w_ptr + w_col[None, :] + c.to(tl.int64)[:, None] * swc,
                            mask=c_ok[:, None] & n_mask[None, :], other=0.0)
                if UPCAST:
                    acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
                else:
                    acc += tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def conv2d_act_kernel(
    x_ptr, w_ptr, x2_ptr, w2_ptr, bias_ptr, res_ptr, y_ptr,
    N, C_group, H, W, K_group, P, Q, R, S,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    C2, H2, W2, stride2_h, stride2_w,
    sxn, sxc, sxh, sxw, swk, swc, swr, sws,
    s2n, s2c, s2h, s2w, sw2k, sw2c,
    srn, src, srh, srw, syn, syc, syh, syw,
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N * P * Q
    n_idx = (offs_m // (P * Q)).to(tl.int64)
    pq = offs_m % (P * Q)
    oh = pq // Q
    ow = pq % Q
    offs_n = group * K_group + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) < K_group

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _conv_tile_accumulate(acc, x_ptr, w_ptr, n_idx, oh, ow, m_mask, offs_n, n_mask, group,
                                C_group, H, W, R, S, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                sxn, sxc, sxh, sxw, swk, swc, swr, sws, BLOCK_K, UPCAST, PRECISION)
    if HAS_SECOND:
        # The projection shortcut: a 1x1 conv of x2 with stride (stride2_h, stride2_w), no padding.
        acc = _conv_tile_accumulate(acc, x2_ptr, w2_ptr, n_idx, oh, ow, m_mask, offs_n, n_mask, 0,
                                    C2, H2, W2, 1, 1, stride2_h, stride2_w, 0, 0, 1, 1,
                                    s2n, s2c, s2h, s2w, sw2k, sw2c, 0, 0, BLOCK_K, UPCAST, PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    ch64 = offs_n.to(tl.int64)
    if HAS_RESIDUAL:
        r_off = (n_idx * srn + oh64 * srh + ow64 * srw)[:, None] + ch64[None, :] * src
        acc += tl.load(res_ptr + r_off, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # not maximum(): it drops NaN on the GPU, torch.relu keeps it
    y_off = (n_idx * syn + oh64 * syh + ow64 * syw)[:, None] + ch64[None, :] * syc
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def pick_config(m: int, k_group: int, reduction: int, interpret: bool, element_size: int = 2) -> dict:
    """Tile sizes by shape (no autotuning, so nothing tunes during CUDA-graph capture). Under
    the CPU interpreter every program costs milliseconds, so big tiles (few programs) win
    there; on the GPU, 128-wide tiles for the large early-layer GEMMs and 64-wide ones for
    narrow/late layers keep the SMs busy; fp32 halves the K step to stay within shared memory."""
    if interpret:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=1)
    block_n = 128 if k_group >= 128 else 64 if k_group >= 64 else 32
    block_m = 128 if m >= 8192 else 64
    block_k = 64 if reduction >= 64 and element_size <= 2 else 32
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if block_m * block_n >= 16384 else 4,
                num_stages=3)


def _output_like(x: torch.Tensor, shape, dtype) -> torch.Tensor:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(shape, device=x.device, dtype=dtype,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
               groups: int, residual: Optional[torch.Tensor], relu: bool, *,
               second: Optional[tuple] = None) -> torch.Tensor:
    """Launch the kernel (arguments already checked). `second` = (x2, w2, (stride_h, stride_w)): a 1x1
    strided conv accumulated into the same output (the Bottleneck projection shortcut)."""
    n, c, h, w = x.shape
    k, c_group, r, s = weight.shape
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    y = _output_like(x, (n, k, p, q), x.dtype)
    if y.numel() == 0:
        return y
    k_group = k // groups
    interpret = x.device.type == "cpu"
    cfg = pick_config(n * p * q, k_group, c_group * r * s, interpret, x.element_size())
    if second is not None:
        x2, w2, stride2 = second
        c2, h2, w2_ = x2.shape[1:]
        x2_strides, w2_strides = x2.stride(), (w2.stride(0), w2.stride(1))
    else:
        x2, w2, stride2, c2, h2, w2_ = x, weight, (1, 1), 0, 1, 1
        x2_strides, w2_strides = (0, 0, 0, 0), (0, 0)
    res = residual if residual is not None else y
    grid = (triton.cdiv(n * p * q, cfg["BLOCK_M"]), triton.cdiv(k_group, cfg["BLOCK_N"]), groups)
    conv2d_act_kernel[grid](
        x, weight, x2, w2, bias if bias is not None else weight, res, y,
        n, c_group, h, w, k_group, p, q, r, s,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        c2, h2, w2_, stride2[0], stride2[1],
        *x.stride(), *weight.stride(), *x2_strides, *w2_strides, *res.stride(), *y.stride(),
        HAS_SECOND=second is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
        # The interpreter's bf16 dot is wrong (DESIGN.md section 5): accumulate from fp32 operands there.
        UPCAST=interpret,
        # fp32 follows torch's TF32 switch for convolutions, so "exact fp32" means the same thing here.
        PRECISION="tf32" if x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpret
        else "ieee",
        **cfg,
    )
    return y
