"""Triton LayerNorm over the last dimension, for many short rows (VMamba's channels of 96..2048), and Mamba's
residual add fused with an RMSNorm (Vim's blocks).

PyTorch's CUDA LayerNorm gives every row its own thread block, which leaves most of an H100 idle when rows
are short: on VMamba-T it took a quarter of the inference time. Here a program normalises BLOCK_M rows at
once. The input is read through strides, as (batch, P, C) with any strides, so a channels-first map viewed
channels-last (`x.permute(0, 2, 3, 1)`) is normalised without a transposed copy; the output is contiguous.

Forward, per row x of C values (float32 math):

    mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps)
    xhat = (x - mean) * rstd,  y = xhat * w + b

Backward, with g = w * dy:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat,  db = sum over rows of dy   (one partial sum per program, then summed)

Add + RMSNorm, per row of the residual stream (x the block's output, residual the stream before it):

    r = residual + x (float32),  rstd = 1 / sqrt(sum(r^2) / C + eps),  y = r * rstd * w

and its backward, with rhat = r * rstd, g = w * dy and dr the gradient arriving at r from later blocks:

    dr_total = rstd * (g - rhat * mean(g * rhat)) + dr,   dx = dresidual = dr_total,   dw = sum of dy * rhat

One pass reads x and the residual and writes r and y (in the dtype the next matmul takes); PyTorch takes four
(cast x, add, norm, cast y).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    rows_total, P, C, stride_b, stride_p, stride_c, eps,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y (rows, C) contiguous, mean and rstd (rows,) float32; row r = (batch r // P, position r % P)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_C)
    mask_r, mask_c = rows < rows_total, c < C
    mask = mask_r[:, None] & mask_c[None, :]
    bi, p = (rows // P).to(tl.int64), (rows % P).to(tl.int64)
    x = tl.load(x_ptr + (bi * stride_b + p * stride_p)[:, None] + c[None, :] * stride_c, mask=mask,
                other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    w = tl.load(w_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * C + c[None, :], y, mask=mask)
    tl.store(mean_ptr + rows, mean, mask=mask_r)
    tl.store(rstd_ptr + rows, rstd, mask=mask_r)


@triton.jit
def _layer_norm_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
    rows_total, P, C, stride_b, stride_p, stride_c,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    """dx (rows, C) contiguous; dw, db partial sums (programs, C) float32. A program walks
    ROWS_PER_PROGRAM rows in blocks of BLOCK_M, so there are few partial sums to add up."""
    c = tl.arange(0, BLOCK_C)
    mask_c = c < C
    w = tl.load(w_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = tl.program_id(0) * ROWS_PER_PROGRAM + i + tl.arange(0, BLOCK_M)
        mask_r = rows < rows_total
        mask = mask_r[:, None] & mask_c[None, :]
        bi, p = (rows // P).to(tl.int64), (rows % P).to(tl.int64)
        x = tl.load(x_ptr + (bi * stride_b + p * stride_p)[:, None] + c[None, :] * stride_c, mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=mask_r, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / C
        mean_gx = tl.sum(g * xhat, axis=1) / C
        dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        tl.store(dx_ptr + rows.to(tl.int64)[:, None] * C + c[None, :], dx, mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(dw_ptr + tl.program_id(0) * C + c, dw, mask=mask_c)
    tl.store(db_ptr + tl.program_id(0) * C + c, db, mask=mask_c)


def _blocks(C):
    block_c = triton.next_power_of_2(C)
    block_m = max(1, min(64, 4096 // block_c))
    warps = 4 if block_c * block_m <= 4096 else 8
    return block_m, block_c, warps


def _backward_programs(rows, block_m):
    """Rows per backward program (whole blocks, about 4 programs per SM of an H100) and the program count: few
    partial sums of dw (and db) to add up afterwards."""
    rows_per_program = block_m * max(1, min(64, triton.cdiv(rows, block_m * 4 * 132)))
    return rows_per_program, triton.cdiv(rows, rows_per_program)


def layer_norm_fwd(x3, weight, bias, eps, out_dtype):
    """x3: (batch, P, C) with any strides -> y (batch * P, C) contiguous in out_dtype, mean, rstd (rows,)."""
    batch, P, C = x3.shape
    rows = batch * P
    y = torch.empty(rows, C, device=x3.device, dtype=out_dtype)
    mean = torch.empty(rows, device=x3.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_m, block_c, warps = _blocks(C)
    _layer_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
        x3, weight, bias, y, mean, rstd, rows, P, C, x3.stride(0), x3.stride(1), x3.stride(2), eps,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
    return y, mean, rstd


def layer_norm_bwd(dy, x3, weight, mean, rstd):
    """dy (rows, C) contiguous -> dx (rows, C) in x's dtype, dw, db (C,) in float32."""
    batch, P, C = x3.shape
    rows = batch * P
    block_m, block_c, warps = _blocks(C)
    rows_per_program, programs = _backward_programs(rows, block_m)
    dx = torch.empty(rows, C, device=dy.device, dtype=x3.dtype)
    dw = torch.empty(programs, C, device=dy.device, dtype=torch.float32)
    db = torch.empty_like(dw)
    _layer_norm_bwd_kernel[(programs,)](
        x3, weight, dy, mean, rstd, dx, dw, db, rows, P, C, x3.stride(0), x3.stride(1), x3.stride(2),
        BLOCK_M=block_m, BLOCK_C=block_c, ROWS_PER_PROGRAM=rows_per_program, num_warps=warps)
    return dx, dw.sum(0), db.sum(0)


