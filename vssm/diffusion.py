"""Diffusion training and sampling for DiffuSSM (and any DiT-style denoiser) on diffusers' schedulers.

The set-up is DiT's (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023), which DiffuSSM
(Yan, Gu, Rush 2024) trains with: a 1000-step linear beta schedule (1e-4 to 0.02), epsilon prediction, and
a learned variance in the improved-DDPM form (Nichol & Dhariwal, "Improved Denoising Diffusion
Probabilistic Models", 2021), i.e. the model's second C channels v in [-1, 1] interpolate the log-variance

    log var = (v + 1) / 2 * log(beta_t) + (1 - v) / 2 * log(posterior variance at t).

The loss per sample is L_simple + L_vlb: the noise MSE, plus the variational bound term of that step (the
KL between the true posterior q(x_{t-1} | x_t, x_0) and the model's Gaussian, the discretised decoder
likelihood at t = 0, in bits per dimension) computed with the *predicted noise detached*, so the bound
trains only the variance and the mean is trained by the MSE alone (improved DDPM's "hybrid" loss, DiT's
default). The schedule itself (betas, cumulative alphas, noising, the sampler steps) is diffusers'.

Sampling runs a diffusers scheduler (DDPM with the learned variance, DDIM, or DPM-Solver++) with
classifier-free guidance (Ho & Salimans 2022) through the model's ``forward_with_cfg``.
"""
import math

import torch
import torch.nn.functional as F

__all__ = ["SCHEDULERS", "make_scheduler", "diffusion_loss", "train_step", "update_ema", "sample"]

# DiT's noise schedule (diffusion.create_diffusion: 1000 steps, "linear"), in diffusers' terms
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
SCHEDULERS = ("ddpm", "ddim", "dpm-solver")


