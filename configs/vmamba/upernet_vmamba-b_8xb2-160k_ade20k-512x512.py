# UperNet + VMamba-B on ADE20K, 512x512, 160k x 16 images.
# Official result (upernet_vssm_4xb4-160k_ade20k-512x512_base): mIoU 51.0 single-scale, 51.6 multi-scale.
_base_ = './upernet_vmamba-t_8xb2-160k_ade20k-512x512.py'
pretrained = 'https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/vssm_base_0229_ckpt_epoch_237.pth'  # noqa: E501
model = dict(
    backbone=dict(
        model_name='vmamba_base',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
