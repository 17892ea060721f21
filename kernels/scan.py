"""The public selective-scan API: argument checks, backend choice and autograd around the Triton kernels.

`selective_scan` has the semantics of mamba_ssm's `selective_scan_fn`; `cross_selective_scan` is VMamba's
SS2D core (cross-scan -> grouped scan -> cross-merge) in one fused pass.
"""
import contextlib
import os

import torch

from .reference import cross_merge_ref, cross_scan_ref, cross_selective_scan_ref, selective_scan_ref

__all__ = ["selective_scan", "cross_selective_scan", "cross_scan", "cross_merge", "scan_backend",
           "triton_available", "count_scan_flops"]

_BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def scan_backend(device, dtype=torch.float32, backend="auto"):
    """The backend ("triton" or "torch") that a scan on tensors of this device and dtype runs."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        usable = device.type == "cuda" and dtype in _TRITON_DTYPES and triton_available()
        return "triton" if usable else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if device.type != "cuda" and not _interpret():
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got device {device}; on the CPU set "
                           "TRITON_INTERPRET=1 before importing vssm to run the kernels in Triton's interpreter")
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float32/float16/bfloat16 inputs, got {dtype}")
    return "triton"


# ---------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------
def _shape(t):
    return tuple(t.shape)


def _check_tensors(fn, named, required):
    for name, t in named.items():
        if t is None:
            if name in required:
                raise TypeError(f"{fn}: {name} is required, got None")
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex():
            raise TypeError(f"{fn}: {name} must be a real floating tensor, got {t.dtype} (complex A/B/C, "
                            "as in S4D, is not supported)")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating tensor (float32/float16/bfloat16/float64), "
                            f"got {t.dtype}")
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{fn}: all tensors must be on one device, got {listing}")


def _expect(fn, name, t, shape, what):
    if t is not None and _shape(t) != tuple(shape):
        raise ValueError(f"{fn}: {name} has shape {_shape(t)}; expected {what} = {tuple(shape)}")


def _check_scan(u, delta, A, B, C, D, z, delta_bias):
    """Validate selective_scan's arguments; return B and C as (batch, G, N, L)."""
    fn = "selective_scan"
    _check_tensors(fn, dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias),
                   required=("u", "delta", "A", "B", "C"))
    if u.dim() != 3:
        raise ValueError(f"{fn}: u must be (batch, dim, L), got shape {_shape(u)}")
    batch, dim, L = u.shape
    _expect(fn, "delta", delta, (batch, dim, L), "(batch, dim, L) like u")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"{fn}: A must be (dim, N) with dim={dim}, got shape {_shape(A)}")
    N = A.shape[1]
    if B.dim() not in (3, 4):
        raise ValueError(f"{fn}: B must be (batch, N, L) or (batch, G, N, L), got shape {_shape(B)}")
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    G = B4.shape[1]
    if B4.shape[0] != batch or B4.shape[2] != N or B4.shape[3] != L:
        raise ValueError(f"{fn}: B has shape {_shape(B)}; expected (batch={batch}, N={N}, L={L}) or "
                         f"(batch={batch}, G, N={N}, L={L})")
    if G < 1 or dim % G:
        raise ValueError(f"{fn}: dim={dim} must be divisible by the number of groups G={G} of B and C")
    _expect(fn, "C", C, B.shape, "the shape of B")
    _expect(fn, "D", D, (dim,), "(dim,)")
    _expect(fn, "delta_bias", delta_bias, (dim,), "(dim,)")
    _expect(fn, "z", z, (batch, dim, L), "(batch, dim, L) like u")
    return B4, C.view(B4.shape)


def _check_cross(x, delta, A, B, C, D, delta_bias):
    fn = "cross_selective_scan"
    _check_tensors(fn, dict(x=x, delta=delta, A=A, B=B, C=C, D=D, delta_bias=delta_bias),
                   required=("x", "delta", "A", "B", "C"))
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be a (batch, dim, H, W) map, got shape {_shape(x)}")
    batch, dim, H, W = x.shape
    _expect(fn, "delta", delta, (batch, 4, dim, H, W), "(batch, 4, dim, H, W)")
    if A.dim() != 2 or A.shape[0] != 4 * dim:
        raise ValueError(f"{fn}: A must be (4 * dim, N) with dim={dim}, got shape {_shape(A)}")
    N = A.shape[1]
    _expect(fn, "B", B, (batch, 4, N, H, W), "(batch, 4, N, H, W)")
    _expect(fn, "C", C, (batch, 4, N, H, W), "(batch, 4, N, H, W)")
    _expect(fn, "D", D, (4 * dim,), "(4 * dim,)")
    _expect(fn, "delta_bias", delta_bias, (4 * dim,), "(4 * dim,)")


# ---------------------------------------------------------------------------------------------------------
# autograd around the kernels
# ---------------------------------------------------------------------------------------------------------
def _contiguous(*ts):
    return [t.contiguous() if t is not None else None for t in ts]


