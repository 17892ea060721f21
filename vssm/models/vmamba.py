"""VMamba: a hierarchical vision backbone built on 2-D selective scans (SS2D).

Paper: Yue Liu, Yunjie Tian, Yuzhong Zhao, Hongtian Yu, Lingxi Xie, Yaowei Wang, Qixiang Ye, Jianbin Jiao and
Yunfan Liu, "VMamba: Visual State Space Model", NeurIPS 2024 (arXiv:2401.10166).
Official code and weights: https://github.com/MzeroMiko/VMamba (MIT license). This is an independent
implementation; no code was copied from it.

The architecture is the one of the newest released ImageNet-1k checkpoints (`vssm1_tiny_0230s`,
`vssm_small_0229`, `vssm_base_0229`; official forward_type "v05_noz"), so that their state_dicts load and give
the official outputs:

* stem: two 3x3 stride-2 convs (LayerNorm2d and GELU between them, LayerNorm2d after): stride 4.
* four stages; every stage but the first starts with a 3x3 stride-2 conv + LayerNorm2d (the official model
  keeps that conv at the end of the previous stage; `checkpoint_filter_fn` moves its keys).
* VSSBlock: x + SS2D(LN(x)), then x + MLP(LN(x)).
* SS2D: 1x1 in_proj -> 3x3 depthwise conv -> SiLU -> selective scans in four orders (row-major, column-major and
  both reversed) with state size 1 -> LayerNorm2d -> 1x1 out_proj. No gate (the "_noz" of v05_noz).

Layout: the official model runs channels-first (B, C, H, W) with LayerNorm2d and 1x1 convs; this one keeps the
stages channels-last (B, H, W, C), where every norm is a plain LayerNorm and every 1x1 map a Linear over the
last dimension (same parameters, same keys). The depthwise, downsampling and stem convs and the scan take
(B, C, H, W) views of these channels-last tensors (cuDNN runs channels_last convs; the scan reads any strides),
so no map is ever transposed in memory. On a GPU the channels-first version spent more time permuting maps
for LayerNorm2d than in the scan. Features, intermediates and forward_features are returned as (B, C, H, W)
like the official model's.

The four-direction scan runs through `vssm.kernels.cross_selective_scan`, which reads the map in the four scan
orders itself and accumulates the merged float32 output: the per-direction projections (x_proj, dt_proj) are
per-pixel Linears on the channels-last map, and the scan reads x, the time steps and B/C as strided views of
their outputs, so no (B, 4, C, H*W) cross-scan copy of the input or of the output is made. On CUDA the scan
runs the Triton kernels, elsewhere the exact PyTorch reference. Under torch.compile the Triton kernels are
traced into the graph with the rest of the model (the CPU reference stays one opaque call).

Input size: any (H, W) works. Every stride-2 conv is k3 s2 p1, which maps a side n to ceil(n / 2), so an odd
side is rounded up at each of the five halvings (225 -> 113 -> 57 -> 29 -> 15 -> 8) and stage i has
ceil(H / 2^(i+2)) x ceil(W / 2^(i+2)) positions; non-square maps are scanned as they are.

Official checkpoints are training snapshots that also pickle a yacs CfgNode under 'config'; `pretrained=True`
and `pretrained_cfg_overlay=dict(file=...)` read them with `VMamba.load_pretrained`, for their tensors only
(no yacs needed, no pickled code run; `vssm.models._checkpoint`).
"""
import math
import re
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import adapt_input_conv

from vssm.kernels import cross_selective_scan, layer_norm

from ._checkpoint import load_pretrained_file, own_loader, unwrap_state_dict
from ._ssm import init_dt_bias_

__all__ = ["VMamba", "SS2D", "VSSBlock", "checkpoint_filter_fn"]

