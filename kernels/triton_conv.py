"""Triton depthwise causal convolution with SiLU, Mamba's short conv in front of the scan.

Per channel d with weight w (dim, K) and bias b, for x (batch, dim, L) read at any strides (a channels-last
view, channels contiguous per position, is the fast layout), tap j of K reads position t + o_j:

    causal  (forward direction):  o_j = j - (K - 1)      i.e. x[t - K + 1] .. x[t]
    reverse (Vim's backward one): o_j = K - 1 - j        i.e. x[t + K - 1] .. x[t]   (no flipped copies)
    pre[t] = b + sum_j w[j] x[t + o_j]   (x = 0 outside 0 .. L-1),     y[t] = silu(pre[t])   (or pre[t])

Backward, with g[t] = dy[t] * silu'(pre[t]) (pre recomputed from x, not stored by the forward):

    dw[j] = sum_{batch, t} g[t] x[t + o_j],   db = sum_{batch, t} g[t],   dx[t] = sum_j w[j] g[t - o_j]

The backward kernel writes g (in x's dtype: dx is rounded to it anyway) with the partial sums of dw and db (of
the float32 g, one per program, added up by the launcher); dx is then the forward kernel run on g in the other
direction (offsets -o_j), without bias or SiLU.
A program owns a (BLOCK_L positions, BLOCK_D channels) tile of one batch element; the shifted reads hit the
cache. (One backward kernel recomputing g at the K shifted positions made 29 tile loads per tile instead of
2K + 1 and was 7x slower than the forward on an H100.)
"""
import torch
import triton
import triton.language as tl

from .triton_step import _dense_like


@triton.jit
def _tap(j, K: tl.constexpr, REVERSE: tl.constexpr):
    """The offset o_j of tap j (see the module docs)."""
    if REVERSE:
        return K - 1 - j
    return j - (K - 1)


