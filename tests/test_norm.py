"""vssm.kernels.layer_norm and add_rms_norm: the Triton kernels (interpreted on the CPU) against PyTorch in
float64."""
import pytest
import torch
import torch.nn.functional as F

from vssm.kernels import add_rms_norm, layer_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5
    w = 1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    return [t.to(DEVICE, dtype).requires_grad_() for t in (x, w, b)]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(3, 5), (2, 7, 96), (2, 3, 4, 20), (1, 70, 33)])
def test_matches_torch_forward_and_gradients(shape, dtype, tol):
    x, w, b = _inputs(shape, dtype)
    y = layer_norm(x, w, b, 1e-5, backend="triton")
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.layer_norm(x64, (shape[-1],), w64, b64, 1e-5)
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    dy = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    grads = torch.autograd.grad(y, (x, w, b), dy.to(dtype))
    ref_grads = torch.autograd.grad(ref, (x64, w64, b64), dy)
    for name, g, r in zip("xwb", grads, ref_grads):
        assert g.dtype == dtype, name
        assert (g.double() - r).norm() <= 4 * tol * r.norm(), name


def test_backward_programs_walk_several_row_blocks():
    """Enough rows (40000 of 8) that each backward program sums dw/db over more than one block of rows."""
    test_matches_torch_forward_and_gradients((1, 40000, 8), torch.float32, 1e-5)


def test_strided_channels_first_input_is_read_in_place():
    """A (B, C, H, W) map viewed as (B, H, W, C) is normalised without a copy and equals the copied result."""
    x, w, b = _inputs((2, 5, 6, 9), torch.float32, seed=1)
    x = x.detach().permute(0, 3, 1, 2).contiguous().requires_grad_()  # a channels-first (2, 9, 5, 6) map
    view = x.permute(0, 2, 3, 1)
    assert not view.is_contiguous()
    y = layer_norm(view, w, b, 1e-6, backend="triton")
    ref = F.layer_norm(view.contiguous(), (9,), w, b, 1e-6)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(ref)
    g = torch.autograd.grad(y, (x, w, b), dy)
    r = torch.autograd.grad(ref, (x, w, b), dy)
    for a, e in zip(g, r):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_inference_path_matches_torch():
    """Under no_grad / inference_mode the kernel runs outside autograd: same values, strided input read."""
    x, w, b = _inputs((2, 5, 6, 9), torch.float32, seed=3)
    view = x.detach().permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    ref = F.layer_norm(view, (9,), w, b, 1e-6)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y = layer_norm(view, w, b, 1e-6, backend="triton")
        assert not y.requires_grad and y.shape == view.shape and y.is_contiguous()
        torch.testing.assert_close(y, ref.detach(), rtol=1e-5, atol=1e-5)


def test_out_dtype_and_autocast_dtype():
    x, w, b = _inputs((4, 16), torch.float32, seed=2)
    y = layer_norm(x, w, b, out_dtype=torch.bfloat16, backend="triton")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.layer_norm(x, (16,), w, b).bfloat16())
    # the torch path gives the same dtypes
    assert layer_norm(x, w, b, out_dtype=torch.bfloat16, backend="torch").dtype == torch.bfloat16
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert layer_norm(x.bfloat16(), w, b, backend="torch").dtype == F.layer_norm(x.bfloat16(), (16,), w, b).dtype


def test_bad_weight_shape_is_named():
    x, w, b = _inputs((4, 16), torch.float32)
    with pytest.raises(ValueError, match=r"weight and bias must have shape \(16,\)"):
        layer_norm(x, w[:8], b)


# --- add_rms_norm: r = residual + x, y = RMSNorm(r) * w ------------------------------------------------------

def _add_rms_truth(x, residual, w, eps):
    r = x if residual is None else residual + x
    return r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * w, r


def _rms_inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    res = torch.randn(shape, generator=g, dtype=torch.float64) * 3 - 1
    w = 1 + 0.5 * torch.randn(shape[-1], generator=g, dtype=torch.float64)
    return (x.to(DEVICE, dtype).requires_grad_(), res.to(DEVICE, torch.float32).requires_grad_(),
            w.to(DEVICE, torch.float32).requires_grad_())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(3, 5), (2, 7, 192), (1, 70, 33)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dr_flows", [True, False])
def test_add_rms_norm_forward_and_gradients(shape, dtype, tol, with_residual, dr_flows):
    """Both outputs against float64, and the gradients of x, the residual and w when y's gradient and
    (dr_flows) a gradient arriving at r from later blocks come back, for x in float32 and bfloat16."""
    x, res, w = _rms_inputs(shape, dtype, seed=len(shape) + 10 * with_residual)
    res = res if with_residual else None
    y, r = add_rms_norm(x, res, w, 1e-5, backend="triton")
    assert y.dtype == torch.float32 and r.dtype == torch.float32 and y.shape == r.shape == x.shape
    leaves = [t for t in (x, res, w) if t is not None]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref_y, ref_r = _add_rms_truth(leaves64[0], leaves64[1] if with_residual else None, leaves64[-1], 1e-5)
    torch.testing.assert_close(r.double(), ref_r, rtol=0, atol=1e-6)  # an add in float32 of exact inputs
    torch.testing.assert_close(y.double(), ref_y, rtol=tol, atol=tol)
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)
    dr = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)
    outs, refs = ((y, r), (ref_y, ref_r)) if dr_flows else ((y,), (ref_y,))
    grads = torch.autograd.grad(outs, leaves, (dy.float(), dr.float())[:len(outs)])
    ref_grads = torch.autograd.grad(refs, leaves64, (dy, dr)[:len(outs)])
    for t, gr, rg in zip(leaves, grads, ref_grads):
        assert gr.dtype == t.dtype and gr.shape == t.shape
        assert (gr.double() - rg).norm() <= 4 * tol * rg.norm()


def test_add_rms_norm_out_dtype_inference_and_torch_path_agree():
    """The inference path (no autograd.Function), the autograd path and the PyTorch path give the same y and
    r; under autocast y comes out in the autocast dtype."""
    x, res, w = _rms_inputs((4, 9, 48), torch.bfloat16, seed=7)
    y, r = add_rms_norm(x, res, w, out_dtype=torch.bfloat16, backend="triton")
    assert y.dtype == torch.bfloat16 and r.dtype == torch.float32
    with torch.no_grad():
        y_inf, r_inf = add_rms_norm(x, res, w, out_dtype=torch.bfloat16, backend="triton")
    y_ref, r_ref = add_rms_norm(x, res, w, out_dtype=torch.bfloat16, backend="torch")
    for a in (y_inf, y_ref):
        torch.testing.assert_close(a.float(), y.detach().float(), rtol=1e-2, atol=1e-2)
    for a in (r_inf, r_ref):
        torch.testing.assert_close(a, r.detach(), rtol=1e-6, atol=1e-6)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        for backend in ("triton", "torch"):
            assert add_rms_norm(x, res, w, backend=backend)[0].dtype == torch.bfloat16


def test_add_rms_norm_bad_arguments_are_named():
    x, res, w = _rms_inputs((4, 16), torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
        add_rms_norm(x, res, w[:8])
    with pytest.raises(ValueError, match=r"residual must be .* shape \(4, 16\)"):
        add_rms_norm(x, res[:2], w)
    with pytest.raises(TypeError, match="x and weight must be floating point"):
        add_rms_norm(x.long(), res, w)
