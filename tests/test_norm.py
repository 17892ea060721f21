"""vssm.kernels.layer_norm: the Triton kernels (interpreted on the CPU) against F.layer_norm in float64."""
import pytest
import torch
import torch.nn.functional as F

from vssm.kernels import layer_norm

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
