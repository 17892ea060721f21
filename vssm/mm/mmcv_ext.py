"""A stand-in for mmcv's compiled ops (``mmcv._ext``) on top of torchvision, for mmcv-lite.

mmcv has no wheels on PyPI; mmcv-lite is the same Python package without the compiled ``mmcv._ext``, and
``import mmcv.ops`` (which mmseg.models and mmdet.models do) fails without it. `install` registers a module
object as ``mmcv._ext`` that gives what UperNet and Mask R-CNN need from it: ``nms`` (torchvision.ops.nms)
and RoIAlign in "avg" mode (torchvision.ops.roi_align, backward by autograd through that linear op). Every
other op raises NotImplementedError when called, naming the op. Nothing is installed when a compiled
``mmcv._ext`` is importable (mmcv built from source) or when ``mmcv._ext`` is already loaded.
"""
import importlib.machinery
import importlib.util
import sys
import types

import torch

__all__ = ["install", "is_stand_in"]

_NAME = "mmcv._ext"


def nms(boxes, scores, iou_threshold, offset=0):
    """mmcv's nms: indices of the kept boxes, by decreasing score. offset=1 is mmcv's legacy convention
    (a box spans x2 - x1 + 1 pixels)."""
    from torchvision.ops import nms as tv_nms
    if offset:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:4] + offset], dim=1)
    return tv_nms(boxes.float(), scores.float(), float(iou_threshold))


def _roi_align(x, rois, aligned_height, aligned_width, spatial_scale, sampling_ratio, pool_mode, aligned):
    from torchvision.ops import roi_align
    if pool_mode != 1:
        raise NotImplementedError("vssm.mm.mmcv_ext: RoIAlign pool_mode='max' needs mmcv's compiled ops "
                                  "(build mmcv from source); pool_mode='avg' is supported")
    if x.dtype == torch.bfloat16:  # torchvision's RoIAlign kernels (and mmcv's) have no bfloat16 version
        return roi_align(x.float(), rois.float(), (aligned_height, aligned_width), spatial_scale, sampling_ratio,
                         aligned).to(x.dtype)
    return roi_align(x, rois.to(x.dtype), (aligned_height, aligned_width), spatial_scale, sampling_ratio, aligned)


def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width, spatial_scale,
                      sampling_ratio, pool_mode, aligned):
    """mmcv's roi_align_forward: writes the pooled features into output."""
    output.copy_(_roi_align(input, rois, aligned_height, aligned_width, spatial_scale, sampling_ratio,
                            pool_mode, aligned))


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height, aligned_width,
                       spatial_scale, sampling_ratio, pool_mode, aligned):
    """mmcv's roi_align_backward: writes d(loss)/d(input) into grad_input. RoIAlign is linear in its input,
    so the gradient is the vector-Jacobian product at any input (zeros here)."""
    with torch.enable_grad():
        x = torch.zeros_like(grad_input, requires_grad=True)
        out = _roi_align(x, rois, aligned_height, aligned_width, spatial_scale, sampling_ratio, pool_mode,
                         aligned)
        grad_input.copy_(torch.autograd.grad(out, x, grad_output)[0])


def _missing(name):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"mmcv op '{name}' needs mmcv's compiled extension, which mmcv-lite does not have; vssm's stand-in "
            "(vssm.mm.mmcv_ext) provides only nms and RoIAlign (avg). Build mmcv from source for this op.")
    op.__name__ = name
    return op


def _make_module():
    module = types.ModuleType(_NAME, __doc__)
    module.__spec__ = importlib.machinery.ModuleSpec(_NAME, None)  # mmengine's mmcv_full_available() reads it
    module.__file__ = __file__
    module.nms = nms
    module.roi_align_forward = roi_align_forward
    module.roi_align_backward = roi_align_backward
    module.vssm_stand_in = True

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(name)

    module.__getattr__ = __getattr__
    return module


def is_stand_in() -> bool:
    """True if the loaded ``mmcv._ext`` is this stand-in."""
    return getattr(sys.modules.get(_NAME), "vssm_stand_in", False)


def install() -> bool:
    """Register the stand-in as ``mmcv._ext`` unless a compiled one is importable or one is loaded; must run
    before ``mmcv.ops`` is first imported. Returns whether the stand-in is in use."""
    if _NAME not in sys.modules and importlib.util.find_spec("mmcv") is not None:
        if importlib.util.find_spec(_NAME) is None:
            sys.modules[_NAME] = _make_module()
    return is_stand_in()
