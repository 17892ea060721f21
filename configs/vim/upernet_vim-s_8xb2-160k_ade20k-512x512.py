# UperNet + Vim-S on ADE20K, 512x512 crops, 160k iterations of 16 images, sliding-window testing.
# Official result (Vim paper): mIoU 44.9 (single-scale).
# Optimizer as the official seg script (seg/scripts/ft_vim_small_upernet.sh): AdamW lr 1e-4, weight decay
# 0.05, layer-wise lr decay 0.95; features: the residual stream after blocks 5/11/17/23, as there
# (use_residual_as_feature=True, last_layer_process='add'), with the official config's rotary position
# embedding on the tokens and the residual stream (if_rope=True, if_rope_residual=True; parameter-free, so
# the released RoPE-free checkpoint loads as is); no class token in the sequence.
_base_ = './upernet_vim-t_8xb2-160k_ade20k-512x512.py'
pretrained = 'https://huggingface.co/hustvl/Vim-small-midclstok/resolve/main/vim_s_midclstok_80p5acc.pth'  # noqa: E501
model = dict(
    backbone=dict(
        model_name='vim_small_patch16_224',
        feature='residual',
        rope=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[384, 384, 384, 384], channels=384),
    auxiliary_head=dict(in_channels=384))
optim_wrapper = dict(optimizer=dict(lr=1e-4, weight_decay=0.05), paramwise_cfg=dict(decay_rate=0.95))
