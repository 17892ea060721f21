"""Mamba's depthwise causal conv1d (the `causal_conv1d_fn` of the causal-conv1d package), without its CUDA
extension: the Triton kernels of `triton_conv` on CUDA, `F.conv1d` elsewhere.

    y = causal_conv1d(x, weight, bias=None, activation=None, reverse=False)

x: (batch, dim, L), any strides (a channels-last view, ``x_cl.transpose(1, 2)`` of (batch, L, dim), is read
as it is and is the fast layout on CUDA); weight: (dim, K) or a Conv1d's (dim, 1, K); bias: (dim,);
activation: None or "silu" ("swish"). ``reverse=True`` is the anti-causal conv (position t sees t .. t+K-1
with the taps in reverse order), i.e. the causal conv of the flipped sequence, flipped back, with no copies:
Vim's backward direction. y has x's shape and dtype, laid out densely in x's stride order.
Under torch.compile on CUDA the forward-only (inference) kernel is traced into the graph like the scan's;
where gradients are needed the PyTorch path is taken (with the autograd.Function traced, a compiled Vim's
gradients came out wrong although the conv alone compiled correctly: BENCHMARKS.md, session 10).
"""
import torch
import torch.nn.functional as F

from .scan import _check_tensors, _expect, _needs_grad, scan_backend

__all__ = ["causal_conv1d", "causal_conv1d_ref"]

_ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d_ref(x, weight, bias=None, activation=None, reverse=False):
    """The PyTorch path: F.conv1d in weight's dtype with K-1 zeros of padding, the output trimmed to the causal
    side and returned in x's dtype."""
    K = weight.shape[-1]
    w = weight.reshape(weight.shape[0], 1, K)
    y = F.conv1d(x.to(weight.dtype), w.flip(-1) if reverse else w, bias, padding=K - 1, groups=x.shape[1])
    y = y[..., K - 1:] if reverse else y[..., :x.shape[-1]]
    return (F.silu(y) if activation is not None else y).to(x.dtype)


class _TritonCausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, reverse):
        from .triton_conv import conv_fwd
        ctx.save_for_backward(x, weight, bias)
        ctx.silu, ctx.reverse = silu, reverse
        return conv_fwd(x, weight, bias, reverse, silu)

    @staticmethod
    def backward(ctx, dy):
        from .triton_conv import conv_bwd
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = conv_bwd(x, weight, bias, dy, ctx.reverse, ctx.silu)
        return dx, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else None, None, None


def causal_conv1d(x, weight, bias=None, activation=None, reverse=False, backend="auto"):
    """Depthwise causal (or with ``reverse`` anti-causal) conv1d with optional SiLU; see the module docs."""
    fn = "causal_conv1d"
    _check_tensors(fn, dict(x=x, weight=weight, bias=bias), required=("x", "weight"))
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be (batch, dim, L), got shape {tuple(x.shape)}")
    dim = x.shape[1]
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"{fn}: weight must be (dim, K) or (dim, 1, K) with dim = {dim} (x's dim 1), "
                         f"got shape {tuple(weight.shape)}")
    _expect(fn, "bias", bias, (dim,), "(dim,)")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    silu = activation is not None
    needs_grad = _needs_grad(x, weight, bias)
    if scan_backend(x.device, x.dtype, backend) == "torch" or (needs_grad and torch.compiler.is_compiling()):
        return causal_conv1d_ref(x, weight, bias, activation, reverse)
    if needs_grad:
        return _TritonCausalConv1d.apply(x, weight, bias, silu, reverse)
    from .triton_conv import conv_fwd  # inference: no autograd.Function around the kernel
    return conv_fwd(x, weight, bias, reverse, silu)
