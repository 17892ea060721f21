"""Mamba's inner path in one autograd node: one direction of a Mamba block (causal conv, projections and
selective scan).

    y = mamba_inner(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D=None,
                    reverse=False)

is, for x and z (batch, L, dim) (any strides: Vim passes the two halves of its in_proj output),

    x'        = silu(causal_conv1d(x))                       (anti-causal when reverse)
    dt, B, C  = split(x' @ x_proj_weight.T, [R, N, N])       (x_proj_weight (R + 2N, dim))
    delta     = dt @ dt_proj_weight.T                        (dt_proj_weight (dim, R))
    y         = selective_scan(x', delta, A, B, C, D, z, delta_bias=dt_proj_bias, delta_softplus=True, reverse)

returned as (batch, L, dim) in x's dtype: mamba_ssm's ``mamba_inner_fn`` without the in/out projections, with x
and z given apart and a reverse direction. The projections run in x's dtype (the weights are cast to it, as
autocast would). On CUDA the whole path is one autograd node whose backward recomputes x', the projections and
delta from the saved inputs, so training keeps none of them, and the host launches a few kernels instead of
the ~25 autograd nodes of the composed path, which bound Vim's eager training step by the CPU (BENCHMARKS.md).
Eager training enters it through an autograd.Function, torch.compile through two custom ops (forward and
backward) that Inductor sees as opaque; both run `_inner_forward` and `_inner_backward`. Elsewhere it is that
composition of `causal_conv1d` and `selective_scan` (their PyTorch references). The fused path serves state
sizes N >= 8 (the stepped scan kernels); smaller N composes the general kernels.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F

from .conv import causal_conv1d
from .scan import (_check_tensors, _count_flops, _expect, _flop_counters, _needs_grad, _prepare,
                   scan_backend, selective_scan)

__all__ = ["mamba_inner"]


def _check_inner(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D):
    fn = "mamba_inner"
    _check_tensors(fn, dict(x=x, z=z, conv_weight=conv_weight, conv_bias=conv_bias, x_proj_weight=x_proj_weight,
                            dt_proj_weight=dt_proj_weight, dt_proj_bias=dt_proj_bias, A=A, D=D),
                   required=("x", "z", "conv_weight", "x_proj_weight", "dt_proj_weight", "A"))
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be (batch, L, dim), got shape {tuple(x.shape)}")
    batch, L, dim = x.shape
    _expect(fn, "z", z, (batch, L, dim), "(batch, L, dim) like x")
    if conv_weight.shape not in ((dim, conv_weight.shape[-1]), (dim, 1, conv_weight.shape[-1])):
        raise ValueError(f"{fn}: conv_weight must be (dim, K) or (dim, 1, K) with dim = {dim}, got shape "
                         f"{tuple(conv_weight.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"{fn}: A must be (dim, N) with dim = {dim}, got shape {tuple(A.shape)}")
    if dt_proj_weight.dim() != 2 or dt_proj_weight.shape[0] != dim:
        raise ValueError(f"{fn}: dt_proj_weight must be (dim, dt_rank) with dim = {dim}, got shape "
                         f"{tuple(dt_proj_weight.shape)}")
    R, N = dt_proj_weight.shape[1], A.shape[1]
    _expect(fn, "x_proj_weight", x_proj_weight, (R + 2 * N, dim), "(dt_rank + 2 * N, dim)")
    for name, t in dict(conv_bias=conv_bias, dt_proj_bias=dt_proj_bias, D=D).items():
        _expect(fn, name, t, (dim,), "(dim,)")


def _composed(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reverse, backend):
    """The path as separate ops (CPU, or backend="torch"): every intermediate kept by autograd."""
    R, N = dt_proj_weight.shape[1], A.shape[1]
    xc = causal_conv1d(x.transpose(1, 2), conv_weight, conv_bias, "silu", reverse, backend).transpose(1, 2)
    x_dbl = F.linear(xc, x_proj_weight.to(xc.dtype))
    delta = F.linear(x_dbl[..., :R], dt_proj_weight.to(xc.dtype))
    y = selective_scan(xc.transpose(1, 2), delta.transpose(1, 2), A, x_dbl[..., R:R + N].transpose(1, 2),
                       x_dbl[..., R + N:].transpose(1, 2), D, z.transpose(1, 2), dt_proj_bias, delta_softplus=True,
                       reverse=reverse, backend=backend)
    return y.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# the fused path's gradients as its custom ops declare them: one per input, in the input's shape and dtype,
# contiguous (Inductor reads them at the fake implementation's strides), and for an absent input a fresh empty
# tensor like x (a custom op's outputs may not alias one another)
# ---------------------------------------------------------------------------------------------------------
def _as_declared(grads, inputs, x):
    return [g.reshape(t.shape).to(t.dtype).contiguous() if t is not None else x.new_empty(0)
            for g, t in zip(grads, inputs)]


def _declared_like(inputs, x):
    """The fake implementations' gradients: empty tensors shaped as `_as_declared` returns them."""
    return [t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in inputs]


