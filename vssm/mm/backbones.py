"""mmseg / mmdet backbones over vssm's timm models: VMamba (four stages) and Vim (plain, made a pyramid).

Both are thin: they hold the timm model (``self.model``, created by ``timm.create_model`` and pruned to the
blocks the outputs need) and add only what dense prediction puts on top of it, as the official code does:
VMamba a LayerNorm per output stage, Vim a ViTDet-style simple feature pyramid. ``init_cfg=dict(type=
'Pretrained', checkpoint=...)`` reads official checkpoints (training snapshots, official key names) and
vssm/timm state_dicts, local files or URLs, through the model's own checkpoint_filter_fn; a ``prefix``
(e.g. 'backbone.') takes the backbone out of a whole detector/segmentor checkpoint.
"""
import math
import os
import timm
import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmengine.logging import print_log
from mmengine.model import BaseModule
from timm.layers import LayerNorm2d, RotaryEmbeddingCat, apply_rot_embed_cat
from torch.utils.checkpoint import checkpoint

from vssm.models import vim as _vim
from vssm.models import vmamba as _vmamba
from vssm.models._checkpoint import read_checkpoint, unwrap_state_dict

__all__ = ["VMambaBackbone", "VimBackbone", "load_backbone_checkpoint"]


def _check_out_indices(name, out_indices, num, unit):
    """out_indices as a tuple of non-negative ints in [0, num); negative ones count from the end."""
    idx = (out_indices,) if isinstance(out_indices, int) else tuple(out_indices)
    if not idx or any(not isinstance(i, int) or not -num <= i < num for i in idx):
        raise ValueError(f"{name}: out_indices {tuple(idx)} outside the backbone's {num} {unit} "
                         f"(valid: 0..{num - 1}, or -{num}..-1)")
    idx = tuple(i % num for i in idx)
    if list(idx) != sorted(set(idx)):
        raise ValueError(f"{name}: out_indices must be increasing and distinct, got {tuple(out_indices)}")
    return idx


def _keys(keys, limit=10):
    keys = sorted(keys)
    return f"{keys[:limit]}{f' and {len(keys) - limit} more' if len(keys) > limit else ''}"


def _local_file(filename):
    if str(filename).startswith(("http://", "https://")):
        from timm.models._hub import download_cached_file
        return download_cached_file(str(filename), check_hash=False, progress=True)
    return os.fspath(filename)


def load_backbone_checkpoint(backbone, filename, filter_fn, prefix=None):
    """Load a checkpoint into a backbone adapter: the timm model's weights (official or vssm/timm names,
    through filter_fn(state_dict, model)), strictly, plus any of the adapter's own layers the file has
    (e.g. a whole segmentor checkpoint with ``prefix='backbone.'``). The classifier and the pruned blocks
    are skipped. Missing or unexpected keys raise a RuntimeError naming them."""
    path = _local_file(filename)
    state = unwrap_state_dict(read_checkpoint(path))
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise RuntimeError(f"{type(backbone).__name__}: no key of checkpoint {path} starts with {prefix!r}")
    extra = {k for k in backbone.state_dict() if not k.startswith("model.")}  # the adapter's own layers
    extra_state = {k: state.pop(k) for k in list(state) if k in extra}
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    model = backbone.model
    state = filter_fn(state, model)
    classifier = model.pretrained_cfg.get("classifier", "head") + "."
    state = {k: v for k, v in state.items() if not (k.startswith(classifier) or k in backbone.pruned_keys)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{type(backbone).__name__}: checkpoint {path} does not match {backbone.model_name}: "
                           f"missing keys {_keys(missing)}, unexpected keys {_keys(unexpected)}")
    if extra_state:
        backbone.load_state_dict(extra_state, strict=False)
    print_log(f"{type(backbone).__name__}: loaded {len(state) + len(extra_state)} tensors from {path}",
              logger="current")


