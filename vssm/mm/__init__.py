"""OpenMMLab integration: ``custom_imports=dict(imports=['vssm.mm'], allow_failed_imports=False)``.

Importing this module
- puts a torchvision-based stand-in for mmcv's compiled ops in place when mmcv is mmcv-lite
  (`vssm.mm.mmcv_ext`; nothing changes when a compiled mmcv is installed),
- registers `VMambaBackbone` and `VimBackbone` in mmseg's and mmdet's MODELS (whichever is installed),
- registers `LayerDecayOptimWrapperConstructor` and the DiffuSSM models (the class as 'DiffuSSM' and every
  timm name, e.g. 'diffussm_xl_256') in mmengine's root registries, so every scope finds them.
"""
import importlib

from .mmcv_ext import install as _install_mmcv_ext

_install_mmcv_ext()  # before anything imports mmcv.ops

import timm  # noqa: E402
from mmengine.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS  # noqa: E402

from vssm.models.diffussm import DiffuSSM  # noqa: E402

from .backbones import VimBackbone, VMambaBackbone, load_backbone_checkpoint  # noqa: E402
from .optim import LayerDecayOptimWrapperConstructor  # noqa: E402

__all__ = ["VMambaBackbone", "VimBackbone", "LayerDecayOptimWrapperConstructor", "load_backbone_checkpoint"]


def _register(registry, module, name=None):
    name = name or module.__name__
    if registry.module_dict.get(name) is not module:
        registry.register_module(name=name, module=module, force=True)


def _timm_builder(name):
    def build(**kwargs):
        return timm.create_model(name, **kwargs)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"timm.create_model({name!r}, **kwargs)"
    return build


for _scope in ("mmseg", "mmdet"):
    try:
        _registry = importlib.import_module(f"{_scope}.registry").MODELS
    except ImportError:
        continue
    for _module in (VMambaBackbone, VimBackbone):
        _register(_registry, _module)

_register(OPTIM_WRAPPER_CONSTRUCTORS, LayerDecayOptimWrapperConstructor)
_register(MODELS, DiffuSSM)
for _name in timm.list_models("diffussm_*"):
    _register(MODELS, _timm_builder(_name), _name)
