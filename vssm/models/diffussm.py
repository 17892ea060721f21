"""DiffuSSM: a diffusion denoiser without attention.

"Diffusion Models Without Attention", Yan, Gu, Rush, CVPR 2024 (https://arxiv.org/abs/2311.18257).
No official code was released; this is written from the paper's description (Sec. 3.2 and Fig. 2 for the
block, Sec. 4 for the set-up) and DiT (Peebles & Xie, facebookresearch/DiT) for the parts it takes from DiT.

The noised latent (batch, C, H, W) is read as a sequence of L = H*W positions in raster order, one position
per latent pixel: no patchification where the long-range mixing happens. Every layer is a DiffuSSM block on
a sequence shortened by the downscale ratio M (the paper's hourglass), J = L / M tokens of width D:

    I        = adaLN(LayerNorm(x), t, y)                     (batch, J, D)    x: the residual stream
    U_{Mj+k} = act(W_k^up act(W^0 I_j)),       k < M         (batch, L, D)    upscale to every pixel
    Y        = [SSM_fwd(U), SSM_bwd(U)]                      (batch, L, 2D)   bidirectional, full length
    I'_j     = [act(W_k^down Y_{Mj+k}) for k < M]           (batch, J, 2D)   downscale, 2D/M each
    O_j      = W^3 (act(W^2 I'_j) * act(W^1 I_j))           (batch, J, D)    gated fusion
    x        = x + gate(t, y) * O                                              adaLN-Zero residual

Paper facts (Sec. 3.2, 4.1, 5, as quoted by reviews of the paper; the PDF itself was not at hand): the
equations above, with I in R^{J x D}, Y in R^{L x 2D} and pieces of width D_m = 2D/M; the SSM runs at
the original length L; class label and timestep are combined and given to every position (DiT's
conditioning); a linear decoder after the last block predicts the noise and the diagonal covariance
(learned sigma, 2C output channels); DiffuSSM-XL has D = 1152, 29 layers and about 673M parameters; S and
L use D = 384 and 768; M = 2 (the FLOP count quoted for one layer, 7.5 L D^2 at M = 2, is what the widths
above give: W^0 0.5, W^up 1, W^down 2, W^1 1, W^2 2, W^3 1, in units of L D^2).

Choices where the paper is silent or where vssm differs:
- SSM: the paper's bidirectional SSM is S4D (as in BiGS, "Pretraining Without Attention"); here both
  directions are Mamba's selective scan through vssm's shared kernel, the backward one with
  ``reverse=True`` (no flipped copies). Each direction has its own x_proj/dt_proj/A/D (as BiGS has two
  SSMs); the gating is the paper's fusion product, so the scans take no z gate.
- act: GELU (tanh approximation, DiT's MLP activation); the paper writes only sigma.
- the first shortening and the decoder: the paper's layers read and write J tokens; the embedding takes the
  M horizontally adjacent pixels of each token (positions Mj .. Mj+M-1 of the raster order, the grouping of
  W^up / W^down) with one linear map, and the final layer maps each token back to its M pixels.
- conditioning: DiT's adaLN-Zero (shift, scale and a zero-initialised gate regressed from t_emb + y_emb),
  one LayerNorm per block since the block is one residual branch. The gate vectors cost 29 D^2 = 38.5M
  parameters: with them DiffuSSM-XL has 711M parameters, without them it would have the paper's 673M, so
  the paper may use shift/scale only (it does not say): ``adaln_gate=False`` builds that variant.
- position: DiT's fixed 2-D sin-cos embedding of the token grid (H, W / M) is added after the embedding
  (the paper builds on DiT and does not say it removed it). It has no parameters (the counts above hold)
  and is computed for the input's grid, so any latent height and any width that is a multiple of M runs
  (`input_size` is the default size only). Without it the scans alone must discover where a pixel is:
  on the digits demo, 1000 training steps reached 0.0097 noise MSE at t = 600 and no class structure in
  the samples (17% recognised), against 0.0083 and 67% with it.
"""
import math
from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from ._ssm import init_dt_bias_, ssm_direction

__all__ = ["DiffuSSM", "DiffuSSMBlock", "BiSSM"]