@triton.jit
def _add_rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, r_ptr, rstd_ptr, rows_total, C, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """r = residual + x (x alone without a residual) and y = RMSNorm(r) * w, all (rows, C) contiguous; r and
    rstd (rows,) in float32, y in y_ptr's dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_C)
    mask_r, mask_c = rows < rows_total, c < C
    mask = mask_r[:, None] & mask_c[None, :]
    offs = rows.to(tl.int64)[:, None] * C + c[None, :]
    r = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(r_ptr + offs, r, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=1) / C + eps)
    w = tl.load(w_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, r * rstd[:, None] * w[None, :], mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=mask_r)


@triton.jit
def _add_rms_norm_bwd_kernel(
    r_ptr, w_ptr, rstd_ptr, dy_ptr, dr_ptr, dx_ptr, dres_ptr, dw_ptr, rows_total, C,
    HAS_DR: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    """dx (x's dtype) and dresidual (float32) = the gradient at r, (rows, C) contiguous; dw partial sums
    (programs, C) float32. dr is the gradient that reached r itself (absent: zero)."""
    c = tl.arange(0, BLOCK_C)
    mask_c = c < C
    w = tl.load(w_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = tl.program_id(0) * ROWS_PER_PROGRAM + i + tl.arange(0, BLOCK_M)
        mask_r = rows < rows_total
        mask = mask_r[:, None] & mask_c[None, :]
        offs = rows.to(tl.int64)[:, None] * C + c[None, :]
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        rhat = tl.load(r_ptr + offs, mask=mask, other=0.0) * rstd[:, None]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        dr = rstd[:, None] * (g - rhat * (tl.sum(g * rhat, axis=1) / C)[:, None])
        if HAS_DR:
            dr += tl.load(dr_ptr + offs, mask=mask, other=0.0)
        tl.store(dx_ptr + offs, dr, mask=mask)
        if HAS_RESIDUAL:
            tl.store(dres_ptr + offs, dr, mask=mask)
        dw += tl.sum(dy * rhat, axis=0)
    tl.store(dw_ptr + tl.program_id(0) * C + c, dw, mask=mask_c)


def add_rms_norm_fwd(x, residual, weight, eps, out_dtype):
    """x, residual (rows, C) contiguous (residual may be None) -> y (rows, C) in out_dtype, r (rows, C) and
    rstd (rows,) in float32."""
    rows, C = x.shape
    y = torch.empty(rows, C, device=x.device, dtype=out_dtype)
    r = torch.empty(rows, C, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    block_m, block_c, warps = _blocks(C)
    _add_rms_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
        x, residual if residual is not None else x, weight, y, r, rstd, rows, C, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
    return y, r, rstd


def add_rms_norm_bwd(dy, dr, r, weight, rstd, x_dtype, has_residual):
    """dy (rows, C) and dr (rows, C) float32 or None, contiguous -> dx in x_dtype, dresidual in float32 (None
    without a residual), dw (C,) in float32."""
    rows, C = r.shape
    block_m, block_c, warps = _blocks(C)
    rows_per_program, programs = _backward_programs(rows, block_m)
    dx = torch.empty(rows, C, device=r.device, dtype=x_dtype)
    dres = torch.empty(rows, C, device=r.device, dtype=torch.float32) if has_residual else None
    dw = torch.empty(programs, C, device=r.device, dtype=torch.float32)
    _add_rms_norm_bwd_kernel[(programs,)](
        r, weight, rstd, dy, dr if dr is not None else r, dx, dres if has_residual else dx, dw, rows, C,
        HAS_DR=dr is not None, HAS_RESIDUAL=has_residual,
        BLOCK_M=block_m, BLOCK_C=block_c, ROWS_PER_PROGRAM=rows_per_program, num_warps=warps)
    return dx, dres, dw.sum(0)
