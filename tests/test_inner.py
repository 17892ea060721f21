"""vssm.kernels.mamba_inner: the fused path (Triton kernels, interpreted on the CPU) against the composed PyTorch
path in float64, forward and every gradient, in both directions on Vim's layout (x and z the two halves of one
channels-last projection)."""
import pytest
import torch

import vssm.kernels.inner as inner
from vssm.kernels import mamba_inner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "z", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A", "D")


def _inputs(batch=2, L=13, dim=16, N=8, R=3, K=4, seed=0):
    """Vim-like inputs: x, z halves of a (batch, L, 2 dim) projection; the parameters in float32."""
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(batch, L, 2 * dim, generator=g)
    params = dict(conv_weight=torch.randn(dim, 1, K, generator=g) / K ** 0.5, conv_bias=torch.randn(dim, generator=g),
                  x_proj_weight=torch.randn(R + 2 * N, dim, generator=g) / dim ** 0.5,
                  dt_proj_weight=torch.randn(dim, R, generator=g) / R ** 0.5,
                  dt_proj_bias=torch.randn(dim, generator=g) * 0.5 - 2,
                  A=-torch.rand(dim, N, generator=g) * 2 - 0.5, D=torch.randn(dim, generator=g))
    return xz, params, torch.randn(batch, L, dim, generator=g)


def _run(xz, params, dy, reverse, backend, dtype=None):
    """Output and the gradients of <y, dy> for x, z (through xz's halves) and every parameter."""
    xz = xz.to(DEVICE, dtype or xz.dtype).detach().requires_grad_()
    ps = {k: v.to(DEVICE).detach().requires_grad_() if v is not None else None for k, v in params.items()}
    x, z = xz.chunk(2, dim=-1)
    x.retain_grad()
    z.retain_grad()
    y = mamba_inner(x, z, **ps, reverse=reverse, backend=backend)
    (y.to(dy.dtype) * dy.to(DEVICE)).sum().backward()
    return y, dict(x=x.grad, z=z.grad, **{k: v.grad if v is not None else None for k, v in ps.items()})


def _double(t):
    return t.double() if t is not None else None


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 4e-2)])
def test_fused_matches_composed_float64(reverse, dtype, tol):
    xz, params, dy = _inputs(seed=int(reverse))
    y, grads = _run(xz, params, dy, reverse, "triton", dtype)
    ref, ref_grads = _run(xz.double(), {k: _double(v) for k, v in params.items()}, dy.double(), reverse, "torch")
    assert y.dtype == dtype and y.shape == ref.shape
    assert (y.double().cpu() - ref.cpu()).norm() <= tol * ref.norm()
    for name in NAMES:
        g, r = grads[name], ref_grads[name]
        assert g.shape == r.shape and g.dtype == (dtype if name in "xz" else torch.float32), name
        assert (g.double().cpu() - r.cpu()).norm() <= 2 * tol * r.norm(), name


def test_inference_path_and_optional_inputs():
    """Under no_grad the kernels run outside autograd with the same values; without conv_bias and D the
    gradients of the rest still match the composed path."""
    xz, params, dy = _inputs(L=9, seed=3)
    x, z = xz.to(DEVICE).chunk(2, dim=-1)
    ps = {k: v.to(DEVICE) for k, v in params.items()}
    with torch.no_grad():
        torch.testing.assert_close(mamba_inner(x, z, **ps, backend="triton"),
                                   mamba_inner(x, z, **ps, backend="torch"), rtol=1e-4, atol=1e-5)
    params.update(conv_bias=None, D=None)
    y, grads = _run(xz, params, dy, True, "triton")
    ref, ref_grads = _run(xz.double(), {k: _double(v) for k, v in params.items()}, dy.double(), True, "torch")
    torch.testing.assert_close(y.double().cpu(), ref.cpu(), rtol=1e-4, atol=1e-4)
    for name in NAMES:
        if params.get(name, 0) is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name].double().cpu(), ref_grads[name].cpu(), rtol=1e-3, atol=1e-4,
                                       msg=name)