class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm through `vssm.kernels.layer_norm` (Triton on CUDA: PyTorch's kernel is slow on many short
    rows); the result is contiguous even for a strided (e.g. permuted channels-first) input."""

    def forward(self, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, out_dtype=out_dtype)


# the official LayerNorm2d is nn.LayerNorm over the channels, with its default eps
_norm_layer = partial(LayerNorm, eps=1e-5)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> a (B, C, H, W) view (channels_last memory format, no copy)."""
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> a (B, H, W, C) view."""
    return x.permute(0, 2, 3, 1)


class SS2D(nn.Module):
    """2-D selective scan (VMamba's "v05_noz" form): in_proj, depthwise conv, SiLU, four-direction selective
    scan with per-direction projections, out_norm, out_proj.

    Parameters of the scan (K = 4 directions, D = d_inner, R = dt_rank, N = d_state), named as officially:
    x_proj_weight (K, R + 2N, D), dt_projs_weight (K, D, R), dt_projs_bias (K, D), A_logs (K*D, N), Ds (K*D).
    """

    def __init__(
            self,
            dim: int,
            ssm_ratio: float = 2.0,
            d_state: int = 1,
            dt_rank: Union[int, str] = 'auto',
            d_conv: int = 3,
            conv_bias: bool = False,
            dt_min: float = 1e-3,
            dt_max: float = 0.1,
            dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_inner = d_inner = int(ssm_ratio * dim)
        self.d_state = d_state
        self.dt_rank = dt_rank = math.ceil(dim / 16) if dt_rank == 'auto' else int(dt_rank)
        self.num_directions = K = 4

        self.in_proj = nn.Linear(dim, d_inner, bias=False)
        self.dwconv = nn.Conv2d(
            d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        self.act = nn.SiLU()
        self.x_proj_weight = nn.Parameter(torch.empty(K, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, d_inner))
        self.A_logs = nn.Parameter(torch.empty(K * d_inner, d_state))
        self.Ds = nn.Parameter(torch.empty(K * d_inner))
        self.out_norm = _norm_layer(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self.init_ssm_parameters(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def init_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        """The official "v0" init: x_proj as nn.Linear's default, dt_proj weight uniform +-R^-0.5, dt bias the
        inverse softplus of a log-uniform dt in [dt_min, dt_max], A = -(1..N) per channel, D = 1."""
        bound = self.d_inner ** -0.5
        self.x_proj_weight.uniform_(-bound, bound)
        bound = self.dt_rank ** -0.5
        self.dt_projs_weight.uniform_(-bound, bound)
        init_dt_bias_(self.dt_projs_bias, dt_min, dt_max, dt_init_floor)
        A = torch.arange(1, self.d_state + 1, dtype=self.A_logs.dtype, device=self.A_logs.device)
        self.A_logs.copy_(A.log().expand_as(self.A_logs))
        self.Ds.fill_(1.)

    def scan(self, x: torch.Tensor) -> torch.Tensor:
        """The SS2D core on the activated map x (B, H, W, D); returns the merged scan output (B, H, W, D) in
        float32 (float64 for float64 x). Everything stays channels-last: the scan reads x, the time steps
        and B/C as strided views of these per-pixel projections."""
        batch, H, W, D = x.shape
        K, R, N = self.num_directions, self.dt_rank, self.d_state
        # per-direction projections, per pixel: channels [dt (R) | B (N) | C (N)] of direction 0, then 1, ...
        x_dbl = F.linear(x, self.x_proj_weight.view(K * (R + 2 * N), D))
        x_dbl = x_dbl.view(batch, H, W, K, R + 2 * N)
        if x.is_cuda:  # dt_proj of every direction as one block-diagonal map over x_dbl (zeros at B and C):
            # a dense GEMM, whose weight gradient is 5x faster than cuBLAS's batched one over 4 x 6..24 channels
            dt_weight = torch.block_diag(*F.pad(self.dt_projs_weight, (0, 2 * N)).unbind(0))
            dts = F.linear(x_dbl.flatten(3), dt_weight).view(batch, H, W, K, D)
        else:  # the per-direction product itself (no zero blocks: the FLOPs that tools/flops.py counts)
            dts = torch.einsum("bhwkr,kdr->bhwkd", x_dbl[..., :R], self.dt_projs_weight)
        maps = lambda t: t.permute(0, 3, 4, 1, 2)  # noqa: E731  (B, H, W, K, C) -> (B, K, C, H, W) views
        f32 = lambda p: p.to(torch.promote_types(p.dtype, torch.float32))  # noqa: E731  (fp32 at least)
        y = cross_selective_scan(
            _nchw(x), maps(dts), -f32(self.A_logs).exp(), maps(x_dbl[..., R:R + N]), maps(x_dbl[..., R + N:]),
            f32(self.Ds), f32(self.dt_projs_bias).view(-1), delta_softplus=True)
        return _nhwc(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) -> (B, H, W, dim)."""
        x = self.act(self.dwconv(_nchw(self.in_proj(x))))  # channels-last throughout
        y = self.scan(_nhwc(x))
        # the scan output is float32; normalise it in the norm's dtype (float32 under autocast, like the
        # official "oflex" path), then continue in the activations' dtype
        y = self.out_norm(y.to(self.out_norm.weight.dtype), out_dtype=x.dtype)
        return self.out_proj(y)


class VSSBlock(nn.Module):
    """VMamba block: x + drop_path(SS2D(norm1(x))), then x + drop_path(MLP(norm2(x)))."""

    def __init__(
            self,
            dim: int,
            drop_path: float = 0.,
            ssm_ratio: float = 2.0,
            d_state: int = 1,
            dt_rank: Union[int, str] = 'auto',
            d_conv: int = 3,
            conv_bias: bool = False,
            mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.norm1 = _norm_layer(dim)
        self.ss2d = SS2D(dim, ssm_ratio=ssm_ratio, d_state=d_state, dt_rank=dt_rank, d_conv=d_conv,
                         conv_bias=conv_bias)
        self.norm2 = _norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # fc1 -> GELU -> fc2
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim)."""
        # both norms feed a Linear, which under autocast would cast their float32 output to the autocast
        # dtype anyway: writing that dtype directly gives the same values and spares a pass over the map
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        x = x + self.drop_path(self.ss2d(self.norm1(x, out_dtype=dtype)))
        x = x + self.drop_path(self.mlp(self.norm2(x, out_dtype=dtype)))
        return x


class Stem(nn.Module):
    """Patch embedding to stride 4: conv3x3/2 -> LN -> GELU -> conv3x3/2 -> LN (official "v2"); images
    (B, C, H, W) in, (B, H/4, W/4, dim) out."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = _norm_layer(dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = _norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"VMamba expects images of shape (batch, {self.in_chans}, height, width), "
                             f"got {tuple(x.shape)}")
        x = self.act(self.norm1(_nhwc(self.conv1(x))))
        return self.norm2(_nhwc(self.conv2(_nchw(x))))


