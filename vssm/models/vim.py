"""Vim: Vision Mamba.

"Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model",
Zhu et al., ICML 2024 (https://arxiv.org/abs/2401.09417), official code hustvl/Vim.

A plain backbone: patch tokens with a class token in the middle of the sequence and absolute position
embeddings go through bidirectional Mamba blocks (bimamba "v2": both directions share in_proj/out_proj and
each has its own conv1d, x_proj, dt_proj, A and D; their outputs are averaged). The backward direction
runs the shared selective scan with ``reverse=True`` and an anti-causal convolution, so no flipped copies
of the sequence are made. Module and parameter names follow the official code, so its checkpoints load
as they are.
"""
import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, RmsNorm, lecun_normal_, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import adapt_input_conv
from torch.utils.checkpoint import checkpoint

from vssm.kernels import add_rms_norm, mamba_inner

from ._checkpoint import load_pretrained_file, own_loader, unwrap_state_dict
from ._ssm import init_dt_bias_

__all__ = ["Vim"]


class PatchEmbed(nn.Module):
    """Image to patch tokens by a strided convolution (stride < patch size gives overlapping patches, as
    in the "+" models). Any image size with (size - patch) divisible by the stride is accepted."""

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=192):
        super().__init__()
        self.img_size, self.patch_size, self.stride = to_2tuple(img_size), to_2tuple(patch_size), to_2tuple(stride)
        self.in_chans = in_chans
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def feat_size(self, img_size) -> Tuple[int, int]:
        """Token grid (rows, columns) of an image; a clear error for a size the patching cannot cover."""
        grid = []
        for size, patch, stride, axis in zip(img_size, self.patch_size, self.stride, ("height", "width")):
            if size < patch or (size - patch) % stride:
                ok = f"a multiple of {stride}" if patch == stride else f"{patch} + a multiple of {stride}"
                raise ValueError(f"Vim: input {axis} {size} cannot be cut into {patch}-pixel patches at stride "
                                 f"{stride}; expected {ok} (e.g. {patch + stride * max(0, (size - patch) // stride)})")
            grid.append((size - patch) // stride + 1)
        return tuple(grid)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"Vim: expected images of shape (batch, {self.in_chans}, height, width), "
                             f"got {tuple(x.shape)}")
        grid = self.feat_size(x.shape[-2:])
        return self.proj(x).flatten(2).transpose(1, 2), grid


class BiMamba(nn.Module):
    """Bidirectional Mamba mixer (bimamba "v2"), on (batch, L, dim) tokens.

    x, z = in_proj(tokens); per direction: x' = silu(depthwise conv1d(x)) (causal forward, anti-causal
    backward), (dt, B, C) = x_proj(x'), delta = dt_proj(dt), y = selective_scan(x', delta, A, B, C, D, z);
    out = out_proj((y_forward + y_backward) / 2).
    """

    def __init__(self, dim, d_state=16, d_conv=4, expand=2, dt_rank=None, dt_min=1e-3, dt_max=0.1,
                 dt_init_floor=1e-4):
        super().__init__()
        self.d_inner = d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = dt_rank = dt_rank or math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
        # forward direction (official names) and backward direction (the same names with "_b")
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        self.A_log = nn.Parameter(A_log.clone())
        self.D = nn.Parameter(torch.ones(d_inner))
        self.conv1d_b = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner)
        self.x_proj_b = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj_b = nn.Linear(dt_rank, d_inner)
        self.A_b_log = nn.Parameter(A_log.clone())
        self.D_b = nn.Parameter(torch.ones(d_inner))
        for dt_proj in (self.dt_proj, self.dt_proj_b):
            nn.init.uniform_(dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
            init_dt_bias_(dt_proj.bias, dt_min, dt_max, dt_init_floor)
            dt_proj.bias._no_reinit = True

    def _direction(self, x, z, conv1d, x_proj, dt_proj, A_log, D, reverse):
        """One direction's conv + selective scan on channels-last x, z (batch, L, d_inner); returns the same.
        The backward direction's conv is anti-causal (the causal conv of the flipped sequence, flipped back)."""
        return mamba_inner(x, z, conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight, dt_proj.bias,
                           -torch.exp(A_log.float()), D.float(), reverse=reverse)

    def forward(self, tokens):
        x, z = self.in_proj(tokens).chunk(2, dim=-1)  # (batch, L, d_inner) each, read in place by the scans
        y = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, reverse=False)
        y_b = self._direction(x, z, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b,
                              reverse=True)
        # out_proj of the directions' average, with the 1/2 (exact in any float format) moved onto the weight
        return F.linear(y + y_b, self.out_proj.weight * 0.5)