def test_torch_compile_runs_the_fused_op(monkeypatch):
    """Under torch.compile (fullgraph, Inductor) the fused custom ops run, forward and backward, with eager's
    values; A comes from A_log inside the graph, so Inductor's kernel for dA_log reads dA at the strides that
    the op's fake implementation declares (a transposed dA once gave wrong gradients here)."""
    xz, params, dy = _inputs(L=11, seed=4)
    params["A_log"] = params.pop("A").neg().log()

    def composed(*args, **kwargs):
        raise AssertionError("mamba_inner took its composed path under torch.compile")

    def f(xz, ps):
        x, z = (xz * 2).chunk(2, dim=-1)
        A = -torch.exp(ps["A_log"])
        return mamba_inner(x, z, A=A, **{k: v for k, v in ps.items() if k != "A_log"}, reverse=True,
                           backend="triton") * 3
    xz = xz.to(DEVICE).detach().requires_grad_()
    ps = {k: v.to(DEVICE).detach().requires_grad_() for k, v in params.items()}
    ref = f(xz, ps)
    ref_grads = torch.autograd.grad((ref * dy.to(DEVICE)).sum(), [xz, *ps.values()])
    monkeypatch.setattr(inner, "_composed", composed)
    out = torch.compile(f, fullgraph=True)(xz, ps)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((out * dy.to(DEVICE)).sum(), [xz, *ps.values()])
    for name, g, r in zip(("xz", *ps), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


def test_bad_arguments_name_the_argument():
    xz, params, _ = _inputs()
    x, z = xz.chunk(2, dim=-1)
    with pytest.raises(ValueError, match=r"z has shape \(2, 13, 15\); expected \(batch, L, dim\) like x"):
        mamba_inner(x, z[..., :15], **params)
    with pytest.raises(ValueError, match=r"x_proj_weight has shape \(18, 16\); expected \(dt_rank \+ 2 \* N, dim\)"):
        mamba_inner(x, z, **(params | dict(x_proj_weight=params["x_proj_weight"][:18])))
    with pytest.raises(ValueError, match=r"conv_weight must be \(dim, K\) or \(dim, 1, K\) with dim = 16"):
        mamba_inner(x, z, **(params | dict(conv_weight=params["conv_weight"][:8])))
    with pytest.raises(ValueError, match=r"x must be \(batch, L, dim\)"):
        mamba_inner(x[0], z[0], **params)
    with pytest.raises(TypeError, match="z is required"):
        mamba_inner(x, None, **params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: graph capture")
def test_cuda_fused_path_captures_in_a_cuda_graph():
    """Forward and backward of the fused path capture into one CUDA graph (no host-device copy or
    synchronisation inside, which capture refuses) and its replay gives the eager gradients."""
    xz, params, dy = _inputs(batch=4, L=40, dim=64, N=16, R=4)
    xz, dy = xz.cuda().requires_grad_(), dy.cuda()
    ps = {k: v.cuda().requires_grad_() for k, v in params.items()}
    leaves = [xz, *ps.values()]

    def step():
        x, z = xz.chunk(2, dim=-1)
        loss = (mamba_inner(x, z, **ps, reverse=True) * dy).sum()
        return torch.autograd.grad(loss, leaves)
    eager = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    for g, r in zip(captured, eager):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_scan_flops_are_counted_on_both_paths(backend):
    """count_scan_flops sees the scan inside the fused path as it sees the composed path's (one call, Mamba's
    9 * batch * L * dim * N rule plus D and the gate)."""
    from vssm.kernels import count_scan_flops
    xz, params, _ = _inputs()
    x, z = xz.to(DEVICE).chunk(2, dim=-1)
    with torch.no_grad(), count_scan_flops() as counter:
        mamba_inner(x, z, **{k: v.to(DEVICE) for k, v in params.items()}, backend=backend)
    (batch, L, dim), N = x.shape, params["A"].shape[1]
    assert counter == dict(flops=9 * batch * L * dim * N + 2 * batch * dim * L, calls=1)
