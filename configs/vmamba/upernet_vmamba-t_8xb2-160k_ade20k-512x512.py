# UperNet + VMamba-T (ImageNet-1k pretrained) on ADE20K, 512x512 crops, 160k iterations of 16 images
# (8 GPUs x 2; the official run used 4 x 4).
# Official result (MzeroMiko/VMamba, upernet_vssm_4xb4-160k_ade20k-512x512_tiny): mIoU 47.9 single-scale,
# 48.8 multi-scale (tools/test.py --tta).
# Recipe as the official one, which is mmseg's Swin-T UperNet config with the backbone swapped: AdamW lr 6e-5,
# weight decay 0.01 (none on norms), 1500 warm-up iterations, linear decay.
_base_ = [
    '../_base_/models/upernet_vmamba.py', '../_base_/datasets/ade20k.py',
    '../_base_/seg_runtime.py', '../_base_/schedules/schedule_160k.py'
]
pretrained = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth'  # noqa: E501
model = dict(
    backbone=dict(
        model_name='vmamba_tiny',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
train_dataloader = dict(batch_size=2)
