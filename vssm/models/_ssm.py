"""Mamba's selective SSM pieces shared by the model families (Gu & Dao 2023, "Mamba")."""
import math

import torch
import torch.nn.functional as F

from vssm.kernels import selective_scan

__all__ = ["init_dt_bias_", "ssm_direction"]


@torch.no_grad()
def init_dt_bias_(bias, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4):
    """Mamba's time-step initialisation, in place: dt log-uniform in [dt_min, dt_max] (floored at
    dt_init_floor), stored through softplus's inverse so that softplus(bias) = dt."""
    dt = torch.exp(torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def ssm_direction(u, x_proj, dt_proj, A_log, D, d_state, z=None, reverse=False):
    """One direction of Mamba's S6 on channels-last u (batch, L, dim): (dt, B, C) = x_proj(u), delta =
    dt_proj's weight applied to dt (its bias and the softplus are applied inside the scan), A = -exp(A_log),
    then selective_scan(u, delta, A, B, C, D, z) run right to left when reverse; z (batch, L, dim) too.
    Returns (batch, L, dim). Channels-last is the layout the stepped scan reads fastest: every tensor goes to
    it as a (batch, dim, L) view, with B and C copied together into one (batch, L, 2N) block."""
    dt_rank = dt_proj.weight.shape[1]
    x_dbl = F.linear(u, x_proj.weight)  # (batch, L, dt_rank + 2N)
    BC = x_dbl[..., dt_rank:].contiguous()
    delta = F.linear(x_dbl[..., :dt_rank], dt_proj.weight)  # (batch, L, dim)
    y = selective_scan(u.transpose(1, 2), delta.transpose(1, 2), -torch.exp(A_log.float()),
                       BC[..., :d_state].transpose(1, 2), BC[..., d_state:].transpose(1, 2), D.float(),
                       z=z.transpose(1, 2) if z is not None else None, delta_bias=dt_proj.bias.float(),
                       delta_softplus=True, reverse=reverse)
    return y.transpose(1, 2)