def _dense(t):
    """t if its elements fill their span without gaps or overlaps (in any order of dimensions, e.g.
    channels-last), else a contiguous copy."""
    span = 1
    # sorted by an int key (Dynamo in torch 2.11 refuses to sort (stride, size) tuples under fullgraph)
    for i in sorted(range(t.dim()), key=lambda i: t.stride(i)):
        if t.shape[i] == 1:
            continue
        if t.stride(i) != span:
            return t.contiguous()
        span *= t.shape[i]
    return t


def _prepare(u, delta, A, B, C, D, z, delta_bias, hw):
    """The kernels for these inputs and the inputs in the layouts they read. Plain scans with large states run
    the stepped kernels (BENCHMARKS.md) on channels-last u, delta and z (copied so where they are not) and on
    B and C with their states contiguous; other plain scans the chunked kernels on contiguous rows; the
    cross-scan the chunked kernels, every map at its strides (u and delta dense, since their gradients take
    their strides; B and C sharing strides)."""
    if hw is None and A.shape[1] >= 8:
        from . import triton_step
        cl = triton_step.channels_last
        return triton_step, (cl(u), cl(delta), *_contiguous(A), *triton_step.states_last(B, C), *_contiguous(D),
                             cl(z), *_contiguous(delta_bias))
    from . import triton_scan
    if hw is None:
        return triton_scan, _contiguous(u, delta, A, B, C, D, z, delta_bias)
    u, delta = _dense(u), _dense(delta)
    if B.stride() != C.stride():
        B, C = B.contiguous(), C.contiguous()
    A, D, delta_bias = _contiguous(A, D, delta_bias)
    return triton_scan, (u, delta, A, B, C, D, z, delta_bias)


def _in_layout_of(out, u):
    """The output in u's layout where the kernels worked on a channels-last copy of u (a dense copy)."""
    if out.stride(1) != 1 or u.stride(1) == 1:
        return out
    from .triton_step import transposed
    return transposed(out.transpose(1, 2))


def _triton_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw, out_dtype, write_last):
    """Forward only (no autograd graph): what inference calls, sparing the autograd.Function's overhead."""
    kernels, inputs = _prepare(u, delta, A, B, C, D, z, delta_bias, hw)
    out, last, _ = kernels.scan_fwd(*inputs, delta_softplus, reverse, hw, out_dtype=out_dtype, write_last=write_last)
    return _in_layout_of(out, u), last


def _needs_grad(*ts):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


