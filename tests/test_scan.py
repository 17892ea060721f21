"""vssm.kernels against a float64 per-position loop: the torch reference on the whole grid, the Triton
kernels (Triton's interpreter on the CPU, the compiled kernels on CUDA) on small shapes, forward and all
gradients, plus the cross-scan family and the argument checks.

Errors are ||out - truth|| / ||truth|| with the truth computed from the same (rounded) inputs in float64.
Tolerances: float32 1e-5 (state in float32 or float64); bfloat16 2e-2 (inputs, outputs and the gradients
returned for bf16 tensors are rounded to bf16, about 4e-3 each).
"""
import itertools

import pytest
import torch

from scan_truth import loop_scan, scan_orders
from vssm.kernels import (cross_merge, cross_merge_ref, cross_scan, cross_scan_ref, cross_selective_scan,
                          scan_backend, selective_scan)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def rel_err(out, truth):
    out, truth = out.double(), truth.double()
    assert torch.isfinite(out).all()
    return ((out - truth).norm() / truth.norm().clamp_min(1e-2)).item()  # A's gradient is 0 at L=1


def make_inputs(batch, dim, N, L, groups, dtype, device="cpu", D=True, z=True, bias=True, seed=0,
                softplus=True):
    """Random inputs, as mamba's models make them: A negative; delta around softplus's knee, or positive
    time steps where no softplus follows."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=g) * scale + shift)  # noqa: E731
    bc_shape = (batch, N, L) if groups == 0 else (batch, groups, N, L)
    delta = r(batch, dim, L, scale=0.5, shift=-1.0) if softplus else torch.rand(batch, dim, L, generator=g) * 0.3
    t = dict(u=r(batch, dim, L).to(dtype), delta=delta.to(dtype),
             A=-torch.rand(dim, N, generator=g) * N - 0.2, B=r(*bc_shape).to(dtype), C=r(*bc_shape).to(dtype),
             D=r(dim) if D else None, z=r(batch, dim, L).to(dtype) if z else None,
             delta_bias=(r(dim, scale=0.5) if softplus else torch.rand(dim, generator=g) * 0.1) if bias else None)
    return {k: (v.to(device).requires_grad_() if v is not None else None) for k, v in t.items()}


def check_scan(inputs, dtype, backend, softplus, reverse, last):
    present = [k for k in NAMES if inputs[k] is not None]
    truth_y, truth_h = loop_scan(**inputs, delta_softplus=softplus, reverse=reverse)
    out = selective_scan(**inputs, delta_softplus=softplus, reverse=reverse, return_last_state=last,
                         backend=backend)
    y, h = out if last else (out, None)
    assert y.dtype == inputs["u"].dtype and y.shape == inputs["u"].shape
    tol = TOL[dtype]
    assert rel_err(y, truth_y) < tol
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=gen).to(y.device)
    loss_truth = (truth_y * gy.double()).sum()
    loss = (y.double() * gy.double()).sum()
    if last:
        assert h.dtype == torch.float32 and h.shape == truth_h.shape
        assert rel_err(h, truth_h) < tol
        gh = torch.randn(h.shape, generator=gen).to(h.device)
        loss_truth = loss_truth + (truth_h * gh.double()).sum()
        loss = loss + (h.double() * gh.double()).sum()
    grads_truth = torch.autograd.grad(loss_truth, [inputs[k] for k in present])
    grads = torch.autograd.grad(loss, [inputs[k] for k in present])
    for name, g, gt in zip(present, grads, grads_truth):
        assert g.dtype == inputs[name].dtype, name
        assert rel_err(g, gt) < tol, name


# ---------------------------------------------------------------------------------------------------------
# the torch reference on the whole grid
# ---------------------------------------------------------------------------------------------------------
GRID = list(itertools.product([torch.float32, torch.bfloat16], [1, 7, 64, 257], [False, True], [0, 2],
                              [False, True]))


@pytest.mark.parametrize("dtype,L,reverse,groups,options", GRID)
def test_reference_matches_loop(dtype, L, reverse, groups, options):
    inputs = make_inputs(2, 6, 4, L, groups, dtype, D=options, z=options, bias=options, seed=L, softplus=options)
    check_scan(inputs, dtype, "torch", softplus=options, reverse=reverse, last=not options)


@pytest.mark.parametrize("option", ["D", "z", "bias", "softplus", "last"])
def test_reference_each_option_alone(option):
    inputs = make_inputs(2, 4, 3, 70, 0, torch.float32, D=option == "D", z=option == "z",
                         bias=option == "bias", seed=3, softplus=option == "softplus")
    check_scan(inputs, torch.float32, "torch", softplus=option == "softplus", reverse=False,
               last=option == "last")


def test_reference_takes_channels_last_views():
    """Vim hands the scan (batch, L, dim) activations transposed to (batch, dim, L): same result as dense."""
    inputs = make_inputs(2, 6, 4, 40, 0, torch.float32, seed=7)
    views = {k: (v.detach().transpose(1, 2).contiguous().transpose(1, 2) if v is not None and v.dim() == 3 else v)
             for k, v in inputs.items()}
    assert not views["u"].is_contiguous() and not views["B"].is_contiguous()
    for reverse in (False, True):
        dense = selective_scan(**inputs, delta_softplus=True, reverse=reverse, backend="torch")
        strided = selective_scan(**views, delta_softplus=True, reverse=reverse, backend="torch")
        torch.testing.assert_close(strided, dense, rtol=1e-6, atol=1e-6)


def test_reference_inference_path_and_strided_gradients():
    """Without autograd the reference keeps no states and gives the same y. Its written-out backward takes
    output gradients in any layout: y.sum()'s (expanded) and, through a channels-last gate z, a channels-last
    one, with the results of a dense gradient."""
    inputs = make_inputs(2, 6, 4, 50, 2, torch.float32, seed=11)
    inputs["z"] = inputs["z"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    for z in (None, inputs["z"]):
        args = dict(inputs, z=z)
        present = [v for v in args.values() if v is not None]
        for reverse in (False, True):
            y = selective_scan(**args, delta_softplus=True, reverse=reverse, backend="torch")
            with torch.no_grad():
                y_inf = selective_scan(**args, delta_softplus=True, reverse=reverse, backend="torch")
            torch.testing.assert_close(y_inf, y.detach(), rtol=0, atol=0)
            strided = torch.autograd.grad(y.sum(), present, retain_graph=True)
            dense = torch.autograd.grad(y, present, torch.ones_like(y).contiguous())
            for a, b in zip(strided, dense):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reverse", [False, True])
def test_reference_exact_for_steep_decay(reverse):
    """delta * A of hundreds per step in one channel: its closed form would overflow, so its rows step
    through each chunk while the other channels' rows keep the closed form."""
    inputs = make_inputs(2, 3, 2, 100, 0, torch.float32, seed=5)
    with torch.no_grad():
        inputs["delta"][:, 1].mul_(0).add_(torch.rand_like(inputs["delta"][:, 1]) * 40 + 20)
        inputs["A"].mul_(10)
    check_scan(inputs, torch.float32, "torch", softplus=True, reverse=reverse, last=True)