class Block(nn.Module):
    """Pre-norm residual block with the residual stream kept apart (and in float32), as Mamba's blocks:
    residual = residual + drop_path(hidden); hidden = mixer(norm(residual))."""

    def __init__(self, dim, drop_path=0.0, norm_eps=1e-5, **mixer_kwargs):
        super().__init__()
        self.mixer = BiMamba(dim, **mixer_kwargs)
        self.norm = RmsNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden, residual: Optional[torch.Tensor] = None):
        hidden, residual = add_rms_norm(hidden if residual is None else self.drop_path(hidden), residual,
                                        self.norm.weight, self.norm.eps)  # one pass: add, norm, cast
        return self.mixer(hidden), residual


def _insert_middle(tokens, cls_token):
    """(batch, M, D) patch tokens -> (batch, M + 1, D) with cls_token at position M // 2."""
    p = tokens.shape[1] // 2
    return torch.cat([tokens[:, :p], cls_token.expand(tokens.shape[0], -1, -1), tokens[:, p:]], dim=1)


def _split_middle(tokens):
    """The inverse of _insert_middle: (batch, M + 1, D) -> patch tokens (batch, M, D), class token (batch, 1, D)."""
    p = (tokens.shape[1] - 1) // 2
    return torch.cat([tokens[:, :p], tokens[:, p + 1:]], dim=1), tokens[:, p:p + 1]


def resample_pos_embed(pos_embed, new_grid, old_grid=None):
    """Resample a middle-class-token position embedding (1, M + 1, D) to another token grid: the class
    token's row (index M // 2) is kept, the patch rows are interpolated (bicubic) and the class row is put
    back in the middle of the new sequence."""
    M = pos_embed.shape[1] - 1
    if old_grid is None:
        side = int(math.isqrt(M))
        if side * side != M:
            raise ValueError(f"Vim: pos_embed with {M} patch positions is not a square grid; give old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    patches, cls_row = _split_middle(pos_embed)
    patches = resample_abs_pos_embed(patches, list(new_grid), list(old_grid), num_prefix_tokens=0)
    return _insert_middle(patches, cls_row)


class Vim(nn.Module):
    """Vision Mamba (Zhu et al. 2024): patch tokens + middle class token + absolute position embedding,
    `depth` bidirectional Mamba blocks, final RMSNorm, classifier on the class token."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            stride: Optional[int] = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            embed_dim: int = 192,
            depth: int = 24,
            d_state: int = 16,
            expand: int = 2,
            d_conv: int = 4,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, stride or patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # block i drops the branch it receives from block i - 1; the last rate is for the final residual add
        dpr = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList([
            Block(embed_dim, drop_path=dpr[i], norm_eps=norm_eps, d_state=d_state, expand=expand, d_conv=d_conv)
            for i in range(depth)])
        self.drop_path = DropPath(dpr[depth]) if dpr[depth] > 0 else nn.Identity()
        self.norm_f = RmsNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes, global_pool)  # the head, and the checked global_pool
        stride_px = self.patch_embed.stride[0]
        self.feature_info = [dict(module=f"layers.{i}", num_chs=embed_dim, reduction=stride_px) for i in range(depth)]
        self._init_weights(depth)

    def _init_weights(self, depth):
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for block in self.layers:
            for m in block.modules():
                if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                    nn.init.zeros_(m.bias)
            # GPT-2 style: residual-branch projections scaled by 1/sqrt(depth)
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                block.mixer.out_proj.weight /= math.sqrt(depth)

    # --- timm model API -----------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"Vim: global_pool must be 'token' (middle class token), 'avg' or '', got "
                                 f"{global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def load_pretrained(self, checkpoint_path):
        """Load an official Vim checkpoint (a training snapshot with 'model') or a vssm/timm state_dict
        file; timm calls this for ``pretrained=True``. The classifier is skipped when the number of classes
        differs; any other missing or unexpected key is an error that lists them."""
        load_pretrained_file(self, checkpoint_path, checkpoint_filter_fn)

    # --- forward -------------------------------------------------------------------------------------------
    def _embed(self, x):
        """Images -> tokens with the middle class token and the position embedding for their grid."""
        tokens, grid = self.patch_embed(x)
        pos_embed = resample_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size)
        return self.pos_drop(_insert_middle(tokens, self.cls_token) + pos_embed), grid

    def _run_layers(self, x, layers, take_indices=(), norm=False):
        """The blocks; returns the final hidden and residual and the residual stream after each block in
        take_indices (normalised by norm_f if norm)."""
        hidden, residual, taken = x, None, []
        for i, layer in enumerate(layers):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                hidden, residual = checkpoint(layer, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual)
            if i in take_indices:
                stream = self._add_norm_f(hidden, residual) if norm else residual + hidden.float()
                taken.append(stream.to(hidden.dtype))
        return hidden, residual, taken

    def _add_norm_f(self, hidden, residual):
        """norm_f(residual + hidden) in hidden's dtype (the sum alone once norm_f is pruned)."""
        if isinstance(self.norm_f, nn.Identity):
            return (residual + hidden.float()).to(hidden.dtype)
        return add_rms_norm(hidden, residual, self.norm_f.weight, self.norm_f.eps, out_dtype=hidden.dtype)[0]

    def _final_norm(self, hidden, residual):
        return self._add_norm_f(self.drop_path(hidden), residual)

    def forward_features(self, x):
        """(batch, C, H, W) -> normalised tokens (batch, M + 1, D), the class token at index M // 2."""
        x, _ = self._embed(x)
        hidden, residual, _ = self._run_layers(x, self.layers)
        return self._final_norm(hidden, residual)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool:
            patches, cls = _split_middle(x)
            x = cls[:, 0] if self.global_pool == "token" else patches.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ):
        """timm's intermediate-feature API. Intermediates are the residual stream after the chosen blocks
        (the sum the next block normalises), as (batch, D, rows, cols) maps at the patch stride for NCHW or
        (batch, rows * cols, D) for NLC, without the class token (returned apart with return_prefix_tokens).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"Vim: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        x, grid = self._embed(x)
        layers = self.layers[:max_index + 1] if stop_early else self.layers
        hidden, residual, taken = self._run_layers(x, layers, set(take_indices), norm)
        spatial, prefix = zip(*map(_split_middle, taken)) if taken else ((), ())
        if output_fmt == "NCHW":
            spatial = [t.reshape(t.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for t in spatial]
        intermediates = list(zip(spatial, prefix)) if return_prefix_tokens else list(spatial)
        if intermediates_only:
            return intermediates
        return self._final_norm(hidden, residual), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def checkpoint_filter_fn(state_dict, model):
    """Official Vim checkpoints (a training snapshot whose 'model' holds the weights, official key names,
    which are ours) or vssm/timm state_dicts -> this model's state_dict: position embedding resampled to
    the model's token grid (the middle class row kept in the middle), patch embedding adapted to in_chans."""
    state_dict = unwrap_state_dict(state_dict, "model")
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        state_dict["pos_embed"] = resample_pos_embed(pos, model.patch_embed.grid_size)
    w = state_dict.get("patch_embed.proj.weight")
    if w is not None and w.shape[1] != model.patch_embed.in_chans:
        state_dict["patch_embed.proj.weight"] = adapt_input_conv(model.patch_embed.in_chans, w)
    return state_dict


