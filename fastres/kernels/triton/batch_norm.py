"""BatchNorm (+ residual) (+ ReLU), forward and backward, as deterministic split reductions.

A 4-D tensor is addressed as (N, C, L = H*W) through its strides, which covers NCHW and
channels_last alike. Statistics: each program reduces a fixed chunk of rows to
(count, mean, M2) with in-register Chan merges; one finalize program per channel block
merges the chunks in a fixed order (so results are bitwise reproducible, no atomics),
then writes mean, 1/std, the affine scale/shift and the running statistics, all on the
device with no host synchronisation. Apply: y = relu(x * scale + shift + residual).
Backward: one reduction (sum g, sum g*xhat with g = dy masked by y > 0), one small finalize
that merges those partials once, and one apply (dx, and d residual = g) reading per-channel sums.
fp32 math whatever the storage dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...layout import memory_format_of


@triton.jit
def _row_offsets(rows, L, sxn, sxl):
    rows64 = rows.to(tl.int64)
    return (rows64 // L) * sxn + (rows64 % L) * sxl


@triton.jit
def _chan_merge(count, mean, m2, n_b, mean_b, m2_b):
    """Chan et al.: merge the (count, mean, M2) of a block into the running triple (counts are whole numbers)."""
    total = count + n_b
    safe = tl.maximum(total, 1.0)
    delta = mean_b - mean
    return total, mean + delta * (n_b / safe), m2 + m2_b + delta * delta * (count * n_b / safe)


@triton.jit
def batch_norm_act_stats_kernel(x_ptr, count_ptr, mean_ptr, m2_ptr, R, C, L, sxn, sxc, sxl, rows_per_program,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = chunk * rows_per_program
    for r0 in range(0, rows_per_program, BLOCK_R):
        rows = start + r0 + tl.arange(0, BLOCK_R)
        r_ok = (rows < R) & (r0 + tl.arange(0, BLOCK_R) < rows_per_program)
        mask = r_ok[:, None] & c_ok[None, :]
        offs = _row_offsets(rows, L, sxn, sxl)[:, None] + cols.to(tl.int64)[None, :] * sxc
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n_b = tl.sum(r_ok.to(tl.float32), axis=0)
        mean_b = tl.sum(x, axis=0) / tl.maximum(n_b, 1.0)
        dev = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(dev * dev, axis=0)
        count, mean, m2 = _chan_merge(count, mean, m2, n_b, mean_b, m2_b)
    out = chunk * C + cols
    tl.store(count_ptr + out, count, mask=c_ok)
    tl.store(mean_ptr + out, mean, mask=c_ok)
    tl.store(m2_ptr + out, m2, mask=c_ok)


@triton.jit
def batch_norm_act_finalize_kernel(count_ptr, pmean_ptr, pm2_ptr, chunks, C, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr,
                                   mean_ptr, invstd_ptr, scale_ptr, shift_ptr, momentum, eps,
                                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                                   BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for chunk in range(0, chunks):  # fixed order: deterministic
        n_b = tl.load(count_ptr + chunk * C + cols, mask=c_ok, other=0.0)
        mean_b = tl.load(pmean_ptr + chunk * C + cols, mask=c_ok, other=0.0)
        m2_b = tl.load(pm2_ptr + chunk * C + cols, mask=c_ok, other=0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, n_b, mean_b, m2_b)
    invstd = 1.0 / tl.sqrt(m2 / tl.maximum(count, 1.0) + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cols, mask=c_ok, other=1.0).to(tl.float32)
    shift = -mean * scale
    if HAS_BIAS:
        shift += tl.load(bias_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(mean_ptr + cols, mean, mask=c_ok)
    tl.store(invstd_ptr + cols, invstd, mask=c_ok)
    tl.store(scale_ptr + cols, scale, mask=c_ok)
    tl.store(shift_ptr + cols, shift, mask=c_ok)
    if UPDATE_RUNNING:
        # As torch.nn.BatchNorm2d: the running variance is the unbiased one.
        rm = tl.load(rmean_ptr + cols, mask=c_ok, other=0.0)
        rv = tl.load(rvar_ptr + cols, mask=c_ok, other=0.0)
        new_rm = (1.0 - momentum) * rm.to(tl.float32) + momentum * mean
        new_rv = (1.0 - momentum) * rv.to(tl.float32) + momentum * (m2 / tl.maximum(count - 1.0, 1.0))
        tl.store(rmean_ptr + cols, new_rm.to(rm.dtype), mask=c_ok)
        tl.store(rvar_ptr + cols, new_rv.to(rv.dtype), mask=c_ok)


@triton.jit
def batch_norm_act_apply_kernel(x_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, R, C, L,
                                sxn, sxc, sxl, srn, src, srl, syn, syc, syl,
                                HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < R)[:, None] & c_ok[None, :]
    cols64 = cols.to(tl.int64)[None, :]
    x = tl.load(x_ptr + _row_offsets(rows, L, sxn, sxl)[:, None] + cols64 * sxc, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + cols, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=c_ok, other=0.0)
    y = x.to(tl.float32) * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + _row_offsets(rows, L, srn, srl)[:, None] + cols64 * src, mask=mask,
                     other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0, 0.0, y)  # not maximum(): it drops NaN on the GPU, torch.relu keeps it
    tl.store(y_ptr + _row_offsets(rows, L, syn, syl)[:, None] + cols64 * syc, y.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def batch_norm_act_backward_reduce_kernel(dy_ptr, y_ptr, x_ptr, mean_ptr, invstd_ptr, psum_ptr, psumx_ptr, R, C, L,
                                          sdn, sdc, sdl, syn, syc, syl, sxn, sxc, sxl, rows_per_program,
                                          RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    cols64 = cols.to(tl.int64)[None, :]
    mean = tl.load(mean_ptr + cols, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=c_ok, other=0.0)
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = chunk * rows_per_program
    for r0 in range(0, rows_per_program, BLOCK_R):
        rows = start + r0 + tl.arange(0, BLOCK_R)
        mask = ((rows < R) & (r0 + tl.arange(0, BLOCK_R) < rows_per_program))[:, None] & c_ok[None, :]
        g = tl.load(dy_ptr + _row_offsets(rows, L, sdn, sdl)[:, None] + cols64 * sdc, mask=mask,
                    other=0.0).to(tl.float32)
        if RELU:
            y = tl.load(y_ptr + _row_offsets(rows, L, syn, syl)[:, None] + cols64 * syc, mask=mask, other=0.0)
            g = tl.where(y > 0, g, 0.0)
        x = tl.load(x_ptr + _row_offsets(rows, L, sxn, sxl)[:, None] + cols64 * sxc, mask=mask,
                    other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * invstd[None, :]
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(tl.where(mask, g * xhat, 0.0), axis=0)
    tl.store(psum_ptr + chunk * C + cols, sum_g, mask=c_ok)
    tl.store(psumx_ptr + chunk * C + cols, sum_gx, mask=c_ok)


@triton.jit
def batch_norm_act_backward_apply_kernel(dy_ptr, y_ptr, x_ptr, mean_ptr, invstd_ptr, scale_ptr, sum_g_ptr, sum_gx_ptr,
                                         dx_ptr, dres_ptr, R, C, L,
                                         sdn, sdc, sdl, syn, syc, syl, sxn, sxc, sxl, son, soc, sol,
                                         RELU: tl.constexpr, TRAINING: tl.constexpr, WRITE_DRES: tl.constexpr,
                                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx (and d residual) from per-channel sums finalized once by batch_norm_act_backward_finalize_kernel."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < R)[:, None] & c_ok[None, :]
    cols64 = cols.to(tl.int64)[None, :]
    g = tl.load(dy_ptr + _row_offsets(rows, L, sdn, sdl)[:, None] + cols64 * sdc, mask=mask,
                other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(y_ptr + _row_offsets(rows, L, syn, syl)[:, None] + cols64 * syc, mask=mask, other=0.0)
        g = tl.where(y > 0, g, 0.0)
    out = _row_offsets(rows, L, son, sol)[:, None] + cols64 * soc
    if WRITE_DRES:
        tl.store(dres_ptr + out, g.to(dres_ptr.dtype.element_ty), mask=mask)
    scale = tl.load(scale_ptr + cols, mask=c_ok, other=0.0)[None, :]
    if TRAINING:
        mean = tl.load(mean_ptr + cols, mask=c_ok, other=0.0)
        invstd = tl.load(invstd_ptr + cols, mask=c_ok, other=0.0)
        x = tl.load(x_ptr + _row_offsets(rows, L, sxn, sxl)[:, None] + cols64 * sxc, mask=mask,
                    other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * invstd[None, :]
        sum_g = tl.load(sum_g_ptr + cols, mask=c_ok, other=0.0)
        sum_gx = tl.load(sum_gx_ptr + cols, mask=c_ok, other=0.0)
        dx = scale * (g - (sum_g / R)[None, :] - xhat * (sum_gx / R)[None, :])
    else:
        dx = scale * g
    tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def batch_norm_act_backward_finalize_kernel(psum_ptr, psumx_ptr, chunks, C, sum_g_ptr, sum_gx_ptr,
                                            BLOCK_C: tl.constexpr):
    """Merge the per-chunk sums once, in a fixed order (deterministic): d bias = sum g, d weight = sum g*xhat."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for chunk in range(0, chunks):
        sum_g += tl.load(psum_ptr + chunk * C + cols, mask=c_ok, other=0.0)
        sum_gx += tl.load(psumx_ptr + chunk * C + cols, mask=c_ok, other=0.0)
    tl.store(sum_g_ptr + cols, sum_g, mask=c_ok)
    tl.store(sum_gx_ptr + cols, sum_gx, mask=c_ok)


