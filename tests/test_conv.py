"""vssm.kernels.causal_conv1d: the Triton kernels (interpreted on the CPU) and the torch path against a float64
per-position loop, forward and all gradients; causal and reversed (anti-causal), channels-first and
channels-last inputs."""
import pytest
import torch
import torch.nn.functional as F

from vssm.kernels import causal_conv1d

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def conv_loop(x, w, b, silu, reverse):
    """Ground truth, one position at a time: tap j of K reads x[t + j - (K-1)] (causal) or x[t + K-1 - j]."""
    batch, dim, L = x.shape
    K = w.shape[-1]
    out = []
    for t in range(L):
        acc = torch.zeros(batch, dim, dtype=x.dtype) + (b if b is not None else 0)
        for j in range(K):
            p = t + (K - 1 - j if reverse else j - (K - 1))
            if 0 <= p < L:
                acc = acc + w[:, j] * x[:, :, p]
        out.append(acc)
    y = torch.stack(out, dim=-1)
    return F.silu(y) if silu else y


def _inputs(batch, dim, L, K, channels_last, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, dim, generator=g, dtype=torch.float64)
    x = x.transpose(1, 2) if channels_last else x.transpose(1, 2).contiguous()
    w = torch.randn(dim, 1, K, generator=g, dtype=torch.float64) / K ** 0.5
    b = torch.randn(dim, generator=g, dtype=torch.float64) if bias else None
    return x, w, b


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("L, K, channels_last, bias, silu, reverse", [
    (1, 4, True, True, True, False), (1, 4, False, True, True, True),
    (7, 4, True, True, True, False), (7, 4, True, True, True, True),
    (70, 4, False, True, True, False), (70, 4, False, True, True, True),
    (70, 4, True, False, False, True), (37, 3, True, True, False, False), (37, 2, False, False, True, True),
])
def test_matches_loop_forward_and_gradients(backend, dtype, tol, L, K, channels_last, bias, silu, reverse):
    x64, w64, b64 = _inputs(2, 40, L, K, channels_last, bias, seed=L + K)
    params64 = [t.requires_grad_() for t in (x64, w64, b64) if t is not None]
    ref = conv_loop(x64, w64[:, 0], b64, silu, reverse)
    dy = torch.randn(ref.shape, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, params64, dy)

    x = x64.detach().to(DEVICE, dtype).requires_grad_()  # keeps x64's strides
    w, b = (t.detach().to(DEVICE, torch.float32).requires_grad_() if t is not None else None for t in (w64, b64))
    y = causal_conv1d(x, w, b, "silu" if silu else None, reverse=reverse, backend=backend)
    assert y.shape == x.shape and y.dtype == dtype
    if backend == "triton":
        assert y.stride() == x.stride()  # dense in x's stride order: a channels-last view stays channels-last
    torch.testing.assert_close(y.double().cpu(), ref, rtol=tol, atol=tol)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy.to(DEVICE, dtype))
    for name, g, r in zip("xwb", grads, ref_grads):
        assert g.shape == r.shape and g.dtype == (dtype if name == "x" else torch.float32), name
        assert (g.double().cpu() - r).norm() <= 4 * tol * r.norm(), name


def test_strided_views_and_inference_path():
    """x a channel slice of a wider channels-last projection (Vim's in_proj half), dy non-dense; under no_grad
    the kernel runs outside autograd with the same values."""
    g = torch.Generator().manual_seed(5)
    proj = torch.randn(3, 50, 2 * 24, generator=g).to(DEVICE)
    x = proj[..., :24].transpose(1, 2).requires_grad_()  # (3, 24, 50), channels stride 1, positions stride 48
    x.retain_grad()
    w, b = torch.randn(24, 4, generator=g).to(DEVICE), torch.randn(24, generator=g).to(DEVICE)
    y = causal_conv1d(x, w, b, "silu", reverse=True, backend="triton")
    ref = conv_loop(x.detach().double().cpu(), w.double().cpu(), b.double().cpu(), True, True)
    torch.testing.assert_close(y.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(causal_conv1d(x, w, b, "silu", reverse=True, backend="triton"), y)
    dy = torch.randn(3, 100, 24, generator=g).to(DEVICE)[:, ::2].transpose(1, 2)  # every other position
    (gx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().cpu().requires_grad_()
    (rx,) = torch.autograd.grad(conv_loop(x64, w.double().cpu(), b.double().cpu(), True, True), x64,
                                dy.double().cpu())
    torch.testing.assert_close(gx.double().cpu(), rx, rtol=1e-4, atol=1e-5)


def test_torch_compile_runs_the_kernels_with_gradients(monkeypatch):
    """Under torch.compile (fullgraph, Inductor) the Triton path is kept, forward and backward, and gives eager's
    values on a channel slice of a channels-last projection (the layout whose strides Inductor must not change
    under the kernels)."""
    import vssm.kernels.conv as conv

    def torch_path(*args, **kwargs):
        raise AssertionError("causal_conv1d took its PyTorch path under torch.compile")
    g = torch.Generator().manual_seed(7)
    proj = torch.randn(2, 30, 2 * 16, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(16, 1, 4, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(16, generator=g).to(DEVICE).requires_grad_()

    def f(proj, w, b):
        x = (proj[..., :16] * 2).transpose(1, 2)
        return causal_conv1d(x, w, b, "silu", reverse=True, backend="triton").transpose(1, 2) * proj[..., 16:]
    ref = f(proj, w, b)
    ref_grads = torch.autograd.grad(ref.square().sum(), (proj, w, b))
    monkeypatch.setattr(conv, "causal_conv1d_ref", torch_path)
    out = torch.compile(f, fullgraph=True)(proj, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("proj", "w", "b"), torch.autograd.grad(out.square().sum(), (proj, w, b)), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 8, 10)
    with pytest.raises(ValueError, match=r"weight must be \(dim, K\) .* dim = 8"):
        causal_conv1d(x, torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"bias has shape \(6,\); expected \(dim,\) = \(8,\)"):
        causal_conv1d(x, torch.randn(8, 4), torch.randn(6))
    with pytest.raises(ValueError, match=r"x must be \(batch, dim, L\)"):
        causal_conv1d(x[0], torch.randn(8, 4))
    with pytest.raises(ValueError, match="activation must be one of"):
        causal_conv1d(x, torch.randn(8, 4), activation="relu")
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        causal_conv1d(x.long(), torch.randn(8, 4))