# ---------------------------------------------------------------------------------------------------------
# the Triton kernels (interpreter on the CPU); small shapes
# ---------------------------------------------------------------------------------------------------------
TRITON_GRID = [
    # dtype, L, reverse, groups, options, N; N < 8 runs the chunked kernels, N >= 8 the stepped ones
    (torch.float32, 1, False, 0, True, 4),
    (torch.float32, 7, True, 2, True, 4),
    (torch.float32, 64, False, 2, False, 1),
    (torch.float32, 257, False, 0, True, 4),
    (torch.float32, 257, True, 2, False, 3),
    (torch.bfloat16, 7, False, 0, True, 4),
    (torch.bfloat16, 130, True, 2, True, 2),
    (torch.bfloat16, 64, True, 0, False, 16),
    (torch.float32, 1, False, 2, True, 16),
    (torch.float32, 7, True, 2, True, 8),
    (torch.float32, 257, False, 0, True, 16),
    (torch.float32, 100, True, 2, False, 16),
    (torch.bfloat16, 40, False, 2, True, 16),
    (torch.float32, 33, True, 0, True, 12),  # N below its power-of-two block
]


@pytest.mark.parametrize("dtype,L,reverse,groups,options,N", TRITON_GRID)
def test_triton_matches_loop(dtype, L, reverse, groups, options, N):
    inputs = make_inputs(2, 6, N, L, groups, dtype, device=DEVICE, D=options, z=options, bias=options, seed=L,
                         softplus=options)
    check_scan(inputs, dtype, "triton", softplus=options, reverse=reverse, last=True)


