# UperNet + Vim-T (ImageNet-1k pretrained, middle class token) on ADE20K, 512x512 crops, 160k iterations of
# 16 images (8 GPUs x 2), sliding-window testing (512 crops, stride 341).
# Official result (Vim paper, Table "semantic segmentation on ADE20K val"): mIoU 41.0 (single-scale).
# Schedule as the paper reports it (160k iterations, 16 images, 1500 warm-up iterations, linear decay);
# optimizer as the official seg scripts (hustvl/Vim seg/scripts/ft_vim_tiny_upernet.sh): AdamW lr 2e-4,
# weight decay 0.1, layer-wise lr decay 0.92 over the 24 blocks. Backbone as the official seg code runs it:
# no class token in the sequence, features = the mixer outputs of blocks 5/11/17/23.
_base_ = [
    '../_base_/models/upernet_vim.py', '../_base_/datasets/ade20k.py',
    '../_base_/seg_runtime.py', '../_base_/schedules/schedule_160k.py'
]
pretrained = 'https://huggingface.co/hustvl/Vim-tiny-midclstok/resolve/main/vim_t_midclstok_76p1acc.pth'  # noqa: E501
model = dict(
    backbone=dict(
        model_name='vim_tiny_patch16_224',
        feature='mixer',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
optim_wrapper = dict(
    constructor='LayerDecayOptimWrapperConstructor',
    optimizer=dict(lr=2e-4, weight_decay=0.1),
    paramwise_cfg=dict(decay_rate=0.92))
train_dataloader = dict(batch_size=2)
