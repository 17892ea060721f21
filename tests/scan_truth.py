"""Ground truth for the scan tests: the S6 recurrence stepped one position at a time in float64."""
import torch
import torch.nn.functional as F


def loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False):
    """Returns (y, last_state) in float64, differentiable; B, C are (batch, N, L) or (batch, G, N, L)."""
    f = torch.float64
    batch, dim, L = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    per_group = dim // B.shape[1]
    u, dt, A, B, C = u.to(f), delta.to(f), A.to(f), B.to(f), C.to(f)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    h = torch.zeros(batch, dim, A.shape[1], dtype=f, device=u.device)
    ys = [None] * L
    for t in (range(L - 1, -1, -1) if reverse else range(L)):
        Bt = B[:, :, :, t].repeat_interleave(per_group, dim=1)
        Ct = C[:, :, :, t].repeat_interleave(per_group, dim=1)
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * Bt
        ys[t] = (h * Ct).sum(-1)
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.to(f)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(f))
    return y, h


def scan_orders(t):
    """(batch, 4, C, H, W) -> (batch, 4, C, H*W), slice k in VMamba's scan order k, by explicit indexing."""
    batch, K, C, H, W = t.shape
    hh, ww = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    row_major = (hh * W + ww).flatten()                    # step -> position
    col_major = (hh * W + ww).t().flatten()
    orders = [row_major, col_major, row_major.flip(0), col_major.flip(0)]
    flat = t.flatten(3)
    return torch.stack([flat[:, k][..., orders[k].to(t.device)] for k in range(4)], 1)