class _TritonScan(torch.autograd.Function):
    """Plain scan (hw is None) or the fused 4-direction cross-scan over an (H, W) map."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw, out_dtype):
        kernels, inputs = _prepare(u, delta, A, B, C, D, z, delta_bias, hw)
        out, last, _ = kernels.scan_fwd(*inputs, delta_softplus, reverse, hw, out_dtype=out_dtype,
                                        write_last=True)
        ctx.save_for_backward(*inputs)
        ctx.options = (kernels, delta_softplus, reverse, hw)
        ctx.set_materialize_grads(False)  # dlast stays None unless the last state is used
        return _in_layout_of(out, u), last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        kernels, delta_softplus, reverse, hw = ctx.options
        if dout is None:  # only the last state was used
            dout = torch.zeros_like(u, dtype=torch.float32)  # in u's layout, which the kernels read fastest
        if dlast is not None:
            dlast = dlast.float().contiguous()
        grads = kernels.scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hw)
        du, ddelta, dA, dB, dC, dD, dz, dbias = grads
        cast = lambda g, t: g.to(t.dtype) if g is not None else None  # noqa: E731
        return (du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), dz, cast(dbias, delta_bias),
                None, None, None, None)


# ---------------------------------------------------------------------------------------------------------
# FLOP counting (for tools/flops.py: torch's FlopCounterMode counts the matmuls and convolutions, not this)
# ---------------------------------------------------------------------------------------------------------
_flop_counters = []


@contextlib.contextmanager
def count_scan_flops():
    """Count the selective scans run inside the block by the rule of Mamba's authors that VMamba's published
    FLOPs use (state-spaces/mamba#110): 9 * batch * L * dim * N, plus batch * dim * L for D and again for z.
    Yields a dict whose "flops" and "calls" grow with every scan."""
    counter = {"flops": 0, "calls": 0}
    _flop_counters.append(counter)
    try:
        yield counter
    finally:
        _flop_counters.remove(counter)


def _count_flops(batch, dim, L, N, has_D, has_z):
    flops = 9 * batch * L * dim * N + batch * dim * L * (int(has_D) + int(has_z))
    for counter in _flop_counters:
        counter["flops"] += flops
        counter["calls"] += 1


# ---------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------
# Under torch.compile the Triton path is traced (Dynamo captures the kernel launches, forward and backward);
# the reference's data-dependent chunk checks would break VMamba's graph dozens of times per block, so there
# it runs as one opaque call.
_cross_selective_scan_ref = torch.compiler.disable(cross_selective_scan_ref)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, reverse=False, backend="auto"):
    """Mamba's selective scan (S6), with mamba_ssm's ``selective_scan_fn`` semantics.

    Args:
        u, delta: (batch, dim, L) input and time step (before ``delta_bias`` and the optional softplus).
        A: (dim, N) real state matrix (diagonal per channel), usually negative.
        B, C: (batch, N, L), or grouped (batch, G, N, L) where channel d uses group d // (dim // G).
        D: (dim,) skip; z: (batch, dim, L) gate, the output is multiplied by silu(z);
        delta_bias: (dim,) added to delta before the softplus.
        return_last_state: also return the final state (batch, dim, N) in float32.
        reverse: run the recurrence from position L-1 down to 0 (no flipped copies are made).
        backend: "auto" (Triton on CUDA, the PyTorch reference elsewhere), "triton" or "torch".

    Returns:
        y (batch, dim, L) in u's dtype, and the last state if asked for. The state is kept in float32
        (float64 in the reference) whatever the input dtype.
    """
    B4, C4 = _check_scan(u, delta, A, B, C, D, z, delta_bias)
    if _flop_counters:
        _count_flops(*u.shape, A.shape[1], D is not None, z is not None)
    if scan_backend(u.device, u.dtype, backend) == "torch":
        return selective_scan_ref(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, return_last_state,
                                  reverse)
    if _needs_grad(u, delta, A, B, C, D, z, delta_bias):
        y, last = _TritonScan.apply(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, reverse, None, None)
    else:
        y, last = _triton_scan(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, reverse, None, None,
                               return_last_state)
    return (y, last) if return_last_state else y


def cross_selective_scan(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, backend="auto"):
    """VMamba's SS2D scan in one pass: the four scan orders of the map x (row-major, column-major, and both
    reversed) each run a selective scan, and their outputs are summed back in row-major order.

    Equal to ``cross_merge(selective_scan(cross_scan(x), ...))`` with every per-direction input put in its
    own scan order, but the kernels read all inputs straight from their (H, W) layout and accumulate the
    merged output, so no (batch, 4, dim, L) copy of x or of the output is made. Any strides are read as
    they are; channels-last maps (channels contiguous at each pixel, e.g. ``x.permute(0, 3, 1, 2)`` of a
    (batch, H, W, dim) tensor, delta a view of (batch, H, W, 4, dim)) are the fastest, since every scan order
    then reads whole runs of channels per position.

    Args:
        x: (batch, dim, H, W) map shared by the four directions.
        delta: (batch, 4, dim, H, W) per-direction time steps, in the map's row-major layout.
        A: (4 * dim, N); D, delta_bias: (4 * dim,), direction k owning rows k * dim ... (k + 1) * dim - 1.
        B, C: (batch, 4, N, H, W), direction k's B and C in the map's layout.
    Returns:
        (batch, dim, H, W) in float32 (float64 for float64 x), like VMamba's "oflex" output; with the Triton
        kernels in x's memory layout, and the four directions summed by atomic adds (their order, and so the
        last bit of the sum, varies between runs).
    """
    _check_cross(x, delta, A, B, C, D, delta_bias)
    if _flop_counters:
        _count_flops(x.shape[0], 4 * x.shape[1], x.shape[2] * x.shape[3], A.shape[1], D is not None, False)
    if scan_backend(x.device, x.dtype, backend) == "torch":
        return _cross_selective_scan_ref(x, delta, A, B, C, D, delta_bias, delta_softplus)
    args = (x, delta, A, B, C, D, None, delta_bias, delta_softplus, False, tuple(x.shape[2:]), torch.float32)
    if _needs_grad(x, delta, A, B, C, D, delta_bias):
        return _TritonScan.apply(*args)[0]
    return _triton_scan(*args, False)[0]


def cross_scan(x, backend="auto"):
    """(batch, C, H, W) -> (batch, 4, C, H*W): row-major, column-major, and both reversed."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"cross_scan: x must be a (batch, C, H, W) tensor, got {getattr(x, 'shape', x)}")
    if scan_backend(x.device, x.dtype, backend) == "torch":
        return cross_scan_ref(x)
    from .triton_cross import CrossScan
    return CrossScan.apply(x)


def cross_merge(y, backend="auto"):
    """(batch, 4, C, H, W), direction k stored in scan order k, -> (batch, C, H*W) row-major sum."""
    if not isinstance(y, torch.Tensor) or y.dim() != 5 or y.shape[1] != 4:
        raise ValueError(f"cross_merge: y must be a (batch, 4, C, H, W) tensor, got {getattr(y, 'shape', y)}")
    if scan_backend(y.device, y.dtype, backend) == "torch":
        return cross_merge_ref(y)
    from .triton_cross import CrossMerge
    return CrossMerge.apply(y)
