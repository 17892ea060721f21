# Mask R-CNN + FPN + VMamba-T (ImageNet-1k pretrained) on COCO, 1x schedule (12 epochs, 16 images per
# iteration: 8 GPUs x 2).
# Official result (MzeroMiko/VMamba, mask_rcnn_vssm_fpn_coco_tiny): box AP 47.3, mask AP 42.7 (val2017).
# Recipe as the official one, which is mmdet's Swin-T Mask R-CNN 1x config with the backbone swapped: AdamW
# lr 1e-4, weight decay 0.05 (none on norms), 1333x800 resize + flip.
_base_ = [
    '../_base_/models/mask-rcnn_vmamba_fpn.py', '../_base_/datasets/coco_instance.py',
    '../_base_/det_runtime.py', '../_base_/schedules/schedule_1x.py'
]
pretrained = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth'  # noqa: E501
model = dict(
    backbone=dict(
        model_name='vmamba_tiny',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
