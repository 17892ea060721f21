"""Norms over the last dimension: the Triton kernels of `triton_norm` on CUDA, PyTorch elsewhere.

    y = layer_norm(x, weight, bias, eps=1e-5, out_dtype=None)

x: (..., C) with any strides (a permuted channels-first map is read as it is); weight, bias: (C,).
The result is contiguous, in ``out_dtype`` if given, else in the dtype F.layer_norm gives (float32 under
CUDA autocast, x's dtype otherwise).

    y, r = add_rms_norm(x, residual, weight, eps=1e-5, out_dtype=None)

Mamba's pre-norm step: r = residual + x in float32 (r = x when residual is None), y = RMSNorm(r) * weight.
x, residual: (..., C) of the same shape; weight: (C,). r is float32 (the residual stream the next block
adds to); y is in ``out_dtype`` if given, else the autocast dtype under autocast (what the next matmul
casts it to anyway), else weight's dtype. Both are differentiable.

Under torch.compile both take the torch path, which Inductor fuses itself.
"""
import torch
import torch.nn.functional as F

from .scan import scan_backend

__all__ = ["layer_norm", "add_rms_norm"]


def _rows(x):
    """x (..., C) -> a (batch, P, C) view where strides allow it (else a copy)."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class _TritonLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        from .triton_norm import layer_norm_fwd
        x3 = _rows(x)
        y, mean, rstd = layer_norm_fwd(x3, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x3, weight, mean, rstd)
        ctx.shape, ctx.dtypes = x.shape, (x.dtype, weight.dtype, bias.dtype)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        from .triton_norm import layer_norm_bwd
        x3, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_bwd(dy.reshape(-1, x3.shape[-1]).contiguous(), x3, weight, mean, rstd)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        return dx.view(ctx.shape).to(x_dtype), dw.to(w_dtype), db.to(b_dtype), None, None


def layer_norm(x, weight, bias, eps=1e-5, out_dtype=None, backend="auto"):
    """LayerNorm of x over its last dimension (see the module docs); backend as for `selective_scan`."""
    C = x.shape[-1]
    if weight is None or bias is None or weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"layer_norm: weight and bias must have shape ({C},) for x of shape {tuple(x.shape)}, "
                         f"got {None if weight is None else tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    if torch.compiler.is_compiling() or scan_backend(x.device, x.dtype, backend) == "torch":
        y = F.layer_norm(x, (C,), weight, bias, eps)
        return y if out_dtype is None else y.to(out_dtype)
    if out_dtype is None:
        out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _TritonLayerNorm.apply(x, weight, bias, eps, out_dtype)
    from .triton_norm import layer_norm_fwd  # inference: no autograd.Function around the kernel
    return layer_norm_fwd(_rows(x), weight, bias, eps, out_dtype)[0].view(x.shape)


def _add_rms_norm_fwd(x, residual, weight, eps, out_dtype):
    """The forward kernel on x and residual (..., C) as contiguous rows: y, r (rows, C) and rstd (rows,)."""
    from .triton_norm import add_rms_norm_fwd
    C = x.shape[-1]
    res2 = None if residual is None else residual.reshape(-1, C).contiguous()
    return add_rms_norm_fwd(x.reshape(-1, C).contiguous(), res2, weight, eps, out_dtype)


class _TritonAddRmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, out_dtype):
        y, r, rstd = _add_rms_norm_fwd(x, residual, weight, eps, out_dtype)
        ctx.save_for_backward(r, weight, rstd)
        ctx.shape, ctx.x_dtype = x.shape, x.dtype
        ctx.res_dtype = None if residual is None else residual.dtype
        ctx.set_materialize_grads(False)  # r's gradient is often absent (the last block's): no zeros read
        return y.view(x.shape), r.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dr):
        from .triton_norm import add_rms_norm_bwd
        r, weight, rstd = ctx.saved_tensors
        C = r.shape[-1]
        dy = torch.zeros_like(r) if dy is None else dy.reshape(-1, C).contiguous()
        dr = None if dr is None else dr.reshape(-1, C).float().contiguous()
        dx, dres, dw = add_rms_norm_bwd(dy, dr, r, weight, rstd, ctx.x_dtype, ctx.res_dtype is not None)
        dres = None if dres is None else dres.view(ctx.shape).to(ctx.res_dtype)
        return dx.view(ctx.shape), dres, dw.to(weight.dtype), None, None


def add_rms_norm_ref(x, residual, weight, eps, out_dtype):
    """The PyTorch path of `add_rms_norm` (float32 arithmetic, as the kernels)."""
    r = x.float() if residual is None else residual.float() + x.float()
    return F.rms_norm(r, (r.shape[-1],), weight.float(), eps).to(out_dtype), r


def add_rms_norm(x, residual, weight, eps=1e-5, out_dtype=None, backend="auto"):
    """residual + x and its RMSNorm (see the module docs); backend as for `selective_scan`."""
    C = x.shape[-1]
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"add_rms_norm: x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or not residual.is_floating_point()):
        raise ValueError(f"add_rms_norm: residual must be a floating-point tensor of x's shape {tuple(x.shape)}, "
                         f"got {tuple(residual.shape)} {residual.dtype}")
    if weight.shape != (C,):
        raise ValueError(f"add_rms_norm: weight must have shape ({C},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if out_dtype is None and torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.get_autocast_dtype(x.device.type)
    out_dtype = out_dtype or weight.dtype
    if torch.compiler.is_compiling() or scan_backend(x.device, x.dtype, backend) == "torch":
        return add_rms_norm_ref(x, residual, weight, eps, out_dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight)):
        return _TritonAddRmsNorm.apply(x, residual, weight, eps, out_dtype)
    y, r, _ = _add_rms_norm_fwd(x, residual, weight, eps, out_dtype)  # inference: no autograd.Function
    return y.view(x.shape), r.view(x.shape)