def _create_vim(variant, pretrained=False, **kwargs):
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        Vim, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **own_loader(kwargs),
    )


_HF = "https://huggingface.co/hustvl/{repo}/resolve/main/{file}"


def _cfg(repo, file, **kwargs):
    return {
        "url": _HF.format(repo=repo, file=file), "custom_load": True,  # training snapshots: see load_pretrained
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", "paper_ids": "arXiv:2401.09417", "origin_url": "https://github.com/hustvl/Vim",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "vim_tiny_patch16_224.in1k": _cfg("Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim_tiny_patch16_stride8_224.in1k": _cfg("Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth"),
    "vim_small_patch16_224.in1k": _cfg("Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
    "vim_small_patch16_stride8_224.in1k": _cfg("Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth"),
    "vim_base_patch16_224.in1k": _cfg("Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth"),
})


@register_model
def vim_tiny_patch16_224(pretrained=False, **kwargs) -> Vim:
    """Vim-T: 24 blocks of width 192, 14x14 patches (76.1% ImageNet-1k top-1 released)."""
    args = dict(patch_size=16, embed_dim=192, depth=24)
    return _create_vim("vim_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_tiny_patch16_stride8_224(pretrained=False, **kwargs) -> Vim:
    """Vim-T+: Vim-T fine-tuned on 16-pixel patches at stride 8, a 27x27 grid (78.3% released)."""
    args = dict(patch_size=16, stride=8, embed_dim=192, depth=24)
    return _create_vim("vim_tiny_patch16_stride8_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_small_patch16_224(pretrained=False, **kwargs) -> Vim:
    """Vim-S: 24 blocks of width 384 (80.5% released)."""
    args = dict(patch_size=16, embed_dim=384, depth=24)
    return _create_vim("vim_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_small_patch16_stride8_224(pretrained=False, **kwargs) -> Vim:
    """Vim-S+: Vim-S fine-tuned at stride 8 (81.6% released)."""
    args = dict(patch_size=16, stride=8, embed_dim=384, depth=24)
    return _create_vim("vim_small_patch16_stride8_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_base_patch16_224(pretrained=False, **kwargs) -> Vim:
    """Vim-B: 24 blocks of width 768 (81.9% released)."""
    args = dict(patch_size=16, embed_dim=768, depth=24)
    return _create_vim("vim_base_patch16_224", pretrained, **dict(args, **kwargs))
