"""Mamba's selective SSM pieces shared by the model families (Gu & Dao 2023, "Mamba")."""
import math

import torch

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
    """One direction of Mamba's S6 on u (batch, dim, L): (dt, B, C) = x_proj(u), delta = dt_proj's weight
    applied to dt (its bias and the softplus are applied inside the scan), A = -exp(A_log), then
    selective_scan(u, delta, A, B, C, D, z) run right to left when reverse. Returns (batch, dim, L)."""
    dt_rank = dt_proj.weight.shape[1]
    x_dbl = torch.matmul(x_proj.weight, u)  # (batch, dt_rank + 2N, L)
    dt, B, C = x_dbl.split([dt_rank, d_state, d_state], dim=1)
    delta = torch.matmul(dt_proj.weight, dt)  # (batch, dim, L)
    return selective_scan(u, delta, -torch.exp(A_log.float()), B, C, D.float(), z=z,
                          delta_bias=dt_proj.bias.float(), delta_softplus=True, reverse=reverse)