def make_scheduler(name="ddpm", learn_sigma=True, clip_sample=False):
    """A diffusers scheduler on DiT's schedule: "ddpm" (ancestral; the learned variance, "learned_range",
    when learn_sigma, else DiT's fixed large variance beta_t), "ddim" (eta = 0) or "dpm-solver"
    (DPM-Solver++, 2nd order multistep). clip_sample keeps the predicted x_0 in [-1, 1] (for pixels; DiT does
    not clip latents): clamped in DDPM/DDIM, DPM-Solver++'s dynamic thresholding. The DDPM one is also the training schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if name == "ddpm":
        return DDPMScheduler(**SCHEDULE, variance_type="learned_range" if learn_sigma else "fixed_large",
                             clip_sample=clip_sample)
    if name == "ddim":
        return DDIMScheduler(**SCHEDULE, clip_sample=clip_sample)
    if name == "dpm-solver":
        return DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                           thresholding=clip_sample, sample_max_value=1.0)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------
def _at(table, t, ndim):
    """table[t] (float64 table, (batch,) timesteps) as float32, shaped to broadcast over (batch, ...)."""
    return table.to(t.device)[t].float().view(-1, *([1] * (ndim - 1)))


def _vlb_bits(scheduler, x0, x_t, t, eps, v):
    """The variational-bound term of step t per sample (batch,), in bits per dimension: KL(q(x_{t-1} | x_t,
    x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder's -log p(x_0 | x_1) on 256 bins of [-1, 1] for
    t = 0, where p has the mean given by eps and the log-variance interpolated by v (improved DDPM, eq. 15)."""
    betas = scheduler.betas.double()
    abar = torch.cumprod(1 - betas, 0)  # in float64 as DiT: diffusers' float32 table has 1 - abar_0 off by 2e-4
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # clipped: the t = 0 entry is 0
    n = x0.dim()
    # posterior mean = c0 x_0 + ct x_t; the model's uses x_0 predicted from eps
    c0 = _at(betas * abar_prev.sqrt() / (1 - abar), t, n)
    ct = _at((1 - abar_prev) * (1 - betas).sqrt() / (1 - abar), t, n)
    x0_pred = _at(1 / abar.sqrt(), t, n) * x_t - _at((1 / abar - 1).sqrt(), t, n) * eps
    true_mean, model_mean = c0 * x0 + ct * x_t, c0 * x0_pred + ct * x_t
    true_logvar = _at(post_logvar, t, n)
    frac = (v + 1) / 2
    model_logvar = frac * _at(betas.log(), t, n) + (1 - frac) * true_logvar
    kl = 0.5 * (model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_logvar) - 1)
    # decoder: the probability of x_0's bin [x - 1/255, x + 1/255] (open-ended at -1 and 1)
    inv_std = torch.exp(-0.5 * model_logvar)
    upper = torch.where(x0 > 0.999, torch.full_like(x0, math.inf), (x0 - model_mean + 1 / 255) * inv_std)
    lower = torch.where(x0 < -0.999, torch.full_like(x0, -math.inf), (x0 - model_mean - 1 / 255) * inv_std)
    nll = -torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    bits = torch.where(t.view(-1, *([1] * (n - 1))) == 0, nll, kl)
    return bits.flatten(1).mean(1) / math.log(2.0)


def diffusion_loss(model, x0, y, scheduler, t=None, noise=None):
    """DiT's training loss for a batch of clean latents/images x0 (batch, C, H, W) in [-1, 1] scale and class
    ids y: noise at uniform random timesteps (or the given t, noise), predict it, return a dict of (batch,)
    tensors "loss" = "mse" + "vb" (the variance's bound term, stop-gradient on the mean; "vb" only when the
    model outputs 2C channels)."""
    if t is None:
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = scheduler.add_noise(x0, noise, t)
    out = model(x_t, t, y).float()
    C = x0.shape[1]
    if out.shape[1] not in (C, 2 * C):
        raise ValueError(f"the model returned {out.shape[1]} channels for {C}-channel inputs (expected {C} or {2 * C})")
    mse = (out[:, :C] - noise).square().flatten(1).mean(1)
    if out.shape[1] == C:
        return {"loss": mse, "mse": mse}
    vb = _vlb_bits(scheduler, x0.float(), x_t.float(), t, out[:, :C].detach(), out[:, C:])
    return {"loss": mse + vb, "mse": mse, "vb": vb}


@torch.no_grad()
def update_ema(ema, model, decay=0.9999):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train_step(model, ema, optimizer, x0, y, scheduler, ema_decay=0.9999, autocast_dtype=None):
    """One optimisation step on a batch: the loss under autocast (bf16 on CUDA, or None for full precision),
    backward, optimizer step and EMA update (``ema`` mirrors the unwrapped model; ``model`` may be wrapped in
    DDP). Returns the batch means of the loss terms as detached tensors (no host sync)."""
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        terms = diffusion_loss(model, x0, y, scheduler)
    loss = terms["loss"].mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    update_ema(ema, getattr(model, "module", model), ema_decay)
    return {k: v.detach().mean() for k, v in terms.items()}


# ---------------------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model, scheduler, labels, shape, steps, cfg_scale=1.0, generator=None, progress=False,
           autocast_dtype=None):
    """Class-conditional samples (len(labels), *shape) from noise by `steps` steps of a diffusers scheduler.

    labels: class ids (a list or tensor); shape: (C, H, W) of one latent/image; cfg_scale > 1 guides with
    the null class through ``model.forward_with_cfg`` (DiT's doubled batch: [x; x] with [y; null]), 1 runs
    the conditional model alone. The first C output channels (the noise) drive DDIM and DPM-Solver; DDPM
    with variance_type "learned_range" also takes the variance channels. generator (a CPU torch.Generator)
    draws the initial noise and DDPM's noise, so a seed gives the same samples on any device.
    """
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    n, C = len(y), shape[0]
    learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    scheduler.set_timesteps(steps, device=device)
    # DDIM: the noise re-derived from the clipped x_0 (without it, clipping leaves DDIM's x_t direction off)
    extra = {"use_clipped_model_output": True} if isinstance(scheduler, DDIMScheduler) else {}
    x = torch.randn((n, *shape), generator=generator).to(device) * scheduler.init_noise_sigma
    if cfg_scale != 1:
        y = torch.cat([y, torch.full_like(y, model.num_classes)])
    for t in tqdm(scheduler.timesteps, desc="sampling", leave=False, disable=not progress):
        x_in = scheduler.scale_model_input(x, t)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if cfg_scale != 1:
                out = model.forward_with_cfg(torch.cat([x_in, x_in]), t, y, cfg_scale)[:n]
            else:
                out = model(x_in, t, y)
        out = out.float() if learned else out[:, :C].float()
        x = scheduler.step(out, t, x, generator=generator, **extra).prev_sample
    return x