def modulate(x, shift, scale):
    """adaLN: a per-sample affine map of normalised tokens x (batch, J, D); shift, scale (batch, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Diffusion timestep (batch,) -> (batch, D): sinusoidal features of `freq_dim` frequencies (periods from
    1 to max_period, cosines then sines, as DiT) and a two-layer SiLU MLP."""

    def __init__(self, hidden_size, freq_dim=256, max_period=10000):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def sinusoid(self, t):
        half = self.freq_dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(steps * (-math.log(self.max_period) / half))
        angles = t.float()[:, None] * freqs[None]
        feats = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return F.pad(feats, (0, self.freq_dim % 2))

    def forward(self, t):
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class ids (batch,) -> (batch, D). Row `num_classes` is the null class (the unconditional model of
    classifier-free guidance); in training each label is replaced by it with probability `dropout_prob`."""

    def __init__(self, num_classes, hidden_size, dropout_prob=0.1):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class BiSSM(nn.Module):
    """The paper's Bidirectional-SSM, channels-last: (batch, L, D) -> (batch, L, 2D), the forward scan's output
    in channels [0, D) and the backward scan's in [D, 2D).

    Why not vim.BiMamba: it is a whole Mamba mixer (in/out projections, convolutions, z gate, averaged
    directions); here the hourglass supplies the projections and the gate, and the paper keeps both directions (2D
    channels), so only the selective SSM is kept: per direction (dt, B, C) = x_proj(u), delta = dt_proj(dt),
    y = selective_scan(u, delta, A, B, C, D) with Mamba's parameterisation and initialisation. The parameter
    names follow Vim's ("_b" for the backward direction).
    """

    def __init__(self, dim, d_state=16, dt_rank=None, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        self.dim, self.d_state = dim, d_state
        self.dt_rank = dt_rank = dt_rank or math.ceil(dim / 16)
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(dim, 1)
        self.x_proj = nn.Linear(dim, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, dim)
        self.A_log = nn.Parameter(A_log.clone())
        self.D = nn.Parameter(torch.ones(dim))
        self.x_proj_b = nn.Linear(dim, dt_rank + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(dt_rank, dim)
        self.A_b_log = nn.Parameter(A_log.clone())
        self.D_b = nn.Parameter(torch.ones(dim))
        for dt_proj in (self.dt_proj, self.dt_proj_b):
            nn.init.uniform_(dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
            init_dt_bias_(dt_proj.bias, dt_min, dt_max, dt_init_floor)

    def forward(self, u):
        y = ssm_direction(u, self.x_proj, self.dt_proj, self.A_log, self.D, self.d_state)
        y_b = ssm_direction(u, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, self.d_state, reverse=True)
        return torch.cat([y, y_b], dim=-1)


class DiffuSSMBlock(nn.Module):
    """One DiffuSSM layer on the shortened sequence x (batch, J, D) with conditioning c (batch, D): the
    equations of the module docstring. W^up_k and W^down_k are stored stacked over k as (M, out, in)."""

    def __init__(self, dim, downscale_ratio=2, d_state=16, adaln_gate=True, **ssm_kwargs):
        super().__init__()
        M = self.downscale_ratio = downscale_ratio
        self.adaln_gate = adaln_gate
        if (2 * dim) % M:
            raise ValueError(f"DiffuSSM: 2 * hidden_size ({2 * dim}) must be divisible by the downscale ratio {M}")
        self.dim = dim
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # shift, scale (and the adaLN-Zero gate)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (3 if adaln_gate else 2) * dim))
        self.act = nn.GELU(approximate="tanh")
        self.proj_in = nn.Linear(dim, dim)                                      # W^0
        self.up_weight = nn.Parameter(torch.empty(M, dim, dim))                 # W^up_k: D -> D
        self.up_bias = nn.Parameter(torch.zeros(M, dim))
        self.ssm = BiSSM(dim, d_state=d_state, **ssm_kwargs)
        self.down_weight = nn.Parameter(torch.empty(M, 2 * dim // M, 2 * dim))  # W^down_k: 2D -> 2D/M
        self.down_bias = nn.Parameter(torch.zeros(M, 2 * dim // M))
        self.fc_skip = nn.Linear(dim, 2 * dim)                                  # W^1
        self.fc_ssm = nn.Linear(2 * dim, 2 * dim)                               # W^2
        self.proj_out = nn.Linear(2 * dim, dim)                                 # W^3
        for w in (self.up_weight, self.down_weight):  # Xavier per W_k, as DiT's Linear layers
            nn.init.uniform_(w, -math.sqrt(6 / sum(w.shape[1:])), math.sqrt(6 / sum(w.shape[1:])))

    def mix(self, h):
        """The hourglass around the bidirectional SSM: I (batch, J, D) -> O (batch, J, D), unconditioned."""
        batch, J, D = h.shape
        M = self.downscale_ratio
        a = self.act(self.proj_in(h))
        # U[b, M*j + k] = act(W^up_k a[b, j]), channels-last for the scans
        u = self.act(torch.einsum("bjd,ked->bjke", a, self.up_weight) + self.up_bias)
        y = self.ssm(u.reshape(batch, J * M, D))  # (batch, L, 2D)
        # I'[b, j, k-th 2D/M slice] = act(W^down_k Y[b, M*j + k])
        i2 = self.act(torch.einsum("bjkc,koc->bjko", y.view(batch, J, M, 2 * D), self.down_weight) + self.down_bias)
        return self.proj_out(self.act(self.fc_ssm(i2.reshape(batch, J, 2 * D))) * self.act(self.fc_skip(h)))

    def forward(self, x, c):
        if not self.adaln_gate:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return x + self.mix(modulate(self.norm(x), shift, scale))
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        return x + gate.unsqueeze(1) * self.mix(modulate(self.norm(x), shift, scale))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm + linear decoding of each token to its M pixels' out_chans values."""

    def __init__(self, dim, downscale_ratio, out_chans):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, downscale_ratio * out_chans)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiffuSSM(nn.Module):
    """DiffuSSM (Yan, Gu, Rush 2024): class- and timestep-conditioned denoiser of (batch, C, H, W) latents;
    ``forward(x, t, y)`` returns (batch, 2C, H, W) with learn_sigma (noise, then variance interpolation
    values, as DiT), else (batch, C, H, W). ``num_classes=0`` gives an unconditional model (y=None).
    ``adaln_gate=False`` drops adaLN-Zero's per-block gate (shift/scale only, W^3 zero-initialised instead):
    DiffuSSM-XL then has 673.1M parameters, the paper's 673M."""

    def __init__(
            self,
            input_size: Union[int, Tuple[int, int]] = 32,
            in_chans: int = 4,
            num_classes: int = 1000,
            hidden_size: int = 1152,
            depth: int = 29,
            downscale_ratio: int = 2,
            d_state: int = 16,
            class_dropout_prob: float = 0.1,
            learn_sigma: bool = True,
            adaln_gate: bool = True,
    ):
        super().__init__()
        self.input_size = to_2tuple(input_size)
        self.in_chans = in_chans
        self.out_chans = 2 * in_chans if learn_sigma else in_chans
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.hidden_size = self.num_features = hidden_size
        self.downscale_ratio = M = downscale_ratio
        self.grad_checkpointing = False
        if downscale_ratio < 1 or self.input_size[1] % M:
            raise ValueError(f"DiffuSSM: input width {self.input_size[1]} must be a multiple of the downscale "
                             f"ratio (got {downscale_ratio})")

        self.x_embedder = nn.Linear(M * in_chans, hidden_size)  # M adjacent pixels -> one token
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        self.blocks = nn.ModuleList([DiffuSSMBlock(hidden_size, M, d_state, adaln_gate) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, M, self.out_chans)
        self._init_weights()

    def _init_weights(self):
        """DiT's: Xavier-uniform Linear layers with zero biases, N(0, 0.02) label table and timestep MLP,
        adaLN modulations and the final linear zero (each block starts as the identity, the output at 0;
        without the adaLN gate W^3 is zeroed instead).
        The SSMs keep Mamba's initialisation from BiSSM."""
        ssm_modules = {m for blk in self.blocks for m in blk.ssm.modules()}
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in ssm_modules:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [blk.adaLN_modulation[-1] if blk.adaln_gate else blk.proj_out for blk in self.blocks]
        for mod in zeroed + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    # --- timm model API -----------------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        return dict(stem=r"^x_embedder|^t_embedder|^y_embedder", blocks=[(r"^blocks\.(\d+)", None),
                                                                         (r"^final_layer", (99999,))])

    # --- inputs --------------------------------------------------------------------------------------------
    def _check_latents(self, x):
        C, (H, W), M = self.in_chans, self.input_size, self.downscale_ratio
        if x.dim() != 4 or x.shape[1] != C or x.shape[-1] % M or x.shape[-2] < 1:
            raise ValueError(f"DiffuSSM: expected latents of shape (batch, {C}, height, width) with the width a "
                             f"multiple of the downscale ratio {M} (this model's default: (batch, {C}, {H}, {W})), "
                             f"got {tuple(x.shape)}")

    def _timesteps(self, t, batch, device):
        """t: one timestep per latent (batch,) or one for all (a scalar); returns (batch,)."""
        t = torch.as_tensor(t, device=device)
        if t.dim() == 0:
            return t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"DiffuSSM: t must be a scalar or of shape ({batch},) (one timestep per latent), "
                             f"got shape {tuple(t.shape)}")
        return t

    def _check_labels(self, y, batch):
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("DiffuSSM: this model is unconditional (num_classes=0); pass y=None")
            return
        if not torch.is_tensor(y) or y.shape != (batch,) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"DiffuSSM: y must be an integer tensor of shape ({batch},), got "
                             f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}"
                             f"{' ' + str(y.dtype) if torch.is_tensor(y) else ''}")
        if not torch.compiler.is_compiling() and y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"DiffuSSM: class ids must be in [0, {self.num_classes}] ({self.num_classes} is the "
                             f"null class of classifier-free guidance), got ids from {int(y.min())} to {int(y.max())}")

    # --- forward -------------------------------------------------------------------------------------------
    def condition(self, t, y):
        """The conditioning vector c = t_emb + y_emb (batch, D) that every adaLN reads."""
        c = self.t_embedder(t)
        return c if self.y_embedder is None else c + self.y_embedder(y)

    def forward(self, x, t, y=None):
        """x: noised latents (batch, C, H, W); t: timesteps (batch,) or a scalar; y: class ids (batch,) in
        [0, num_classes] (num_classes = null class). Returns (batch, out_chans, H, W)."""
        self._check_latents(x)
        batch, C, H, W = x.shape
        M = self.downscale_ratio
        t = self._timesteps(t, batch, x.device)
        self._check_labels(y, batch)
        # raster order, token j = pixels M*j .. M*j + M - 1 (adjacent in a row), their channels side by side
        h = self.x_embedder(x.permute(0, 2, 3, 1).reshape(batch, H * W // M, M * C))
        h = h + build_sincos2d_pos_embed([H, W // M], self.hidden_size, device=x.device).to(h.dtype)
        c = self.condition(t, y)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        out = self.final_layer(h, c)  # (batch, J, M * out_chans)
        return out.reshape(batch, H, W, self.out_chans).permute(0, 3, 1, 2)

    def forward_with_cfg(self, x, t, y, cfg_scale: float):
        """Classifier-free guidance, DiT's convention (so DiT-style samplers apply): x, t, y are a doubled
        batch whose first half carries the class labels and whose second half the null class; the model runs
        on the first half's latents twice, the noise channels become uncond + cfg_scale * (cond - uncond) in
        both halves, and the variance channels (learn_sigma) are returned as predicted."""
        if self.y_embedder is None:
            raise ValueError("DiffuSSM: forward_with_cfg needs a class-conditional model (num_classes > 0)")
        self._check_latents(x)
        if x.shape[0] % 2:
            raise ValueError(f"DiffuSSM: forward_with_cfg takes a doubled batch ([conditional; null-class]) "
                             f"as DiT does, got an odd batch of {x.shape[0]}")
        half = x[:x.shape[0] // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :self.in_chans], out[:, self.in_chans:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def _create_diffussm(variant, pretrained=False, **kwargs):
    return build_model_with_cfg(DiffuSSM, variant, pretrained, **kwargs)


def _cfg(input_size, num_classes=1000, **kwargs):
    return {
        "url": "", "num_classes": num_classes, "input_size": input_size, "pool_size": None,
        "fixed_input_size": False, "mean": (0.0,) * input_size[0], "std": (1.0,) * input_size[0],
        "first_conv": "x_embedder", "classifier": "final_layer.linear",
        "paper_ids": "arXiv:2311.18257", "paper_name": "Diffusion Models Without Attention",
        **kwargs,
    }


# no released weights: the cfgs describe the inputs (latents of the Stable Diffusion VAE, 8x downsampling)
default_cfgs = generate_default_cfgs({
    "diffussm_xl_256.untrained": _cfg((4, 32, 32)),
    "diffussm_xl_512.untrained": _cfg((4, 64, 64)),
    "diffussm_tiny_8.untrained": _cfg((1, 8, 8), num_classes=10),
})


@register_model
def diffussm_xl_256(pretrained=False, **kwargs) -> DiffuSSM:
    """DiffuSSM-XL for ImageNet 256x256: 32x32x4 latents (L = 1024), D = 1152, 29 layers, M = 2."""
    args = dict(input_size=32, in_chans=4, num_classes=1000, hidden_size=1152, depth=29, downscale_ratio=2)
    return _create_diffussm("diffussm_xl_256", pretrained, **dict(args, **kwargs))


@register_model
def diffussm_xl_512(pretrained=False, **kwargs) -> DiffuSSM:
    """DiffuSSM-XL for ImageNet 512x512: 64x64x4 latents (L = 4096), D = 1152, 29 layers, M = 2 (the
    paper's 512 Gflops, 3.8x its 256 ones, fit the same M with the sequence 4x longer)."""
    args = dict(input_size=64, in_chans=4, num_classes=1000, hidden_size=1152, depth=29, downscale_ratio=2)
    return _create_diffussm("diffussm_xl_512", pretrained, **dict(args, **kwargs))


@register_model
def diffussm_tiny_8(pretrained=False, **kwargs) -> DiffuSSM:
    """A small pixel-space DiffuSSM for tests and CPU demos: 8x8 grey digits, 10 classes, D = 128, 6 layers,
    M = 2 (not a paper configuration)."""
    args = dict(input_size=8, in_chans=1, num_classes=10, hidden_size=128, depth=6, downscale_ratio=2)
    return _create_diffussm("diffussm_tiny_8", pretrained, **dict(args, **kwargs))