class Downsample(nn.Module):
    """conv3x3/2 -> LN (official "v3"), (B, H, W, C) in and out."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, 3, stride=2, padding=1)
        self.norm = _norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_nhwc(self.conv(_nchw(x))))


class VMambaStage(nn.Module):
    """Optional downsample followed by VSSBlocks, (B, H, W, C) in and out."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            downsample: bool = True,
            drop_path_rates: Optional[Sequence[float]] = None,
            **block_kwargs,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        drop_path_rates = drop_path_rates or [0.] * depth
        self.blocks = nn.Sequential(*[
            VSSBlock(dim, drop_path=drop_path_rates[i], **block_kwargs) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class VMamba(nn.Module):
    """VMamba (Liu et al. 2024, "VMamba: Visual State Space Model"), the v2 ImageNet-1k architecture.

    Args:
        img_size: accepted for timm API compatibility; the model takes any input size (see the module docs).
        in_chans: input image channels.
        num_classes: classifier classes (0 for no classifier).
        global_pool: head pooling type ('avg', 'max', ...).
        depths: blocks per stage.
        dims: channels per stage, or the first stage's channels (doubled at every stage).
        ssm_ratio: SS2D inner width over the block width.
        d_state: SSM state size N (1 in the released models).
        dt_rank: rank of the dt projection; 'auto' = ceil(dim / 16).
        d_conv: SS2D depthwise conv kernel size.
        conv_bias: bias in the SS2D depthwise conv.
        mlp_ratio: MLP hidden width over the block width.
        drop_rate: head dropout rate.
        drop_path_rate: stochastic depth rate, linear over all blocks (the official recipes train tiny /
            small / base with 0.2 / 0.3 / 0.6).

    Weight decay: the official recipe exempts only 1-D parameters and biases (as timm's optimizer factory
    does by default), so A_logs and dt_projs_bias are decayed; `no_weight_decay` adds nothing.
    """

    def __init__(
            self,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Tuple[int, ...] = (2, 2, 8, 2),
            dims: Union[int, Tuple[int, ...]] = 96,
            ssm_ratio: float = 1.0,
            d_state: int = 1,
            dt_rank: Union[int, str] = 'auto',
            d_conv: int = 3,
            conv_bias: bool = False,
            mlp_ratio: float = 4.0,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        num_stages = len(depths)
        if isinstance(dims, int):
            dims = tuple(dims * 2 ** i for i in range(num_stages))
        if len(dims) != num_stages:
            raise ValueError(f"dims {tuple(dims)} and depths {tuple(depths)} must have the same length")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.img_size = img_size

        self.stem = Stem(in_chans, dims[0])
        n = sum(depths)
        dp_rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear over all blocks
        stages = []
        self.feature_info = []
        for i in range(num_stages):
            first = sum(depths[:i])
            stages.append(VMambaStage(
                dims[i - 1] if i else dims[0], dims[i], depths[i], downsample=i > 0,
                drop_path_rates=dp_rates[first:first + depths[i]],
                ssm_ratio=ssm_ratio, d_state=d_state, dt_rank=dt_rank, d_conv=d_conv, conv_bias=conv_bias,
                mlp_ratio=mlp_ratio))
            self.feature_info += [dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}')]
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dims[-1]
        self.norm = _norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt='NCHW')
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):  # the official 1x1 maps (Linear2d) are Linears here
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False):
        self.num_classes = num_classes
        self.head.in_features = self.num_features  # changed by prune_intermediate_layers
        self.head.reset(num_classes, global_pool)
        self.head.to(self.stem.conv1.weight.device)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the stage outputs (B, dims[i], H / 2^(i+2), W / 2^(i+2)).

        Args:
            x: input images.
            indices: take the last n stages if an int, all if None, the listed ones if a sequence.
            norm: apply the final norm to the last stage's output when it is taken.
            stop_early: stop after the last stage taken.
            output_fmt: 'NCHW' only.
            intermediates_only: return only the intermediates.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        x = self.stem(x)
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(_nchw(self.norm(x) if norm and feat_idx == last_idx else x))
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return _nchw(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and norm / head) not needed for the given intermediates; returns their indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for (and only applied to) the last stage
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return _nchw(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str, use_ema: bool = False):
        """Load an official VMamba checkpoint file (or a vssm/timm state_dict file) into this model.

        timm calls this for the registered weights and for ``pretrained_cfg_overlay=dict(file=...)``. The file
        is read for its tensors only (`vssm.models._checkpoint.read_checkpoint`: no yacs needed, no pickled
        code run), its 'model' entry ('model_ema' if use_ema) mapped by `checkpoint_filter_fn` and loaded
        strictly; like timm's loader, the first conv is adapted to ``in_chans`` and the classifier skipped when
        the number of classes differs. Any other missing or unexpected key raises a RuntimeError listing them.
        """
        def filter_fn(checkpoint, model):
            key = 'model_ema' if use_ema and isinstance(checkpoint.get('model_ema'), dict) else 'model'
            state_dict = checkpoint_filter_fn(unwrap_state_dict(checkpoint, key), model)
            conv = 'stem.conv1.weight'
            if conv in state_dict and state_dict[conv].shape[1] != model.in_chans:
                state_dict[conv] = adapt_input_conv(model.in_chans, state_dict[conv])
            return state_dict

        load_pretrained_file(self, checkpoint_path, filter_fn)