def _for_present(grads, inputs):
    """The gradients autograd takes back: None for the inputs that were None."""
    return tuple(g if t is not None else None for g, t in zip(grads, inputs))


# ---------------------------------------------------------------------------------------------------------
# the fused path: forward and backward as plain functions of the Triton kernels
# ---------------------------------------------------------------------------------------------------------
def _projections(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, reverse):
    """x' (batch, L, dim) dense, x_dbl = x' @ x_proj_weight.T (batch, L, R + 2N) and delta (batch, L, dim)."""
    from .triton_conv import conv_fwd
    dim, K = conv_weight.shape[0], conv_weight.shape[-1]
    xc = conv_fwd(x.transpose(1, 2), conv_weight.reshape(dim, K), conv_bias, reverse, True).transpose(1, 2)
    x_dbl = F.linear(xc, x_proj_weight.to(xc.dtype))
    delta = F.linear(x_dbl[..., :dt_proj_weight.shape[1]], dt_proj_weight.to(xc.dtype))
    return xc, x_dbl, delta


def _scan_inputs(xc, x_dbl, delta, A, D, z, dt_proj_bias):
    """The scan kernels for these shapes and their inputs; B and C copied together into one (batch, L, 2N)
    block (their states contiguous, which the stepped kernels read as vectors)."""
    N = A.shape[1]
    BC = x_dbl[..., x_dbl.shape[-1] - 2 * N:].contiguous()
    B, C = (t.transpose(1, 2).unsqueeze(1) for t in (BC[..., :N], BC[..., N:]))
    return _prepare(xc.transpose(1, 2), delta.transpose(1, 2), A, B, C, D, z.transpose(1, 2), dt_proj_bias, None)


def _inner_forward(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reverse):
    xc, x_dbl, delta = _projections(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, reverse)
    kernels, inputs = _scan_inputs(xc, x_dbl, delta, A, D, z, dt_proj_bias)
    y, _, _ = kernels.scan_fwd(*inputs, True, reverse, None)
    return y.transpose(1, 2).contiguous()  # (already so: dense in u's channels-last order)


