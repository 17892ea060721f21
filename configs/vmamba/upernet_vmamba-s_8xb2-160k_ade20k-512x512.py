# UperNet + VMamba-S on ADE20K, 512x512, 160k x 16 images.
# Official result (upernet_vssm_4xb4-160k_ade20k-512x512_small): mIoU 50.6 single-scale, 51.2 multi-scale.
_base_ = './upernet_vmamba-t_8xb2-160k_ade20k-512x512.py'
pretrained = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/vssm_small_0229_ckpt_epoch_222.pth'  # noqa: E501
model = dict(
    backbone=dict(
        model_name='vmamba_small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
