"""vssm: vision state-space backbones on one shared Triton selective scan."""
__version__ = "0.1.0"
