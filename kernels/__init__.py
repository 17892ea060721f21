"""vssm.kernels: the selective scan (Mamba's S6) shared by every vssm model.

On CUDA tensors it runs Triton kernels (forward and backward); elsewhere an exact PyTorch reference. Beside it, with
the same backend rule: Mamba's depthwise causal conv1d with SiLU, one direction of Mamba's conv + projections +
scan as a single autograd node (`mamba_inner`), a LayerNorm over the last dimension for the models' many short
rows, and Mamba's residual add fused with its RMSNorm.
"""
from .conv import causal_conv1d, causal_conv1d_ref
from .inner import mamba_inner
from .norm import add_rms_norm, layer_norm
from .reference import cross_merge_ref, cross_scan_ref, cross_selective_scan_ref, selective_scan_ref
from .scan import (count_scan_flops, cross_merge, cross_scan, cross_selective_scan, scan_backend, selective_scan,
                   triton_available)

__all__ = ["selective_scan", "causal_conv1d", "mamba_inner", "layer_norm", "add_rms_norm", "cross_selective_scan",
           "cross_scan", "cross_merge", "scan_backend", "count_scan_flops", "triton_available", "causal_conv1d_ref",
           "selective_scan_ref", "cross_selective_scan_ref", "cross_scan_ref", "cross_merge_ref"]
