# Mask R-CNN + FPN + VMamba-S on COCO, 1x schedule.
# Official result (mask_rcnn_vssm_fpn_coco_small): box AP 48.7, mask AP 43.7.
_base_ = './mask-rcnn_vmamba-t_fpn_1x_coco.py'
pretrained = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/vssm_small_0229_ckpt_epoch_222.pth'  # noqa: E501
model = dict(
    backbone=dict(
        model_name='vmamba_small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
