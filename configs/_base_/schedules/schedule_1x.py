# 12 epochs, lr x0.1 after epochs 8 and 11, 1000 warm-up iterations; AdamW (Swin's detection recipe).
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
# the lr above is for 16 images per iteration (8 GPUs x 2); to rescale it to another total batch size:
# --cfg-options auto_scale_lr.enable=True
auto_scale_lr = dict(enable=False, base_batch_size=16)
