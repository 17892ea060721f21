"""Layer-wise learning-rate decay for the vssm backbones (the official Vim segmentation recipe).

mmseg/mmdet's LearningRateDecayOptimizerConstructor recognises ConvNeXt, BEiT and MAE by class name only;
this one reads the layers from the timm model's own ``group_matcher`` (``backbone.model``), so it serves
any vssm backbone.
"""
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from timm.models._manipulate import group_parameters

__all__ = ["LayerDecayOptimWrapperConstructor"]


class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """BEiT's layer-wise decay: with the backbone's L + 1 layer groups (0 = patch/position embeddings and
    class token, 1..L = the blocks), group i trains at lr * decay_rate ** (L + 1 - i) and everything else
    (pyramid, neck, heads) at lr. 1-D parameters, biases and the model's ``no_weight_decay()`` names get no
    weight decay. Config: ``optim_wrapper=dict(constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(decay_rate=0.92), optimizer=dict(type='AdamW', ...))``."""

    def add_params(self, params, module, **kwargs):
        decay_rate = self.paramwise_cfg.get("decay_rate")
        if decay_rate is None:
            raise ValueError("LayerDecayOptimWrapperConstructor: paramwise_cfg needs decay_rate")
        trunk = getattr(getattr(module, "backbone", None), "model", None)
        if trunk is None or not hasattr(trunk, "group_matcher"):
            raise ValueError("LayerDecayOptimWrapperConstructor: the model needs a vssm backbone "
                             "(model.backbone.model with a timm group_matcher)")
        layer_of = group_parameters(trunk, trunk.group_matcher(coarse=False), reverse=True)
        top = max(layer_of.values()) + 1
        no_decay = set(trunk.no_weight_decay())
        groups = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            short = name[len("backbone.model."):] if name.startswith("backbone.model.") else None
            layer = layer_of.get(short, top) if short is not None else top
            decay = not (param.ndim == 1 or name.endswith(".bias") or short in no_decay)
            group = groups.setdefault((layer, decay), dict(
                params=[], lr=self.base_lr * decay_rate ** (top - layer),
                weight_decay=self.base_wd if decay else 0.0))
            group["params"].append(param)
        params.extend(groups[k] for k in sorted(groups))
        print_log(f"layer-wise lr decay {decay_rate}: {top} backbone layer groups, lr scales "
                  f"{decay_rate ** top:.4g} (embeddings) .. 1 (heads)", logger="current")
