# Mask R-CNN + FPN + VMamba-B on COCO, 3x schedule, multi-scale + crop training.
# No official result: the VMamba README reports B only for 1x (box AP 49.2, mask AP 44.1).
_base_ = './mask-rcnn_vmamba-t_fpn_ms-crop-3x_coco.py'
pretrained = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/vssm_base_0229_ckpt_epoch_237.pth'  # noqa: E501
model = dict(
    backbone=dict(
        model_name='vmamba_base',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
