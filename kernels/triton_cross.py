"""Triton cross-scan and cross-merge copies (VMamba's four scan orders of an H x W map), with autograd.

For a row-major position p = h * W + w of an L = H * W map, the four orders place it at

    k=0: p        k=1: q = w * H + h        k=2: L - 1 - p        k=3: L - 1 - q

cross_scan writes x[p] to those four places of a (batch, 4, C, L) tensor; cross_merge, its adjoint, sums the
four back into (batch, C, L). One program handles BLOCK positions of one (batch, channel) row.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _cross_scan_kernel(x_ptr, out_ptr, C, H, W, BLOCK: tl.constexpr):
    """x (batch, C, L) -> out (batch, 4, C, L)."""
    row = tl.program_id(0).to(tl.int64)  # batch * C + channel
    L = H * W
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = p < L
    q = (p % W) * H + p // W
    v = tl.load(x_ptr + row * L + p, mask=mask)
    base = out_ptr + ((row // C) * 4 * C + row % C) * L
    tl.store(base + p, v, mask=mask)
    tl.store(base + C * L + q, v, mask=mask)
    tl.store(base + 2 * C * L + (L - 1 - p), v, mask=mask)
    tl.store(base + 3 * C * L + (L - 1 - q), v, mask=mask)


@triton.jit
def _cross_merge_kernel(y_ptr, out_ptr, C, H, W, BLOCK: tl.constexpr):
    """y (batch, 4, C, L) -> out (batch, C, L), summed in float32."""
    row = tl.program_id(0).to(tl.int64)
    L = H * W
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = p < L
    q = (p % W) * H + p // W
    base = y_ptr + ((row // C) * 4 * C + row % C) * L
    acc = tl.load(base + p, mask=mask).to(tl.float32)
    acc += tl.load(base + C * L + q, mask=mask).to(tl.float32)
    acc += tl.load(base + 2 * C * L + (L - 1 - p), mask=mask).to(tl.float32)
    acc += tl.load(base + 3 * C * L + (L - 1 - q), mask=mask).to(tl.float32)
    tl.store(out_ptr + row * L + p, acc, mask=mask)


def _launch(kernel, src, out, batch, C, H, W):
    BLOCK = 1024
    kernel[(batch * C, triton.cdiv(H * W, BLOCK))](src, out, C, H, W, BLOCK=BLOCK)
    return out


def cross_scan_fwd(x):
    batch, C, H, W = x.shape
    out = torch.empty(batch, 4, C, H * W, device=x.device, dtype=x.dtype)
    return _launch(_cross_scan_kernel, x.contiguous(), out, batch, C, H, W)


def cross_merge_fwd(y):
    batch, _, C, H, W = y.shape
    out = torch.empty(batch, C, H * W, device=y.device, dtype=y.dtype)
    return _launch(_cross_merge_kernel, y.contiguous(), out, batch, C, H, W)


class CrossScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.hw = x.shape[2:]
        return cross_scan_fwd(x)

    @staticmethod
    def backward(ctx, dy):
        batch, _, C, _ = dy.shape
        H, W = ctx.hw
        return cross_merge_fwd(dy.view(batch, 4, C, H, W)).view(batch, C, H, W)


class CrossMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        ctx.hw = y.shape[3:]
        return cross_merge_fwd(y)

    @staticmethod
    def backward(ctx, dout):
        batch, C, _ = dout.shape
        H, W = ctx.hw
        return cross_scan_fwd(dout.view(batch, C, H, W)).view(batch, 4, C, H, W)
