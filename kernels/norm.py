"""LayerNorm over the last dimension: the Triton kernels of `triton_norm` on CUDA, `F.layer_norm` elsewhere.

    y = layer_norm(x, weight, bias, eps=1e-5, out_dtype=None)

x: (..., C) with any strides (a permuted channels-first map is read as it is); weight, bias: (C,).
The result is contiguous, in ``out_dtype`` if given, else in the dtype F.layer_norm gives (float32 under
CUDA autocast, x's dtype otherwise). Under torch.compile the torch path is taken, which Inductor fuses itself.
"""
import torch
import torch.nn.functional as F

from .scan import scan_backend

__all__ = ["layer_norm"]


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