class _TimmBackbone(BaseModule):
    """Shared parts: the pruned timm model, frozen stages, Pretrained init_cfg."""
    filter_fn = None
    unit = "stages"  # what out_indices and frozen_stages count

    def __init__(self, model_name, out_indices, frozen_stages, with_cp, init_cfg, **model_kwargs):
        super().__init__(init_cfg=init_cfg)
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
        self.out_indices = _check_out_indices(type(self).__name__, out_indices, self.num_stages, self.unit)
        full = set(self.model.state_dict())
        self.model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        self.pruned_keys = full - set(self.model.state_dict())  # in checkpoints, not in this backbone
        if with_cp:
            self.model.set_grad_checkpointing(True)
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f"{type(self).__name__}: frozen_stages must be in [-1, {self.num_stages}], "
                             f"got {frozen_stages}")
        self.frozen_stages = frozen_stages

    @property
    def num_stages(self):
        raise NotImplementedError

    def frozen_modules(self):
        """The modules (or parameters) that frozen_stages freezes."""
        raise NotImplementedError

    def _freeze(self):
        for m in self.frozen_modules():
            if isinstance(m, nn.Module):
                m.eval()
            for p in (m.parameters() if isinstance(m, nn.Module) else [m]):
                p.requires_grad = False

    def train(self, mode=True):
        super().train(mode)
        self._freeze()
        return self

    def init_weights(self):
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get("type") == "Pretrained":
            load_backbone_checkpoint(self, cfg["checkpoint"], type(self).filter_fn, cfg.get("prefix"))
            self._is_init = True
        else:  # the timm model initialised itself when it was built
            super().init_weights()
        self._freeze()


class VMambaBackbone(_TimmBackbone):
    """VMamba (vssm timm model ``model_name``) for mmseg/mmdet: the outputs of the stages in out_indices
    (strides 4, 8, 16, 32; channels dims[i]), each normalised by its own LayerNorm2d as in the official
    segmentation/detection backbone.

    Args:
        model_name: 'vmamba_tiny', 'vmamba_small' or 'vmamba_base'.
        out_indices: stages to output.
        frozen_stages: -1 none; 0 the stem; k the stem and the first k stages.
        drop_path_rate: stochastic depth (official: 0.2 / 0.3 / 0.6 for T / S / B).
        with_cp: gradient checkpointing.
        init_cfg: ``dict(type='Pretrained', checkpoint=file or URL[, prefix=...])``.
        **model_kwargs: more timm.create_model arguments (e.g. depths, dims for a reduced model).
    """
    filter_fn = staticmethod(_vmamba.checkpoint_filter_fn)

    def __init__(self, model_name="vmamba_tiny", out_indices=(0, 1, 2, 3), frozen_stages=-1, drop_path_rate=0.2,
                 with_cp=False, init_cfg=None, **model_kwargs):
        super().__init__(model_name, out_indices, frozen_stages, with_cp, init_cfg,
                         drop_path_rate=drop_path_rate, **model_kwargs)
        self.channels = [self.model.feature_info[i]["num_chs"] for i in self.out_indices]
        for i, c in zip(self.out_indices, self.channels):
            self.add_module(f"outnorm{i}", LayerNorm2d(c, eps=1e-5))
        self._freeze()

    @property
    def num_stages(self):
        return len(self.model.feature_info)

    def frozen_modules(self):
        if self.frozen_stages < 0:
            return []
        stages = self.model.stages[:self.frozen_stages]  # (pruned stages are gone)
        mods = [self.model.stem, *stages]
        return mods + [getattr(self, f"outnorm{i}") for i in self.out_indices if i < self.frozen_stages]

    def forward(self, x):
        feats = self.model.forward_intermediates(x, indices=list(self.out_indices), stop_early=True,
                                                 intermediates_only=True)
        return tuple(getattr(self, f"outnorm{i}")(f) for i, f in zip(self.out_indices, feats))


