"""Checks shared by the model tests."""
import torch


def assert_cuda_matches_cpu(model, img, bf16_tol=None):
    """The model on CUDA (the Triton kernels) against the same model on the CPU (the float64 reference scan):
    output and every parameter gradient of a float32 forward/backward; with bf16_tol, also a bf16-autocast
    forward within that relative error."""
    ref = model(img)
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.cuda()
    out = model(img.cuda())
    out.square().mean().backward()
    assert (out.cpu() - ref).norm() / ref.norm() < 1e-4
    for n, p in model.named_parameters():
        assert (p.grad.cpu() - ref_grads[n]).norm() <= 1e-3 * ref_grads[n].norm() + 1e-6, n
    if bf16_tol is not None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(img.cuda())
        assert (low.float().cpu() - ref).norm() / ref.norm() < bf16_tol
