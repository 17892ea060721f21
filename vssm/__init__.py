"""vssm: vision state-space backbones on one shared Triton selective scan.

Importing vssm registers its models with timm: ``import vssm; timm.create_model("vim_tiny_patch16_224")``.
"""
__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers the timm models)
