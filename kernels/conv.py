"""Mamba's depthwise causal conv1d (the `causal_conv1d_fn` of the causal-conv1d package), without its CUDA
extension: the Triton kernels of `triton_conv` on CUDA, `F.conv1d` elsewhere.

    y = causal_conv1d(x, weight, bias=None, activation=None, reverse=False)

x: (batch, dim, L), any strides (a channels-last view, ``x_cl.transpose(1, 2)`` of (batch, L, dim), is read
as it is and is the fast layout on CUDA); weight: (dim, K) or a Conv1d's (dim, 1, K); bias: (dim,);
activation: None or "silu" ("swish"). ``reverse=True`` is the anti-causal conv (position t sees t .. t+K-1
with the taps in reverse order), i.e. the causal conv of the flipped sequence, flipped back, with no copies:
Vim's backward direction. y has x's shape and dtype, laid out densely in x's stride order.
On CUDA the kernels are two custom ops (torch.library): torch.compile sees only their shapes and strides, so
compiled inference and training run the same kernels as eager.
"""
from typing import Optional, Tuple

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


# The Triton path as two opaque custom ops: under torch.compile Inductor sees only their fake (shape and
# stride) implementations, so it can neither lay the kernels' inputs out differently from what the wrappers
# read as strides nor clone their output buffers into other layouts.
@torch.library.custom_op("vssm::causal_conv1d_fwd", mutates_args=())
def _conv_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool,
                 reverse: bool) -> torch.Tensor:
    from .triton_conv import conv_fwd
    return conv_fwd(x, weight, bias, reverse, silu)


@_conv_fwd_op.register_fake
def _(x, weight, bias, silu, reverse):
    from .triton_step import _dense_like
    return _dense_like(x)


@torch.library.custom_op("vssm::causal_conv1d_bwd", mutates_args=())
def _conv_bwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dy: torch.Tensor, silu: bool,
                 reverse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_conv import conv_bwd
    dx, dw, db = conv_bwd(x, weight, bias, dy, reverse, silu)
    return dx, dw.contiguous(), db


@_conv_bwd_op.register_fake
def _(x, weight, bias, dy, silu, reverse):
    from .triton_step import _dense_like
    dim, K = weight.shape[0], weight.shape[-1]
    return _dense_like(x), x.new_empty(dim, K, dtype=torch.float32), x.new_empty(dim, dtype=torch.float32)


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, silu, reverse = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu, ctx.reverse = silu, reverse


def _conv_backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = _conv_bwd_op(x, weight, bias, dy, ctx.silu, ctx.reverse)
    return dx, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else None, None, None


_conv_fwd_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


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
    if scan_backend(x.device, x.dtype, backend) == "torch":
        return causal_conv1d_ref(x, weight, bias, activation, reverse)
    if not torch.compiler.is_compiling() and not _needs_grad(x, weight, bias):
        from .triton_conv import conv_fwd  # eager inference: the kernel without the custom op's dispatch
        return conv_fwd(x, weight, bias, reverse, silu)
    return _conv_fwd_op(x, weight, bias, silu, reverse)