def _inner_backward(dy, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reverse):
    """Gradients (dx, dz, dconv_weight, dconv_bias, dx_proj_weight, ddt_proj_weight, ddt_proj_bias, dA, dD),
    each in its input's dtype; those of absent optional inputs are empty tensors."""
    from .triton_conv import conv_bwd
    xc, x_dbl, delta = _projections(x, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, reverse)
    kernels, inputs = _scan_inputs(xc, x_dbl, delta, A, D, z, dt_proj_bias)
    dxc, ddelta, dA, dB, dC, dD, dz, dbias = kernels.scan_bwd(dy.transpose(1, 2), None, *inputs, True, reverse, None)
    batch, L, dim = x.shape
    R, dtype = dt_proj_weight.shape[1], xc.dtype
    rows = lambda t: t.reshape(batch * L, t.shape[-1])  # noqa: E731  (batch, L, c) -> (batch * L, c)
    ddelta = rows(ddelta.transpose(1, 2))
    dx_dbl = torch.cat([ddelta @ dt_proj_weight.to(dtype), rows(dB[:, 0].transpose(1, 2)).to(dtype),
                        rows(dC[:, 0].transpose(1, 2)).to(dtype)], -1)
    ddt_proj_weight = ddelta.t() @ rows(x_dbl)[:, :R]
    dx_proj_weight = dx_dbl.t() @ rows(xc)
    dxc = torch.addmm(rows(dxc.transpose(1, 2)), dx_dbl, x_proj_weight.to(dtype))
    dx, dconv_weight, dconv_bias = conv_bwd(x.transpose(1, 2), conv_weight.reshape(dim, -1), conv_bias,
                                            dxc.view(batch, L, dim).transpose(1, 2), reverse, True)
    grads = [dx.transpose(1, 2), dz.transpose(1, 2), dconv_weight, dconv_bias, dx_proj_weight, ddt_proj_weight, dbias,
             dA, dD]
    return _as_declared(grads, (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D),
                        x)


@torch.library.custom_op("vssm::mamba_inner_fwd", mutates_args=())
def _inner_fwd_op(x: torch.Tensor, z: torch.Tensor, conv_weight: torch.Tensor, conv_bias: Optional[torch.Tensor],
                  x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor, dt_proj_bias: Optional[torch.Tensor],
                  A: torch.Tensor, D: Optional[torch.Tensor], reverse: bool) -> torch.Tensor:
    return _inner_forward(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reverse)


@_inner_fwd_op.register_fake
def _(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reverse):
    return x.new_empty(x.shape)


@torch.library.custom_op("vssm::mamba_inner_bwd", mutates_args=())
def _inner_bwd_op(dy: torch.Tensor, x: torch.Tensor, z: torch.Tensor, conv_weight: torch.Tensor,
                  conv_bias: Optional[torch.Tensor], x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor,
                  dt_proj_bias: Optional[torch.Tensor], A: torch.Tensor, D: Optional[torch.Tensor],
                  reverse: bool) -> List[torch.Tensor]:
    return _inner_backward(dy, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D,
                           reverse)


@_inner_bwd_op.register_fake
def _(dy, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reverse):
    return _declared_like((x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D),
                          x)


def _inner_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-1])
    ctx.reverse = inputs[-1]


def _inner_autograd_backward(ctx, dy):
    saved = ctx.saved_tensors
    return (*_for_present(_inner_bwd_op(dy, *saved, ctx.reverse), saved), None)


_inner_fwd_op.register_autograd(_inner_autograd_backward, setup_context=_inner_setup_context)


class _MambaInner(torch.autograd.Function):
    """Eager training's way into the same forward and backward: an autograd.Function costs the host less per
    call than a custom op's dispatch (BENCHMARKS.md), and eager Vim's step is bound by the host."""

    @staticmethod
    def forward(ctx, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reverse):
        ctx.save_for_backward(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)
        ctx.reverse = reverse
        return _inner_forward(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D,
                              reverse)

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        return (*_for_present(_inner_backward(dy, *saved, ctx.reverse), saved), None)


def mamba_inner(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D=None, reverse=False,
                backend="auto"):
    """One direction of Mamba's conv + projections + selective scan; see the module docs. backend as for
    `selective_scan` ("auto": the fused Triton path on CUDA, the composed PyTorch path elsewhere)."""
    _check_inner(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D)
    if scan_backend(x.device, x.dtype, backend) == "torch" or A.shape[1] < 8:
        return _composed(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reverse,
                         backend)
    if _flop_counters:
        _count_flops(x.shape[0], x.shape[2], x.shape[1], A.shape[1], D is not None, True)
    args = (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, reverse)
    if torch.compiler.is_compiling():
        return _inner_fwd_op(*args)  # opaque to Inductor
    if _needs_grad(*args[:-1]):
        return _MambaInner.apply(*args)
    return _inner_forward(*args)  # eager inference: the kernels alone