class VimBackbone(_TimmBackbone):
    """Vim (vssm timm model ``model_name``) for mmseg/mmdet, as the official segmentation code
    (hustvl/Vim seg/backbone/vim.py, ``VisionMambaSeg``) runs it: the patch tokens with their position
    embedding and no class token; the features of the blocks in out_indices, unnormalised, as (B, D, H/s,
    W/s) maps at the patch stride s, turned into a pyramid at strides 4, 8, 16, 32 (ViTDet's simple
    pyramid: transposed convs up, max-pool down; with one out index its map feeds all four levels).

    Args:
        model_name: e.g. 'vim_tiny_patch16_224', 'vim_small_patch16_224'.
        img_size: the training crop size; the position embedding (also a pretrained one) is resampled to
            it, and other sizes are resampled on the fly. Must fit the patching (multiple of the stride).
        out_indices: blocks to output (1 or 4 of them).
        feature: 'mixer', the output of each block's mixer (the branch it adds; the official Vim-T run), or
            'residual', the residual stream after the block (the official Vim-S run's
            ``use_residual_as_feature=True, last_layer_process='add'``).
        rope: rotate the tokens (and the residual stream) before every block by a 2-D rotary position
            embedding, as the official Vim-S seg config does (``if_rope=True, if_rope_residual=True``: EVA-02's
            RoPE, timm's ``RotaryEmbeddingCat`` over all D channels, positions scaled to the pretraining
            grid). It has no parameters, so the released (RoPE-free) checkpoints load as they are.
        norm_cfg: the norm between the two transposed convs of the stride-4 level.
        frozen_stages: -1 none; 0 the patch/position embeddings and the class token; k those and the
            first k blocks.
        drop_path_rate: stochastic depth (0.1 in the official segmentation code).
        with_cp: gradient checkpointing.
        init_cfg: ``dict(type='Pretrained', checkpoint=file or URL[, prefix=...])``.
        **model_kwargs: more timm.create_model arguments (e.g. depth, embed_dim for a reduced model).
    """
    filter_fn = staticmethod(_vim.checkpoint_filter_fn)
    unit = "blocks"
    strides = (4, 8, 16, 32)

    def __init__(self, model_name="vim_tiny_patch16_224", img_size=512, out_indices=(5, 11, 17, 23),
                 feature="mixer", rope=False, norm_cfg=dict(type="SyncBN", requires_grad=True), frozen_stages=-1,
                 drop_path_rate=0.1, with_cp=False, init_cfg=None, **model_kwargs):
        if feature not in ("mixer", "residual"):
            raise ValueError(f"VimBackbone: feature must be 'mixer' or 'residual', got {feature!r}")
        self.feature = feature
        super().__init__(model_name, out_indices, frozen_stages, with_cp, init_cfg, img_size=img_size,
                         drop_path_rate=drop_path_rate, **model_kwargs)
        if len(self.out_indices) not in (1, len(self.strides)):
            raise ValueError(f"VimBackbone: give 1 or {len(self.strides)} out_indices (one per pyramid level "
                             f"at strides {self.strides}), got {self.out_indices}")
        dim, stride = self.model.embed_dim, self.model.patch_embed.stride[0]
        self.channels = [dim] * len(self.strides)
        self.rope = None
        if rope:  # the pretraining grid (224 / patch stride) is the reference the positions are scaled to
            pretrain_grid = [s // stride for s in self.model.pretrained_cfg["input_size"][1:]]
            self.rope = RotaryEmbeddingCat(dim, in_pixels=False, ref_feat_shape=pretrain_grid)
        self.fpns = nn.ModuleList([self._resample(dim, stride / s, norm_cfg) for s in self.strides])
        self._freeze()

    @staticmethod
    def _resample(dim, scale, norm_cfg):
        """Token map -> scale x its size: 2x transposed convs (norm + GELU between them) or max-pooling."""
        if scale <= 1:
            return nn.Identity() if scale == 1 else nn.MaxPool2d(round(1 / scale))
        layers = []
        for j in range(round(math.log2(scale))):
            if j:
                layers += [build_norm_layer(norm_cfg, dim)[1], nn.GELU()]
            layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        return nn.Sequential(*layers)

    @property
    def num_stages(self):
        return len(self.model.layers)

    def frozen_modules(self):
        if self.frozen_stages < 0:
            return []
        m = self.model
        return [m.patch_embed, m.pos_embed, m.cls_token, *m.layers[:self.frozen_stages]]

    def forward(self, x):
        m = self.model
        tokens, (h, w) = m.patch_embed(x)
        pos_embed, _ = _vim._split_middle(_vim.resample_pos_embed(m.pos_embed, (h, w), m.patch_embed.grid_size))
        hidden, residual, taken = m.pos_drop(tokens + pos_embed), None, {}
        rot = self.rope.get_embed([h, w]).to(x.device) if self.rope is not None else None
        for i, layer in enumerate(m.layers):
            if rot is not None:
                hidden = apply_rot_embed_cat(hidden, rot)
                residual = None if residual is None else apply_rot_embed_cat(residual, rot)
            if m.grad_checkpointing:
                hidden, residual = checkpoint(layer, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual)
            if i in self.out_indices:
                f = hidden if self.feature == "mixer" else (residual + hidden.float()).to(hidden.dtype)
                taken[i] = f.transpose(1, 2).reshape(len(x), -1, h, w)
        feats = [taken[i] for i in self.out_indices]
        if len(feats) == 1:
            feats = feats * len(self.fpns)
        return tuple(fpn(f) for fpn, f in zip(self.fpns, feats))