# ---------------------------------------------------------------------------------------------------------
# official checkpoints
# ---------------------------------------------------------------------------------------------------------
def _official_key(k: str) -> str:
    """One official state_dict key (incl. the legacy names the official loader still renames) -> ours."""
    k = re.sub(r'^patch_embed\.proj\.', 'patch_embed.0.', k)  # legacy names
    k = re.sub(r'^patch_embed\.norm\.', 'patch_embed.2.', k)
    k = re.sub(r'\.ln_1\.', '.norm.', k)
    k = re.sub(r'\.self_attention\.', '.op.', k)
    k = re.sub(r'^norm\.', 'classifier.norm.', k)
    k = re.sub(r'^head\.', 'classifier.head.', k)
    # patch_embed = Sequential(conv, -, LN, -, GELU, conv, -, LN)
    for idx, name in (('0', 'conv1'), ('2', 'norm1'), ('5', 'conv2'), ('7', 'norm2')):
        k = re.sub(rf'^patch_embed\.{idx}\.', f'stem.{name}.', k)
    # the conv + LN closing official stage i open our stage i + 1
    k = re.sub(r'^layers\.(\d+)\.downsample\.([13])\.',
               lambda m: f"stages.{int(m[1]) + 1}.downsample.{'conv' if m[2] == '1' else 'norm'}.", k)
    k = re.sub(r'^layers\.(\d+)\.blocks\.(\d+)\.norm\.', r'layers.\1.blocks.\2.norm1.', k)
    k = re.sub(r'^layers\.(\d+)\.blocks\.(\d+)\.op\.conv2d\.', r'layers.\1.blocks.\2.op.dwconv.', k)
    k = re.sub(r'^layers\.(\d+)\.blocks\.(\d+)\.op\.', r'layers.\1.blocks.\2.ss2d.', k)
    k = re.sub(r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.', k)
    k = re.sub(r'^classifier\.norm\.', 'norm.', k)
    k = re.sub(r'^classifier\.head\.', 'head.fc.', k)
    return k


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official VMamba state_dict (or a whole official checkpoint dict) to this model's keys.

    Accepts the official key names (incl. legacy ones), 1x1 map (Linear2d) weights stored 2-D or as (out, in, 1, 1),
    a checkpoint dict with 'model' (taken in preference to 'model_ema', as the official downstream code does),
    'module.' prefixes, and timm-format state dicts (returned with only the 2-D reshape applied). Keys that match
    nothing are kept, so a strict load reports them.
    """
    state_dict = unwrap_state_dict(state_dict, 'model')
    official = any(k.startswith(('layers.', 'patch_embed.', 'classifier.')) for k in state_dict)
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if official:
            k = _official_key(k)
        if k in own and own[k].dim() == 2 and v.dim() == 4 and v.shape[2:] == (1, 1):
            v = v.reshape(v.shape[:2])  # a Linear weight saved as a 1x1 conv weight
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------
def _create_vmamba(variant: str, pretrained: bool = False, **kwargs) -> VMamba:
    # own_loader: an overlaid file/url is read by VMamba.load_pretrained too (official snapshots and timm
    # state dicts alike); timm would send it to its weights-only loader, which refuses the yacs config
    return build_model_with_cfg(
        VMamba, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),  # features via forward_intermediates
        **own_loader(kwargs))


_RELEASE_URL = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/'


def _cfg(url: str = '', **kwargs):
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': 'head.fc',
        'license': 'mit', 'paper_ids': 'arXiv:2401.10166', 'paper_name': 'VMamba: Visual State Space Model',
        'origin_url': 'https://github.com/MzeroMiko/VMamba',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # official training snapshots: read by VMamba.load_pretrained (custom_load), 'model' weights
    'vmamba_tiny.in1k': _cfg(url=_RELEASE_URL + 'vssm1_tiny_0230s_ckpt_epoch_264.pth', custom_load=True),
    'vmamba_small.in1k': _cfg(url=_RELEASE_URL + 'vssm_small_0229_ckpt_epoch_222.pth', custom_load=True),
    'vmamba_base.in1k': _cfg(url=_RELEASE_URL + 'vssm_base_0229_ckpt_epoch_237.pth', custom_load=True),
})


@register_model
def vmamba_tiny(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-T (official vmamba_tiny_s1l8, 30.2M params, 82.6% top-1)."""
    model_args = dict(depths=(2, 2, 8, 2), dims=96, ssm_ratio=1.0)
    return _create_vmamba('vmamba_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_small(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-S (official vmamba_small_s2l15, 50.1M params, 83.6% top-1)."""
    model_args = dict(depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0)
    return _create_vmamba('vmamba_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vmamba_base(pretrained: bool = False, **kwargs) -> VMamba:
    """VMamba-B (official vmamba_base_s2l15, 88.6M params, 83.9% top-1)."""
    model_args = dict(depths=(2, 2, 15, 2), dims=128, ssm_ratio=2.0)
    return _create_vmamba('vmamba_base', pretrained=pretrained, **dict(model_args, **kwargs))