@triton.jit
def _bias(b_ptr, d, mask_d, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        return tl.load(b_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    return tl.zeros((d.shape[0],), dtype=tl.float32)


@triton.jit
def _load_x(x_ptr, t, d, mask_d, L, sx_l, sx_d):
    """x at positions t (zero outside 0 .. L-1) and channels d, as float32 (BLOCK_L, BLOCK_D)."""
    ok = (t >= 0) & (t < L)
    ptrs = x_ptr + t.to(tl.int64)[:, None] * sx_l + d[None, :] * sx_d
    return tl.load(ptrs, mask=ok[:, None] & mask_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _pre(x_ptr, w_ptr, bias, t, d, mask_d, L, sx_l, sx_d, K: tl.constexpr, REVERSE: tl.constexpr):
    """pre[t] = b + sum_j w[j] x[t + o_j] for a tile of positions t."""
    acc = tl.zeros((t.shape[0], d.shape[0]), dtype=tl.float32) + bias[None, :]
    for j in tl.static_range(K):
        w = tl.load(w_ptr + d * K + j, mask=mask_d, other=0.0).to(tl.float32)
        acc += w[None, :] * _load_x(x_ptr, t + _tap(j, K, REVERSE), d, mask_d, L, sx_l, sx_d)
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, L, dim,
    sx_b, sx_l, sx_d, sy_b, sy_l, sy_d,
    K: tl.constexpr, REVERSE: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y (batch, dim, L) at its strides from x, w (dim, K) contiguous, b (dim,)."""
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    bi = tl.program_id(2).to(tl.int64)
    mask_d = d < dim
    bias = _bias(b_ptr, d, mask_d, HAS_BIAS)
    pre = _pre(x_ptr + bi * sx_b, w_ptr, bias, t, d, mask_d, L, sx_l, sx_d, K, REVERSE)
    y = pre * tl.sigmoid(pre) if SILU else pre
    ptrs = y_ptr + bi * sy_b + t.to(tl.int64)[:, None] * sy_l + d[None, :] * sy_d
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=(t < L)[:, None] & mask_d[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, b_ptr, dy_ptr, g_ptr, dw_ptr, db_ptr, L, dim,
    sx_b, sx_l, sx_d, sdy_b, sdy_l, sdy_d, sg_b, sg_l, sg_d,
    K: tl.constexpr, REVERSE: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """g = dy * silu'(pre) (in x's dtype, at strides sg_*), and dw (programs, K, dim), db (programs, dim) as
    float32 partial sums of the float32 g, program = batch index * L blocks + L block. dx is then the conv of g
    in the other direction."""
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    bi = tl.program_id(2).to(tl.int64)
    mask_d = d < dim
    mask = (t < L)[:, None] & mask_d[None, :]
    x_ptr += bi * sx_b
    g = tl.load(dy_ptr + bi * sdy_b + t.to(tl.int64)[:, None] * sdy_l + d[None, :] * sdy_d, mask=mask,
                other=0.0).to(tl.float32)
    if SILU:
        pre = _pre(x_ptr, w_ptr, _bias(b_ptr, d, mask_d, HAS_BIAS), t, d, mask_d, L, sx_l, sx_d, K, REVERSE)
        s = tl.sigmoid(pre)
        g = g * s * (1.0 + pre * (1.0 - s))
    tl.store(g_ptr + bi * sg_b + t.to(tl.int64)[:, None] * sg_l + d[None, :] * sg_d, g.to(g_ptr.dtype.element_ty),
             mask=mask)
    part = bi * tl.num_programs(0) + tl.program_id(0)
    tl.store(db_ptr + part * dim + d, tl.sum(g, axis=0), mask=mask_d)
    for j in tl.static_range(K):
        xs = _load_x(x_ptr, t + _tap(j, K, REVERSE), d, mask_d, L, sx_l, sx_d)
        tl.store(dw_ptr + (part * K + j) * dim + d, tl.sum(g * xs, axis=0), mask=mask_d)


def _blocks(x):
    """(BLOCK_L, BLOCK_D, warps): channels along the contiguous axis when x is channels-last (2 warps: 1.6-1.8x
    the forward and 1.6-2.1x the backward of 4 at Vim-T's shapes on an H200, BENCHMARKS.md)."""
    if x.stride(1) == 1:
        return 32, 64, 2
    return 64, 32, 4


def conv_fwd(x, weight, bias, reverse, silu):
    """x (batch, dim, L) any strides, weight (dim, K), bias (dim,) or None -> y dense in x's stride order."""
    batch, dim, L = x.shape
    K = weight.shape[-1]
    y = _dense_like(x)
    BLOCK_L, BLOCK_D, warps = _blocks(x)
    grid = (triton.cdiv(L, BLOCK_L), triton.cdiv(dim, BLOCK_D), batch)
    _conv_fwd_kernel[grid](x, weight.contiguous(), bias if bias is not None else weight, y, L, dim,
                           x.stride(0), x.stride(2), x.stride(1), y.stride(0), y.stride(2), y.stride(1),
                           K=K, REVERSE=reverse, SILU=silu, HAS_BIAS=bias is not None,
                           BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=warps)
    return y


def conv_bwd(x, weight, bias, dy, reverse, silu):
    """Gradients (dx dense in x's stride order and x's dtype; dw (dim, K), db (dim,) in float32)."""
    batch, dim, L = x.shape
    K = weight.shape[-1]
    weight = weight.contiguous()
    g = _dense_like(x)
    BLOCK_L, BLOCK_D, warps = _blocks(x)
    grid = (triton.cdiv(L, BLOCK_L), triton.cdiv(dim, BLOCK_D), batch)
    dw = torch.empty(batch * grid[0], K, dim, device=x.device, dtype=torch.float32)
    db = torch.empty(batch * grid[0], dim, device=x.device, dtype=torch.float32)
    _conv_bwd_kernel[grid](x, weight, bias if bias is not None else weight, dy, g, dw, db, L, dim,
                           x.stride(0), x.stride(2), x.stride(1), dy.stride(0), dy.stride(2), dy.stride(1),
                           g.stride(0), g.stride(2), g.stride(1), K=K, REVERSE=reverse, SILU=silu,
                           HAS_BIAS=bias is not None, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=warps)
    # dx[t] = sum_j w[j] g[t - o_j]: the conv of g with the taps of the other direction, no bias or SiLU
    dx = conv_fwd(g, weight, None, not reverse, False)
    return dx, dw.sum(0).t(), db.sum(0)