@pytest.mark.parametrize("N", [2, 16])
def test_triton_blocks_within_groups(N):
    """dim // G = 3 channels per group: blocks must not mix two groups' B and C."""
    inputs = make_inputs(1, 12, N, 40, 4, torch.float32, device=DEVICE, seed=11)
    check_scan(inputs, torch.float32, "triton", softplus=True, reverse=False, last=False)


@pytest.mark.skipif(not CUDA, reason="realistic shapes need the GPU")
@pytest.mark.parametrize("shape", [(4, 384, 16, 197, 0), (2, 192, 1, 3136, 1), (2, 384, 16, 1025, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_realistic_shapes_cuda(shape, dtype):
    batch, dim, N, L, groups = shape
    inputs = make_inputs(batch, dim, N, L, groups, dtype, device="cuda", seed=7)
    ref = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y = selective_scan(**inputs, delta_softplus=True, backend="triton")
    y_ref = selective_scan(**ref, delta_softplus=True, backend="torch")
    assert rel_err(y, y_ref) < TOL[dtype]
    gy = torch.randn_like(y)
    present = [k for k in NAMES if inputs[k] is not None]
    grads = torch.autograd.grad(y, [inputs[k] for k in present], gy)
    grads_ref = torch.autograd.grad(y_ref, [ref[k] for k in present], gy)
    for name, g, gr in zip(present, grads, grads_ref):
        assert rel_err(g, gr) < TOL[dtype], name


# ---------------------------------------------------------------------------------------------------------
# cross-scan, cross-merge and the fused four-direction scan
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cross_scan_orders(backend):
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    xs = cross_scan(x, backend=backend)
    assert xs.shape == (2, 4, 3, 20)
    torch.testing.assert_close(xs, scan_orders(x[:, None].expand(2, 4, 3, 4, 5)), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cross_merge_is_adjoint_of_cross_scan(backend):
    """<cross_scan(x), y> == <x, cross_merge(y)> for random x and y, and the gradients are each other."""
    x = torch.randn(2, 3, 6, 5, device=DEVICE, dtype=torch.float64 if backend == "torch" else torch.float32)
    y = torch.randn(2, 4, 3, 6, 5, device=DEVICE, dtype=x.dtype)
    lhs = (cross_scan(x, backend=backend) * y.flatten(3)).sum()
    rhs = (x.flatten(2) * cross_merge(y, backend=backend)).sum()
    torch.testing.assert_close(lhs, rhs)
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(cross_scan(xg, backend=backend), xg, y.flatten(3))
    torch.testing.assert_close(gx.flatten(2), cross_merge_ref(y))
    yg = y.clone().requires_grad_()
    gout = torch.randn(2, 3, 30, device=DEVICE, dtype=x.dtype)
    (gy,) = torch.autograd.grad(cross_merge(yg, backend=backend), yg, gout)
    torch.testing.assert_close(gy.flatten(3), cross_scan_ref(gout.view(2, 3, 6, 5)))


def cross_inputs(batch, dim, N, H, W, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(x=r(batch, dim, H, W).to(dtype), delta=(r(batch, 4, dim, H, W) * 0.5 - 1).to(dtype),
             A=-torch.rand(4 * dim, N, generator=g) * N - 0.2, B=r(batch, 4, N, H, W).to(dtype),
             C=r(batch, 4, N, H, W).to(dtype), D=r(4 * dim), delta_bias=r(4 * dim) * 0.5)
    return {k: v.to(device).requires_grad_() for k, v in t.items()}


def cross_truth(x, delta, A, B, C, D, delta_bias):
    """The unfused definition, from the float64 loop: scan orders, one grouped scan, un-order and sum."""
    batch, dim, H, W = x.shape
    xs = scan_orders(x[:, None].expand(batch, 4, dim, H, W)).reshape(batch, 4 * dim, H * W)
    ys, _ = loop_scan(xs, scan_orders(delta).reshape(batch, 4 * dim, -1), A, scan_orders(B), scan_orders(C),
                      D, None, delta_bias, delta_softplus=True)
    return cross_merge_ref(ys.view(batch, 4, dim, H, W)).view(batch, dim, H, W)


@pytest.mark.parametrize("backend,dtype,N,hw", [("torch", torch.float32, 2, (5, 7)),
                                                 ("torch", torch.bfloat16, 1, (9, 4)),
                                                 ("triton", torch.float32, 1, (5, 7)),
                                                 ("triton", torch.float32, 4, (3, 29)),
                                                 ("triton", torch.bfloat16, 1, (11, 8))])
def test_cross_selective_scan_matches_unfused(backend, dtype, N, hw):
    inputs = cross_inputs(2, 6, N, *hw, dtype, DEVICE if backend == "triton" else "cpu")
    truth = cross_truth(**inputs)
    out = cross_selective_scan(**inputs, delta_softplus=True, backend=backend)
    assert out.dtype == torch.float32 and out.shape == inputs["x"].shape
    assert rel_err(out, truth) < TOL[dtype]
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device)
    grads = torch.autograd.grad(out, list(inputs.values()), gy)
    grads_truth = torch.autograd.grad(truth, list(inputs.values()), gy.double())
    for name, g, gt in zip(inputs, grads, grads_truth):
        assert g.dtype == inputs[name].dtype, name
        assert rel_err(g, gt) < TOL[dtype], name


def channels_last_views(inputs):
    """The same values stored as VMamba's SS2D makes them: x a (batch, H, W, dim) map, delta
    (batch, H, W, 4, dim), B and C two slices of one (batch, H, W, 4, 2N + 1) projection output (not dense).
    Returns the leaves (to take gradients of) and the views that the scan gets."""
    x, delta, B, C = (inputs[k].detach() for k in ("x", "delta", "B", "C"))
    N = B.shape[2]
    x_cl = x.permute(0, 2, 3, 1).contiguous().requires_grad_()
    delta_cl = delta.permute(0, 3, 4, 1, 2).contiguous().requires_grad_()
    proj = torch.cat([B, C, torch.randn_like(B[:, :, :1])], 2).permute(0, 3, 4, 1, 2).contiguous().requires_grad_()
    views = dict(x=x_cl.permute(0, 3, 1, 2), delta=delta_cl.permute(0, 3, 4, 1, 2),
                 B=proj[..., :N].permute(0, 3, 4, 1, 2), C=proj[..., N:2 * N].permute(0, 3, 4, 1, 2))
    return dict(x=x_cl, delta=delta_cl, proj=proj), views


@pytest.mark.parametrize("backend,dtype,N,hw", [("torch", torch.float32, 1, (5, 7)),
                                                 ("triton", torch.float32, 1, (5, 7)),
                                                 ("triton", torch.float32, 2, (3, 29)),
                                                 ("triton", torch.bfloat16, 1, (11, 8))])
def test_cross_selective_scan_channels_last(backend, dtype, N, hw):
    """Strided channels-last inputs give the truth's output and gradients; out and the gradient of x keep
    x's channels-last layout."""
    inputs = cross_inputs(2, 40, N, *hw, dtype, DEVICE if backend == "triton" else "cpu")
    truth = cross_truth(**inputs)
    leaves, views = channels_last_views(inputs)
    rest = {k: inputs[k] for k in ("A", "D", "delta_bias")}
    out = cross_selective_scan(**views, **rest, delta_softplus=True, backend=backend)
    assert rel_err(out, truth) < TOL[dtype]
    if backend == "triton":
        assert out.permute(0, 2, 3, 1).is_contiguous()
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device)
    g_x, g_delta, g_proj, g_A, g_D, g_bias = torch.autograd.grad(out, [*leaves.values(), *rest.values()], gy)
    truth_grads = dict(zip(inputs, torch.autograd.grad(truth, list(inputs.values()), gy.double())))
    N = inputs["B"].shape[2]
    got = dict(x=g_x.permute(0, 3, 1, 2), delta=g_delta.permute(0, 3, 4, 1, 2), A=g_A, D=g_D, delta_bias=g_bias,
               B=g_proj[..., :N].permute(0, 3, 4, 1, 2), C=g_proj[..., N:2 * N].permute(0, 3, 4, 1, 2))
    assert (g_proj[..., 2 * N:] == 0).all()
    for name, g in got.items():
        assert rel_err(g, truth_grads[name]) < TOL[dtype], name


@pytest.mark.parametrize("N", [2, 16])
def test_triton_backward_takes_strided_output_gradients(N):
    """The output gradient arrives transposed (not contiguous): the chunked kernels (N = 2) read it at its
    strides, and so do the stepped ones (N = 16); both give the truth's gradients."""
    inputs = make_inputs(2, 8, N, 37, 0, torch.float32, DEVICE)
    weight = torch.randn(37, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    y = selective_scan(**inputs, delta_softplus=True, backend="triton")
    truth, _ = loop_scan(**inputs, delta_softplus=True)
    present = [k for k in NAMES if inputs[k] is not None]
    grads = torch.autograd.grad((y.transpose(1, 2) * weight).sum(), [inputs[k] for k in present])
    grads_truth = torch.autograd.grad((truth.transpose(1, 2) * weight.double()).sum(), [inputs[k] for k in present])
    for name, g, gt in zip(present, grads, grads_truth):
        assert rel_err(g, gt) < TOL[torch.float32], name


@pytest.mark.parametrize("reverse, L", [(False, 29), (True, 29), (False, 151), (True, 151)])
def test_triton_stepped_channels_last_views(reverse, L):
    """The layout Vim passes: u, delta and z as (batch, dim, L) views of channels-last (batch, L, ...) tensors
    (z and u not dense: halves of one projection), B and C as views of one (batch, L, R + 2N) projection with
    their states contiguous. Same truth, forward and every gradient. L = 151 splits the sequence into three
    segments, forward and backward (few programs here), the last of odd length (the forward walks two steps
    at a time)."""
    batch, dim, N, R = 2, 40, 16, 3
    g = torch.Generator().manual_seed(5)
    xz = torch.randn(batch, L, 2 * dim, generator=g).to(DEVICE).requires_grad_()
    proj = torch.randn(batch, L, R + 2 * N, generator=g).to(DEVICE).requires_grad_()
    delta = (torch.randn(batch, L, dim, generator=g) * 0.5 - 1).to(DEVICE).requires_grad_()
    params = dict(A=-torch.rand(dim, N, generator=g) * N - 0.2, D=torch.randn(dim, generator=g),
                  delta_bias=torch.randn(dim, generator=g) * 0.5)
    params = {k: v.to(DEVICE).requires_grad_() for k, v in params.items()}

    def views():
        u, z = xz.transpose(1, 2).chunk(2, dim=1)
        return dict(u=u, z=z, delta=delta.transpose(1, 2), B=proj[..., R:R + N].transpose(1, 2),
                    C=proj[..., R + N:].transpose(1, 2), **params)

    leaves = [xz, proj, delta, *params.values()]
    y = selective_scan(**views(), delta_softplus=True, reverse=reverse, backend="triton")
    truth, _ = loop_scan(**views(), delta_softplus=True, reverse=reverse)
    assert rel_err(y, truth) < TOL[torch.float32]
    gy = torch.randn(y.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad((y * gy).sum(), leaves)
    grads_truth = torch.autograd.grad((truth * gy.double()).sum(), leaves)
    for name, gr, gt in zip(["xz", "proj", "delta", *params], grads, grads_truth):
        assert rel_err(gr, gt) < TOL[torch.float32], name


@pytest.mark.parametrize("N", [4, 16])
def test_triton_gradients_through_the_last_state_alone(N):
    """y unused, only the last state in the loss: the backward gets no dout (it scans zeros) and must still give
    every gradient of the truth; chunked (N = 4) and stepped (N = 16) kernels."""
    inputs = make_inputs(2, 8, N, 37, 0, torch.float32, DEVICE)
    _, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="triton")
    _, truth = loop_scan(**inputs, delta_softplus=True)
    gh = torch.randn(last.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    names = ["u", "delta", "A", "B", "delta_bias"]  # the last state does not depend on C, D or z
    grads = torch.autograd.grad((last * gh).sum(), [inputs[k] for k in names])
    grads_truth = torch.autograd.grad((truth * gh.double()).sum(), [inputs[k] for k in names])
    for name, g, gt in zip(names, grads, grads_truth):
        assert rel_err(g, gt) < TOL[torch.float32], name
    _, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="triton")
    for name, g in zip("CDz", torch.autograd.grad((last * gh).sum(), [inputs[k] for k in "CDz"])):
        assert torch.count_nonzero(g) == 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_copy(dtype):
    """The stepped kernels' layout copy: (batch, X, Y) at any strides -> dense (batch, Y, X), bit for bit,
    across tile edges (X, Y not multiples of the 64 x 64 tiles)."""
    from vssm.kernels.triton_step import transposed
    x = torch.randn(3, 150, 70, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    for view in (x, x[:, 5:140:2], x.transpose(1, 2)):
        y = transposed(view)
        assert y.is_contiguous() and y.dtype == dtype
        assert torch.equal(y, view.transpose(1, 2))


def test_triton_stepped_output_takes_the_input_layout():
    """mamba_ssm's layout, contiguous (batch, dim, L): the stepped kernels scan channels-last copies and hand
    y back contiguous (with the truth's values, and the truth's gradients through the copies); the
    channels-last views Vim passes get y channels-last, with no copies."""
    inputs = make_inputs(2, 8, 16, 23, 0, torch.float32, DEVICE)
    y = selective_scan(**inputs, delta_softplus=True, backend="triton")
    assert y.is_contiguous()
    truth = loop_scan(**inputs, delta_softplus=True)[0]
    assert rel_err(y, truth) < TOL[torch.float32]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)  # contiguous dout
    names = [k for k, v in inputs.items() if v is not None]
    grads = torch.autograd.grad((y * gy).sum(), [inputs[k] for k in names])
    grads_truth = torch.autograd.grad((truth * gy.double()).sum(), [inputs[k] for k in names])
    for name, gr, gt in zip(names, grads, grads_truth):
        assert rel_err(gr, gt) < TOL[torch.float32], name
    with torch.no_grad():
        assert selective_scan(**inputs, delta_softplus=True, backend="triton").is_contiguous()
    views = {k: (v.detach().transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v)
             for k, v in inputs.items()}
    assert selective_scan(**views, delta_softplus=True, backend="triton").stride(1) == 1


def test_triton_stepped_B_and_C_in_different_layouts():
    """B a states-contiguous view of a wider projection, C an ordinary (batch, N, L) tensor: the kernels read
    both at one set of strides, so they must be given a common layout (the truth, forward and gradients)."""
    inputs = make_inputs(2, 8, 16, 23, 0, torch.float32, DEVICE)
    wide = torch.randn(2, 23, 40, generator=torch.Generator().manual_seed(7)).to(DEVICE).requires_grad_()
    inputs["B"] = wide[..., 5:21].transpose(1, 2)
    y = selective_scan(**inputs, delta_softplus=True, backend="triton")
    truth, _ = loop_scan(**inputs, delta_softplus=True)
    assert rel_err(y, truth) < TOL[torch.float32]
    leaves = [wide, inputs["C"], inputs["u"]]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    grads = torch.autograd.grad((y * gy).sum(), leaves)
    grads_truth = torch.autograd.grad((truth * gy.double()).sum(), leaves)
    for name, gr, gt in zip(["B's projection", "C", "u"], grads, grads_truth):
        assert rel_err(gr, gt) < TOL[torch.float32], name


@pytest.mark.parametrize("N,last", [(1, True), (16, True), (2, False)])
def test_triton_inference_path(N, last):
    """Without gradients the kernels run outside autograd (less launch overhead): same truth, same last
    state, for the chunked (N = 1, 2) and the stepped (N = 16) kernels, and for the cross-scan."""
    inputs = {k: v.detach() if v is not None else None
              for k, v in make_inputs(2, 8, N, 37, 2, torch.float32, DEVICE).items()}
    truth_y, truth_h = loop_scan(**inputs, delta_softplus=True)
    with torch.no_grad():
        out = selective_scan(**inputs, delta_softplus=True, return_last_state=last, backend="triton")
    y, h = out if last else (out, None)
    assert not y.requires_grad and rel_err(y, truth_y) < TOL[torch.float32]
    if last:
        assert rel_err(h, truth_h) < TOL[torch.float32]
    cross = cross_inputs(2, 6, N, 5, 7, torch.float32, DEVICE)
    truth = cross_truth(**cross)
    with torch.inference_mode():
        out = cross_selective_scan(**cross, delta_softplus=True, backend="triton")
    assert not out.requires_grad and rel_err(out, truth) < TOL[torch.float32]


def test_cross_selective_scan_channels_last_wide_blocks(monkeypatch):
    """Small inputs get 8-channel blocks (too few programs otherwise); pretend there are many rows so the
    32 (forward) / 16 (backward) channel blocks of large batches run too."""
    from vssm.kernels import triton_scan
    config = triton_scan._config
    monkeypatch.setattr(triton_scan, "_config", lambda *a, **kw: config(*a, **dict(kw, rows=10 ** 6)))
    assert triton_scan._config(64, 1, 35, 64, channels_last=True)["BLOCK_D"] == 32
    test_cross_selective_scan_channels_last("triton", torch.float32, 1, (5, 7))


@pytest.mark.skipif(not CUDA, reason="realistic shapes need the GPU")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 192, 56, 56), (64, 128, 14, 14)])
def test_cross_selective_scan_realistic_cuda(channels_last, shape):
    inputs = cross_inputs(*shape[:2], 1, *shape[2:], torch.bfloat16, "cuda")
    ref = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out_ref = cross_selective_scan(**ref, delta_softplus=True, backend="torch")
    gy = torch.randn_like(out_ref)
    grads_ref = dict(zip(ref, torch.autograd.grad(out_ref, list(ref.values()), gy)))
    if channels_last:
        leaves, views = channels_last_views(inputs)
        rest = {k: inputs[k] for k in ("A", "D", "delta_bias")}
        out = cross_selective_scan(**views, **rest, delta_softplus=True, backend="triton")
        grads = dict(zip([*views, *rest], torch.autograd.grad(out, [*views.values(), *rest.values()], gy)))
    else:
        out = cross_selective_scan(**inputs, delta_softplus=True, backend="triton")
        grads = dict(zip(inputs, torch.autograd.grad(out, list(inputs.values()), gy)))
    assert rel_err(out, out_ref) < TOL[torch.bfloat16]
    for name, g in grads.items():
        assert rel_err(g, grads_ref[name]) < TOL[torch.bfloat16], name


def test_dense_layout_check():
    """The cross-scan keeps u and delta as they are when their elements fill their span in some order of
    dimensions (their gradients take those strides) and copies them otherwise."""
    from vssm.kernels.scan import _dense
    base = torch.randn(2, 5, 6, 8)
    for t in (base, base.permute(0, 3, 1, 2), base[:1].transpose(1, 3), base.unsqueeze(2)):
        assert _dense(t) is t
    for t in (base[..., :7], base[:, :1], base[:, ::2], torch.randn(3, 4).expand(2, 3, 4)):
        out = _dense(t)
        assert out is not t and out.is_contiguous() and torch.equal(out, t)


# ---------------------------------------------------------------------------------------------------------
# argument checks and backend choice
# ---------------------------------------------------------------------------------------------------------
def _good():
    return dict(u=torch.randn(2, 4, 9), delta=torch.randn(2, 4, 9), A=-torch.rand(4, 3),
                B=torch.randn(2, 3, 9), C=torch.randn(2, 3, 9))


@pytest.mark.parametrize("change,error,pattern", [
    (dict(delta=torch.randn(2, 4, 8)), ValueError, r"delta has shape \(2, 4, 8\); expected .*\(2, 4, 9\)"),
    (dict(u=torch.randn(2, 4)), ValueError, r"u must be \(batch, dim, L\), got shape \(2, 4\)"),
    (dict(A=-torch.rand(5, 3)), ValueError, r"A must be \(dim, N\) with dim=4"),
    (dict(A=torch.randn(4, 3, dtype=torch.complex64)), TypeError, r"A must be a real floating tensor"),
    (dict(u=torch.randint(0, 3, (2, 4, 9))), TypeError, r"u must be a floating tensor.*torch.int64"),
    (dict(B=torch.randn(2, 3, 3, 9), C=torch.randn(2, 3, 3, 9)), ValueError, r"dim=4 must be divisible .*G=3"),
    (dict(B=torch.randn(2, 3, 8)), ValueError, r"B has shape \(2, 3, 8\); expected \(batch=2, N=3, L=9\)"),
    (dict(C=torch.randn(2, 2, 3, 9)), ValueError, r"C has shape \(2, 2, 3, 9\); expected the shape of B"),
    (dict(D=torch.randn(3)), ValueError, r"D has shape \(3,\); expected \(dim,\)"),
    (dict(z=torch.randn(2, 4, 1)), ValueError, r"z has shape \(2, 4, 1\)"),
    (dict(delta_bias=torch.randn(4, 1)), ValueError, r"delta_bias has shape \(4, 1\)"),
    (dict(B=torch.randn(2, 3, 9).numpy()), TypeError, r"B must be a torch.Tensor"),
    (dict(C=torch.randn(2, 3, 9, device="meta")), ValueError, r"one device.*C on meta"),
])
def test_bad_arguments_are_named(change, error, pattern):
    args = {**_good(), **change}
    with pytest.raises(error, match=pattern):
        selective_scan(**args)


def test_cross_bad_arguments_are_named():
    inputs = {k: v.detach() for k, v in cross_inputs(1, 4, 1, 3, 5, torch.float32, "cpu").items()}
    with pytest.raises(ValueError, match=r"delta has shape .*expected \(batch, 4, dim, H, W\)"):
        cross_selective_scan(**{**inputs, "delta": inputs["delta"][:, :3]})
    with pytest.raises(ValueError, match=r"x must be a \(batch, dim, H, W\) map"):
        cross_selective_scan(**{**inputs, "x": inputs["x"].flatten(2)})
    with pytest.raises(ValueError, match=r"A must be \(4 \* dim, N\)"):
        cross_selective_scan(**{**inputs, "A": inputs["A"][:4]})


def test_backend_choice(monkeypatch):
    assert scan_backend("cpu") == "torch"
    assert scan_backend("cuda", torch.bfloat16) == "triton"
    assert scan_backend("cuda", torch.float64) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(**_good(), backend="cuda")
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        scan_backend("cuda", torch.float64, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        selective_scan(**_good(), backend="triton")
