# Mask R-CNN + FPN + VMamba-S on COCO, 3x schedule, multi-scale + crop training.
# Official result (mask_rcnn_vssm_fpn_coco_small_ms_3x): box AP 49.9, mask AP 44.2.
_base_ = './mask-rcnn_vmamba-t_fpn_ms-crop-3x_coco.py'
pretrained = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/vssm_small_0229_ckpt_epoch_222.pth'  # noqa: E501
model = dict(
    backbone=dict(
        model_name='vmamba_small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