# ---------------------------------------------------------------- launchers

def _view3(t: torch.Tensor):
    """(N, C, L) sizes and strides of a 4-D tensor whose H and W flatten with one stride."""
    n, c, h, w = t.shape
    if not collapsible(t):
        raise ValueError("tensor's H and W must be collapsible (NCHW- or channels_last-contiguous)")
    return (n, c, h * w), (t.stride(0), t.stride(1), t.stride(3) if w > 1 else t.stride(2))


def collapsible(t: torch.Tensor) -> bool:
    """Whether `t`'s H and W can be addressed as one dimension L with a single stride."""
    return t.shape[2] <= 1 or t.shape[3] <= 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _tiles(rows: int, channels: int, interpret: bool):
    block_c = min(64, triton.next_power_of_2(channels))
    block_r = 64 if interpret else max(16, 4096 // block_c)
    return block_r, block_c


def _chunking(rows: int, block_r: int, channel_tiles: int, interpret: bool):
    """Rows per reduction program: a fixed function of the shape (so the merge order, and the bits, never vary)."""
    target_programs = 8 if interpret else 1024
    blocks = triton.cdiv(rows, block_r)
    chunks_wanted = max(1, min(blocks, target_programs // channel_tiles))
    rows_per_program = triton.cdiv(blocks, chunks_wanted) * block_r
    return rows_per_program, triton.cdiv(rows, rows_per_program)


def _like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=memory_format_of(t))


def batch_norm_act_stats(x: torch.Tensor, weight, bias, running_mean, running_var, momentum: float, eps: float):
    """(mean, invstd, scale, shift) in fp32 from the batch; updates the running buffers in place."""
    (n, c, l), (sxn, sxc, sxl) = _view3(x)
    rows = n * l
    interpret = x.device.type == "cpu"
    block_r, block_c = _tiles(rows, c, interpret)
    channel_tiles = triton.cdiv(c, block_c)
    rows_per_program, chunks = _chunking(rows, block_r, channel_tiles, interpret)
    f32 = dict(device=x.device, dtype=torch.float32)
    count, pmean, pm2 = (torch.empty(chunks, c, **f32) for _ in range(3))
    batch_norm_act_stats_kernel[(chunks, channel_tiles)](x, count, pmean, pm2, rows, c, l, sxn, sxc, sxl,
                                                         rows_per_program, BLOCK_R=block_r, BLOCK_C=block_c)
    mean, invstd, scale, shift = (torch.empty(c, **f32) for _ in range(4))
    dummy = mean
    update = running_mean is not None
    batch_norm_act_finalize_kernel[(channel_tiles,)](
        count, pmean, pm2, chunks, c, weight if weight is not None else dummy, bias if bias is not None else dummy,
        running_mean if update else dummy, running_var if update else dummy, mean, invstd, scale, shift,
        float(momentum), float(eps), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        UPDATE_RUNNING=update, BLOCK_C=block_c)
    return mean, invstd, scale, shift


def apply_plan(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: Optional[torch.Tensor],
               relu: bool) -> tuple:
    """(y, [Launch]) of batch_norm_act_apply (works on meta tensors: the sm_90 audit compiles it)."""
    from .conv import Launch
    y = _like(x)
    (n, c, l), xs = _view3(x)
    ys = _view3(y)[1]
    rs = _view3(residual)[1] if residual is not None else ys
    block_r, block_c = _tiles(n * l, c, x.device.type == "cpu")
    grid = (triton.cdiv(n * l, block_r), triton.cdiv(c, block_c))
    return y, [Launch(batch_norm_act_apply_kernel, grid,
                      [x, scale, shift, residual if residual is not None else y, y, n * l, c, l, *xs, *rs, *ys],
                      dict(HAS_RESIDUAL=residual is not None, RELU=relu, BLOCK_R=block_r, BLOCK_C=block_c), 4, 3)]


def batch_norm_act_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: Optional[torch.Tensor],
                         relu: bool) -> torch.Tensor:
    """relu(x * scale[c] + shift[c] + residual), output in x's dtype and memory format (also norm_conv's
    output gradient gy + a * y + b: x = y, scale = a, shift = b, residual = gy, no ReLU)."""
    from .conv import run
    y, launches = apply_plan(x, scale, shift, residual, relu)
    run(launches)
    return y


def batch_norm_act_backward(dy: torch.Tensor, y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                            invstd: torch.Tensor, scale: torch.Tensor, *, relu: bool, training: bool,
                            need_dres: bool, need_param_grads: bool):
    """(dx, d residual or None, d weight, d bias) of y = relu(bn(x) + residual)."""
    (n, c, l), xs = _view3(x)
    rows = n * l
    interpret = x.device.type == "cpu"
    block_r, block_c = _tiles(rows, c, interpret)
    channel_tiles = triton.cdiv(c, block_c)
    rows_per_program, chunks = _chunking(rows, block_r, channel_tiles, interpret)
    need_sums = training or need_param_grads
    f32 = dict(device=x.device, dtype=torch.float32)
    psum, psumx = torch.zeros(chunks, c, **f32), torch.zeros(chunks, c, **f32)
    dweight, dbias = torch.zeros(c, **f32), torch.zeros(c, **f32)
    ds, ys = _view3(dy)[1], _view3(y)[1]
    if need_sums:
        batch_norm_act_backward_reduce_kernel[(chunks, channel_tiles)](
            dy, y, x, mean, invstd, psum, psumx, rows, c, l, *ds, *ys, *xs, rows_per_program,
            RELU=relu, BLOCK_R=block_r, BLOCK_C=block_c)
        batch_norm_act_backward_finalize_kernel[(triton.cdiv(c, 64),)](psum, psumx, chunks, c, dbias, dweight,
                                                                       BLOCK_C=64)
    dx = _like(x)
    dres = _like(x) if need_dres else None
    os_ = _view3(dx)[1]
    grid = (triton.cdiv(rows, block_r), channel_tiles)
    batch_norm_act_backward_apply_kernel[grid](
        dy, y, x, mean, invstd, scale, dbias, dweight, dx,
        dres if dres is not None else dx, rows, c, l, *ds, *ys, *xs, *os_,
        RELU=relu, TRAINING=training, WRITE_DRES=need_dres, BLOCK_R=block_r, BLOCK_C=block_c)
    return dx, dres, dweight, dbias
