"""OpenMMLab integration (vssm.mm, configs/, tools/train.py, tools/test.py) on CPU.

Every config loads and builds (reduced backbone depth, real widths, so the heads' channels are checked) and a
forward gives the expected structure; tools/train.py + tools/test.py run end to end on generated ADE20K- and
COCO-format data; the adapters' errors, checkpoint loading (official and timm formats), frozen stages, the
layer-decay optimizer, the mmcv._ext stand-in and the DiffuSSM registration.
"""
import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import vssm.mm  # noqa: F401  (the stand-in for mmcv._ext, then the registrations)
from vssm.mm.mmcv_ext import install, is_stand_in
from vssm.models.vim import _split_middle, resample_pos_embed

import mmdet.models  # noqa: F401,E402
import mmseg.models  # noqa: F401,E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.structures.mask import BitmapMasks  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from mmengine.structures import InstanceData, PixelData  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

from test_vmamba import randomize as randomize_vmamba, to_official  # noqa: E402  (official layout)
from test_vim import official_checkpoint, randomize as randomize_vim  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*", "*.py"))
                 if "_base_" not in p)
VMAMBA_SMALL = dict(depths=(1, 2, 1, 1), dims=16)
VIM_SMALL = dict(depth=4, embed_dim=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one thread is faster, and steady when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(cfg_model, scope):
    init_default_scope(scope)
    return revert_sync_batchnorm(MODELS.build(cfg_model))  # SyncBN needs a process group


def reduced_config(path, crop=64):
    """The config with a shallow backbone (real widths) and a small crop."""
    cfg = Config.fromfile(os.path.join(ROOT, path))
    backbone = cfg.model.backbone
    backbone.init_cfg = None
    if backbone.type == "VMambaBackbone":
        backbone.depths = (1, 1, 1, 1)
    else:
        backbone.update(depth=4, out_indices=(0, 1, 2, 3), img_size=(crop, crop))
    if cfg.default_scope == "mmseg":
        cfg.model.data_preprocessor.size = (crop, crop)
        if cfg.model.test_cfg.mode == "slide":
            cfg.model.test_cfg.update(crop_size=(crop, crop), stride=(crop * 2 // 3, crop * 2 // 3))
    return cfg


def seg_batch(n, h, w, gen):
    samples = []
    for _ in range(n):
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, h, w), generator=gen))
        samples.append(s)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for _ in range(n)]
    return dict(inputs=images, data_samples=samples)


def det_batch(n, h, w, gen):
    samples = []
    for _ in range(n):
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                        scale_factor=(1.0, 1.0), img_id=0))
        boxes = torch.tensor([[8.0, 10.0, 40.0, 50.0], [30.0, 20.0, 70.0, 90.0]])
        masks = np.zeros((2, h, w), np.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            m[y1:y2, x1:x2] = 1
        s.gt_instances = InstanceData(bboxes=boxes, labels=torch.tensor([1, 5]), masks=BitmapMasks(masks, h, w))
        samples.append(s)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for _ in range(n)]
    return dict(inputs=images, data_samples=samples)


# ------------------------------------------------------------------------------------------------------
# every config: loads, builds, trains a step's forward, predicts
# ------------------------------------------------------------------------------------------------------
def test_configs_are_all_there():
    names = {os.path.basename(p) for p in CONFIGS}
    for size in "tsb":
        assert f"upernet_vmamba-{size}_8xb2-160k_ade20k-512x512.py" in names
        assert f"mask-rcnn_vmamba-{size}_fpn_1x_coco.py" in names
        assert f"mask-rcnn_vmamba-{size}_fpn_ms-crop-3x_coco.py" in names
    for size in "ts":
        assert f"upernet_vim-{size}_8xb2-160k_ade20k-512x512.py" in names


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds_and_runs(path):
    cfg = Config.fromfile(os.path.join(ROOT, path))
    assert cfg.custom_imports.imports == ["vssm.mm"]
    size = {"t": "tiny", "s": "small", "b": "base"}[path.split("_")[1].split("-")[1][0]]
    assert size in cfg.model.backbone.model_name
    release = {"tiny": ("vssm1_tiny_", "vim_t_"), "small": ("vssm_small_", "vim_s_"), "base": ("vssm_base_",)}
    assert cfg.model.backbone.init_cfg.type == "Pretrained"
    assert os.path.basename(cfg.model.backbone.init_cfg.checkpoint).startswith(release[size])
    gen = torch.Generator().manual_seed(0)
    cfg = reduced_config(path)
    model = build(cfg.model, cfg.default_scope).train()
    if cfg.default_scope == "mmseg":
        assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size == 2
        assert cfg.train_dataloader.dataset.pipeline[3].crop_size == (512, 512)
        data = model.data_preprocessor(seg_batch(2, 64, 64, gen), True)
        losses = model(**data, mode="loss")
        assert set(losses) == {"decode.loss_ce", "decode.acc_seg", "aux.loss_ce", "aux.acc_seg"}
        assert 3 < losses["decode.loss_ce"].item() < 7  # about ln(150) for an untrained model
        model.eval()
        with torch.no_grad():
            (out,) = model.test_step(seg_batch(1, 90, 70, gen))  # not a multiple of Vim's 16-pixel patches
        assert out.seg_logits.data.shape == (150, 90, 70)
        assert out.pred_sem_seg.data.shape == (1, 90, 70)
    else:
        assert cfg.train_cfg.max_epochs == (36 if "3x" in path else 12)
        data = model.data_preprocessor(det_batch(2, 96, 80, gen), True)
        losses = model(**data, mode="loss")
        assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"} <= set(losses)
        total = sum(sum(v) if isinstance(v, list) else v for k, v in losses.items() if "loss" in k)
        assert torch.isfinite(total) and total > 0
        total.backward()  # through RoIAlign (the stand-in's backward) into the backbone
        assert model.backbone.model.stem.conv1.weight.grad.abs().sum() > 0
        model.eval()
        with torch.no_grad():
            (out,) = model.test_step(det_batch(1, 96, 80, gen))
        pred = out.pred_instances
        n = len(pred)
        assert pred.bboxes.shape == (n, 4) and pred.scores.shape == (n,) and pred.labels.shape == (n,)
        assert pred.masks.shape == (n, 96, 80)


# ------------------------------------------------------------------------------------------------------
# end to end: tools/train.py, then tools/test.py, on generated data
# ------------------------------------------------------------------------------------------------------
def run_tool(*args, command=sys.executable, **env):
    """`command *args` from the repository root (a tool under Python, or a shell script with command="bash"),
    with env added to the environment; fails the test with the output's tail unless it exits with 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    proc = subprocess.run([command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def make_ade20k(root, n_train=4, n_val=2, size=(72, 88)):
    """ADE20K in the mmseg layout; labels 0 (ignored) .. 150, images a function of the labels."""
    import cv2
    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        os.makedirs(root / "images" / split)
        os.makedirs(root / "annotations" / split)
        for i in range(n):
            label = np.zeros(size, np.uint8)
            label[: size[0] // 2] = rng.integers(1, 151)
            label[size[0] // 2:, : size[1] // 2] = rng.integers(1, 151)
            image = (label[..., None] * np.array([1, 3, 7]) % 256).astype(np.uint8)
            cv2.imwrite(str(root / "images" / split / f"ADE_{split}_{i:08d}.jpg"), image)
            cv2.imwrite(str(root / "annotations" / split / f"ADE_{split}_{i:08d}.png"), label)


def make_coco(root, n=4, size=(96, 128)):
    """A COCO instance-segmentation set: one json with polygon masks used for training and evaluation."""
    import cv2
    rng = np.random.default_rng(0)
    os.makedirs(root / "images")
    images, annotations = [], []
    for i in range(n):
        image = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
        for j, cat in enumerate((1, 3)):  # person, car
            x, y = 10 + 50 * j + int(rng.integers(0, 10)), 15 + int(rng.integers(0, 20))
            w, h = 40, 50
            image[y:y + h, x:x + w] = (200, 80 * cat, 40)
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=cat, iscrowd=0,
                                    bbox=[x, y, w, h], area=w * h,
                                    segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]]))
        cv2.imwrite(str(root / "images" / f"{i:06d}.jpg"), image)
        images.append(dict(id=i + 1, file_name=f"{i:06d}.jpg", height=size[0], width=size[1]))
    from mmdet.datasets import CocoDataset
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CocoDataset.METAINFO["classes"])]
    with open(root / "instances.json", "w") as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)


def loader_options(loader, root, **dataset):
    opts = [f"{loader}.num_workers=0", f"{loader}.persistent_workers=False", f"{loader}.dataset.data_root={root}"]
    return opts + [f"{loader}.dataset.{k}={v}" for k, v in dataset.items()]


def ade20k_options(root, scale, crop_size):
    """--cfg-options pointing an ADE20K config's loaders at generated data in root: images resized to scale,
    training crops of crop_size. Returns (val and test loader options, train loader options)."""
    evaluation = []
    for split in ("val", "test"):
        evaluation += loader_options(f"{split}_dataloader", root)
        evaluation.append(f"{split}_dataloader.dataset.pipeline.1.scale={scale}")
    train = loader_options("train_dataloader", root) + [
        f"train_dataloader.dataset.pipeline.2.scale={scale}", f"train_dataloader.dataset.pipeline.3.crop_size={crop_size}"]
    return evaluation, train


def test_upernet_train_then_test(tmp_path):
    """Vim-T UperNet (layer-decay optimizer, sliding-window test on padded images): 4 iterations and a
    validation, 2 more resumed from the work dir, then tools/test.py on the last checkpoint."""
    data, work = tmp_path / "ade", tmp_path / "work"
    make_ade20k(data)
    config = "configs/vim/upernet_vim-t_8xb2-160k_ade20k-512x512.py"
    model = ["model.backbone.depth=4", "model.backbone.out_indices=[0,1,2,3]", "model.backbone.img_size=(48,48)",
             "model.backbone.init_cfg=None", "model.data_preprocessor.size=(48,48)",
             "model.test_cfg.crop_size=(48,48)", "model.test_cfg.stride=(32,32)"]
    evaluation, train = ade20k_options(data, "(128,64)", "(48,48)")
    train += ["train_cfg.val_interval=4", "default_hooks.checkpoint.interval=2", "default_hooks.logger.interval=1"]
    options = model + evaluation + train
    log = run_tool("tools/train.py", config, "--work-dir", str(work), "--cfg-options", *options,
                   "train_cfg.max_iters=4")
    assert "Iter(train) [4/4]" in log and "layer-wise lr decay 0.92" in log
    assert "Iter(val) [2/2]" in log and "mIoU" in log and (work / "iter_4.pth").is_file()
    # --resume: the Runner reads its own checkpoint back (torch >= 2.6 needs the weights-only override)
    log = run_tool("tools/train.py", config, "--work-dir", str(work), "--resume", "--cfg-options", *options,
                   "train_cfg.max_iters=6")
    assert "resumed" in log and "Iter(train) [6/6]" in log and "Iter(train) [3/6]" not in log
    checkpoint = work / "iter_6.pth"
    out = run_tool("tools/test.py", config, str(checkpoint), "--work-dir", str(work / "test"),
                   "--cfg-options", *model, *evaluation)
    metrics = json.loads((work / "test" / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(checkpoint)
    assert {"aAcc", "mIoU", "mAcc"} <= set(metrics["metrics"])
    assert 0 <= metrics["metrics"]["mIoU"] <= 100 and f"mIoU: {metrics['metrics']['mIoU']}" in out


def test_dist_train_then_dist_test_with_two_processes(tmp_path):
    """tools/dist_train.sh and dist_test.sh as a user runs them (torchrun, --launcher pytorch), with two
    processes on the CPU (gloo; SyncBN trained as BN): DDP training with the distributed sampler, the
    checkpoint written once, and the test metrics gathered from both ranks."""
    data, work = tmp_path / "ade", tmp_path / "work"
    make_ade20k(data, n_train=4, n_val=4)
    config = "configs/vmamba/upernet_vmamba-t_8xb2-160k_ade20k-512x512.py"
    model = ["model.backbone.depths=[1,1,1,1]", "model.backbone.dims=16", "model.backbone.init_cfg=None",
             "model.decode_head.in_channels=[16,32,64,128]", "model.decode_head.channels=16",
             "model.auxiliary_head.in_channels=64", "model.auxiliary_head.channels=8",
             "model.data_preprocessor.size=(48,48)"]
    evaluation, train = ade20k_options(data, "(64,48)", "(48,48)")
    train += ["train_dataloader.batch_size=2", "train_cfg.max_iters=2", "train_cfg.val_interval=2",
              "default_hooks.checkpoint.interval=2", "default_hooks.logger.interval=1"]
    # torchrun from this Python's environment; a port of this test's own
    env = dict(command="bash", PORT=str(29500 + os.getpid() % 1000),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    log = run_tool("tools/dist_train.sh", config, "2", "--work-dir", str(work), "--cfg-options", *model, *evaluation,
                   *train, **env)
    assert "Distributed launcher: pytorch" in log and "Distributed training: True" in log
    assert "SyncBN trained as BN" in log and "Iter(train) [2/2]" in log and "Iter(val) [2/2]" in log
    checkpoint = work / "iter_2.pth"
    assert checkpoint.is_file()
    log = run_tool("tools/dist_test.sh", config, str(checkpoint), "2", "--work-dir", str(work / "test"),
                   "--cfg-options", *model, *evaluation, **env)
    metrics = json.loads((work / "test" / "metrics.json").read_text())["metrics"]
    assert {"aAcc", "mIoU", "mAcc"} <= set(metrics) and "Iter(test) [2/2]" in log


def test_mask_rcnn_train_then_test(tmp_path):
    """VMamba-T Mask R-CNN: one epoch on a generated COCO json with polygons, COCO bbox + segm evaluation,
    then tools/test.py on the saved checkpoint."""
    data, work = tmp_path / "coco", tmp_path / "work"
    make_coco(data)
    ann = str(data / "instances.json")
    dataset = dict(ann_file=ann, **{"data_prefix.img": "images/"})
    config = "configs/vmamba/mask-rcnn_vmamba-t_fpn_1x_coco.py"
    model = ["model.backbone.depths=[1,1,1,1]", "model.backbone.dims=16", "model.backbone.init_cfg=None",
             "model.neck.in_channels=[16,32,64,128]", "model.train_cfg.rcnn.sampler.num=64",
             "model.test_cfg.rcnn.score_thr=0", "model.test_cfg.rcnn.max_per_img=20"]  # untrained: keep boxes
    evaluation = []
    for split in ("val", "test"):
        evaluation += loader_options(f"{split}_dataloader", data, **dataset)
        evaluation += [f"{split}_dataloader.dataset.pipeline.1.scale=(128,96)", f"{split}_evaluator.ann_file={ann}"]
    train = loader_options("train_dataloader", data, **dataset) + [
        "train_dataloader.dataset.pipeline.2.scale=(128,96)", "train_cfg.max_epochs=1",
        "default_hooks.logger.interval=1"]
    log = run_tool("tools/train.py", config, "--work-dir", str(work), "--cfg-options", *model, *evaluation, *train)
    assert "Epoch(train) [1][2/2]" in log and "coco/bbox_mAP" in log and "coco/segm_mAP" in log
    checkpoint = work / "epoch_1.pth"
    out = run_tool("tools/test.py", config, str(checkpoint), "--work-dir", str(work), "--cfg-options", *model,
                   *evaluation)
    metrics = json.loads((work / "metrics.json").read_text())["metrics"]
    for kind in ("bbox", "segm"):
        assert -1 <= metrics[f"coco/{kind}_mAP"] <= 1 and f"coco/{kind}_mAP: " in out


def test_train_amp_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --amp is allowed")
    proc = subprocess.run([sys.executable, "tools/train.py", "configs/vmamba/mask-rcnn_vmamba-t_fpn_1x_coco.py",
                           "--amp", "--work-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "--amp needs a GPU" in proc.stderr


# ------------------------------------------------------------------------------------------------------
# the backbones: errors, checkpoints, frozen stages
# ------------------------------------------------------------------------------------------------------
def test_out_indices_outside_the_backbone():
    with pytest.raises(ValueError, match=r"VMambaBackbone: out_indices \(0, 4\) outside the backbone's 4 stages"):
        build(dict(type="VMambaBackbone", out_indices=(0, 4), **VMAMBA_SMALL), "mmseg")
    with pytest.raises(ValueError, match=r"VimBackbone: out_indices \(3, 4\) outside the backbone's 4 blocks"):
        build(dict(type="VimBackbone", img_size=64, out_indices=(3, 4), **VIM_SMALL), "mmdet")
    with pytest.raises(ValueError, match="give 1 or 4 out_indices"):
        build(dict(type="VimBackbone", img_size=64, out_indices=(0, 1, 2), **VIM_SMALL), "mmseg")
    # negative indices count from the end
    model = build(dict(type="VMambaBackbone", out_indices=(-2, -1), **VMAMBA_SMALL), "mmseg")
    assert model.out_indices == (2, 3) and [f.shape[1] for f in model(torch.randn(1, 3, 64, 64))] == [64, 128]


def test_crop_size_the_backbone_cannot_take():
    cfg = Config.fromfile(os.path.join(ROOT, "configs/vim/upernet_vim-t_8xb2-160k_ade20k-512x512.py"))
    cfg.merge_from_dict({"model.backbone.img_size": (500, 500), "model.backbone.depth": 2,
                         "model.backbone.out_indices": (1,)})
    with pytest.raises(ValueError, match=r"input height 500 cannot be cut into 16-pixel patches.*multiple of 16"):
        build(cfg.model, "mmseg")
    backbone = build(dict(type="VimBackbone", img_size=64, out_indices=(3,), **VIM_SMALL), "mmseg")
    with pytest.raises(ValueError, match="input height 70 cannot be cut"):
        backbone(torch.randn(1, 3, 70, 64))


def init_from(cfg, checkpoint, scope="mmseg", **init):
    model = build(dict(cfg, init_cfg=dict(type="Pretrained", checkpoint=str(checkpoint), **init)), scope)
    model.init_weights()
    return model.eval()


def test_vmamba_official_and_timm_checkpoints_load(tmp_path):
    src = randomize_vmamba(timm.create_model("vmamba_tiny", **VMAMBA_SMALL)).eval()
    official = tmp_path / "vssm1_tiny_0230s_ckpt_epoch_264.pth"
    torch.save({"model": to_official(src.state_dict(), conv_weights=[r"mlp\.fc1"]), "epoch": 264,
                "model_ema": {k: v + 1 for k, v in to_official(src.state_dict()).items()},
                "args": argparse.Namespace(cfg="vmambav2v_tiny_224.yaml")}, official)
    timm_file = tmp_path / "vmamba_tiny.pth"
    torch.save(src.state_dict(), timm_file)
    cfg = dict(type="VMambaBackbone", out_indices=(1, 2, 3), **VMAMBA_SMALL)
    img = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        ref = src.forward_intermediates(img, indices=[1, 2, 3], intermediates_only=True)
        for path in (official, timm_file):
            model = init_from(cfg, path, "mmdet")
            feats = model.model.forward_intermediates(img, indices=[1, 2, 3], intermediates_only=True)
            for f, r in zip(feats, ref):
                torch.testing.assert_close(f, r, rtol=0, atol=0)
            # the outputs: those maps through fresh per-stage LayerNorms
            for f, r in zip(model(img), ref):
                torch.testing.assert_close(f, torch.nn.functional.layer_norm(
                    r.permute(0, 2, 3, 1), r.shape[1:2], eps=1e-5).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)

    # a whole detector checkpoint (the adapter's own keys, its output norms too) through prefix='backbone.'
    trained = init_from(cfg, official)
    with torch.no_grad():
        trained.outnorm2.weight.mul_(3)
    whole = tmp_path / "epoch_12.pth"
    torch.save({"meta": {}, "state_dict": {**{f"backbone.{k}": v for k, v in trained.state_dict().items()},
                                           "neck.conv.weight": torch.zeros(1)}}, whole)
    again = init_from(cfg, whole, prefix="backbone.")
    with torch.no_grad():
        for f, r in zip(again(img), trained(img)):
            torch.testing.assert_close(f, r, rtol=0, atol=0)


def test_vim_official_checkpoint_resampled_to_the_crop(tmp_path):
    src = randomize_vim(timm.create_model("vim_tiny_patch16_224", **VIM_SMALL)).eval()
    path = official_checkpoint(tmp_path, src)  # vim/main.py's training snapshot at 224 (14 x 14 patches)
    cfg = dict(type="VimBackbone", img_size=64, out_indices=(0, 1, 2, 3), norm_cfg=dict(type="BN"), **VIM_SMALL)
    model = init_from(cfg, path)
    assert model.model.pos_embed.shape == (1, 4 * 4 + 1, 32)
    torch.testing.assert_close(model.model.pos_embed, resample_pos_embed(src.pos_embed, (4, 4)))
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = model(img)
        # the official segmentation backbone: patch tokens + their position rows (no class token), the
        # output of each block's mixer (not the residual stream) as the feature
        tokens, grid = src.patch_embed(img)
        pos, _ = _split_middle(resample_pos_embed(src.pos_embed, grid))
        hidden, residual, ref, stream = tokens + pos, None, [], []
        for layer in src.layers:
            hidden, residual = layer(hidden, residual)
            ref.append(hidden.transpose(1, 2).reshape(2, 32, 4, 4))
            stream.append((residual + hidden).transpose(1, 2).reshape(2, 32, 4, 4))
        outs_residual = init_from(dict(cfg, feature="residual"), path)(img)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    torch.testing.assert_close(outs[2], ref[2])  # stride 16: the block-2 map itself
    torch.testing.assert_close(outs[3], torch.nn.functional.max_pool2d(ref[3], 2))
    # feature='residual' (the official Vim-S recipe): the residual stream after the block
    torch.testing.assert_close(outs_residual[2], stream[2])
    torch.testing.assert_close(outs_residual[3], torch.nn.functional.max_pool2d(stream[3], 2))
    assert not torch.allclose(ref[2], stream[2])
    with pytest.raises(ValueError, match="VimBackbone: feature must be 'mixer' or 'residual', got 'norm'"):
        build(dict(cfg, feature="norm"), "mmseg")
    # the timm / safetensors format
    from safetensors.torch import save_file
    save_file(src.state_dict(), str(tmp_path / "vim.safetensors"))
    again = init_from(cfg, tmp_path / "vim.safetensors")
    torch.testing.assert_close(again.model.pos_embed, model.model.pos_embed)


def official_rope(x, h, w, pretrain_grid=14):
    """EVA-02's VisionRotaryEmbeddingFast as hustvl/Vim builds it (dim = D / 2, positions arange(n) / n x the
    pretraining grid), written from its formulas: x (B, h*w, D) rotated pairwise by the (row, col) angles."""
    D = x.shape[-1]
    bands = 1.0 / 10000 ** (torch.arange(0, D // 2, 2)[:D // 4].float() / (D // 2))
    row = ((torch.arange(h) / h * pretrain_grid)[:, None] * bands).repeat_interleave(2, -1)
    col = ((torch.arange(w) / w * pretrain_grid)[:, None] * bands).repeat_interleave(2, -1)
    angles = torch.cat([row[:, None].expand(h, w, -1), col[None].expand(h, w, -1)], -1).reshape(h * w, D)
    pairs = torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
    return x * angles.cos() + pairs * angles.sin()


def test_vim_rope_as_the_official_vim_s_seg_config():
    """rope=True (the Vim-S seg config): tokens and residual stream rotated before every block."""
    torch.manual_seed(0)
    backbone = build(dict(type="VimBackbone", img_size=64, out_indices=(0, 1, 2, 3), feature="residual", rope=True,
                          norm_cfg=dict(type="BN"), **VIM_SMALL), "mmseg")
    src = randomize_vim(backbone.model).eval()
    backbone.eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = backbone(img)
        tokens, (h, w) = src.patch_embed(img)
        hidden, residual = tokens + _split_middle(resample_pos_embed(src.pos_embed, (h, w)))[0], None
        for layer in src.layers[:3]:
            hidden = official_rope(hidden, h, w)
            residual = None if residual is None else official_rope(residual, h, w)
            hidden, residual = layer(hidden, residual)
        plain = build(dict(type="VimBackbone", img_size=64, out_indices=(0, 1, 2, 3), feature="residual",
                           norm_cfg=dict(type="BN"), **VIM_SMALL), "mmseg")
        plain.load_state_dict(backbone.state_dict())
        without = plain.eval()(img)
    torch.testing.assert_close(outs[2], (residual + hidden).transpose(1, 2).reshape(2, -1, h, w))
    assert not torch.allclose(outs[2], without[2], atol=1e-3)
    assert set(backbone.state_dict()) == set(plain.state_dict())  # no parameters or buffers of its own


def test_checkpoint_with_wrong_keys_is_refused(tmp_path):
    sd = to_official(timm.create_model("vmamba_tiny", **VMAMBA_SMALL).state_dict())
    del sd["layers.1.blocks.1.op.Ds"]
    sd["layers.0.blocks.0.op.x_proj_bias"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(RuntimeError, match=r"missing keys \['stages.1.blocks.1.ss2d.Ds'\], unexpected keys "
                                           r"\['stages.0.blocks.0.ss2d.x_proj_bias'\]"):
        init_from(dict(type="VMambaBackbone", **VMAMBA_SMALL), path)
    vim = timm.create_model("vim_tiny_patch16_224", **VIM_SMALL).state_dict()
    vim.pop("layers.2.mixer.D_b")
    torch.save(vim, path)
    with pytest.raises(RuntimeError, match=r"VimBackbone: .*missing keys \['layers.2.mixer.D_b'\]"):
        init_from(dict(type="VimBackbone", img_size=64, out_indices=(3,), **VIM_SMALL), path)
    with pytest.raises(RuntimeError, match="no key of checkpoint .* starts with 'backbone.'"):
        init_from(dict(type="VimBackbone", img_size=64, out_indices=(3,), **VIM_SMALL), path, prefix="backbone.")


def test_frozen_stages():
    model = build(dict(type="VMambaBackbone", frozen_stages=2, out_indices=(0, 1, 2, 3), **VMAMBA_SMALL), "mmdet")
    assert not model.model.stem.conv1.weight.requires_grad  # already when built (the optimizer comes next)
    model.train()
    frozen = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad
              and n.startswith("model.")}
    assert frozen == {"model.stem", "model.stages"}
    assert all(not p.requires_grad for p in model.model.stages[1].parameters())
    assert all(p.requires_grad for p in model.model.stages[2].parameters())
    assert not model.outnorm1.weight.requires_grad and model.outnorm2.weight.requires_grad
    assert not model.model.stages[0].training and model.model.stages[2].training
    vim = build(dict(type="VimBackbone", img_size=64, frozen_stages=1, out_indices=(3,), **VIM_SMALL), "mmseg")
    assert not vim.model.pos_embed.requires_grad
    vim.train()
    trainable = {n for n, p in vim.named_parameters() if p.requires_grad}
    assert "model.pos_embed" not in trainable and "model.cls_token" not in trainable
    assert not any(n.startswith(("model.patch_embed", "model.layers.0.")) for n in trainable)
    assert any(n.startswith("model.layers.1.") for n in trainable) and any(n.startswith("fpns") for n in trainable)
    with pytest.raises(ValueError, match=r"frozen_stages must be in \[-1, 4\]"):
        build(dict(type="VMambaBackbone", frozen_stages=5, **VMAMBA_SMALL), "mmseg")


def test_layer_decay_optimizer_groups():
    cfg = reduced_config("configs/vim/upernet_vim-t_8xb2-160k_ade20k-512x512.py")
    model = build(cfg.model, "mmseg")
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    lr, wd, rate, depth = 2e-4, 0.1, 0.92, 4
    group_of = {id(p): g for g in wrapper.optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(group_of) == len(params)

    def check(name, scale, decay):
        g = group_of[id(params[name])]
        assert g["lr"] == pytest.approx(lr * scale) and g["weight_decay"] == (wd if decay else 0.0), name
    check("backbone.model.pos_embed", rate ** (depth + 1), False)
    check("backbone.model.cls_token", rate ** (depth + 1), False)
    check("backbone.model.patch_embed.proj.weight", rate ** (depth + 1), True)
    check("backbone.model.patch_embed.proj.bias", rate ** (depth + 1), False)
    for i in range(depth):
        check(f"backbone.model.layers.{i}.mixer.in_proj.weight", rate ** (depth - i), True)
        check(f"backbone.model.layers.{i}.mixer.D", rate ** (depth - i), False)
    check("backbone.fpns.0.0.weight", 1.0, True)
    check("decode_head.conv_seg.weight", 1.0, True)
    check("decode_head.conv_seg.bias", 1.0, False)


# ------------------------------------------------------------------------------------------------------
# the mmcv._ext stand-in and the DiffuSSM registration
# ------------------------------------------------------------------------------------------------------
def test_mmcv_ext_stand_in_ops():
    from mmcv.ops import RoIAlign, batched_nms, nms
    from torchvision.ops import batched_nms as tv_batched_nms
    from torchvision.ops import roi_align
    assert is_stand_in()
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=gen) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=gen) * 30], 1)
    scores, classes = torch.rand(200, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    dets, keep = nms(boxes, scores, 0.5)
    assert 0 < len(keep) < 200 and torch.equal(dets[:, 4], scores[keep])
    assert (scores[keep][:-1] >= scores[keep][1:]).all()
    ious = __import__("torchvision").ops.box_iou(boxes[keep], boxes[keep]).fill_diagonal_(0)
    assert ious.max() <= 0.5  # nothing kept overlaps a kept box above the threshold
    _, keep_b = batched_nms(boxes, scores, classes, dict(type="nms", iou_threshold=0.5))
    assert torch.equal(keep_b.sort().values, tv_batched_nms(boxes, scores, classes, 0.5).sort().values)

    feats = torch.randn(2, 4, 16, 16, generator=gen, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 9.0, 12.0], [1, 0.0, 0.0, 15.0, 7.5], [0, 3.3, 4.1, 6.2, 6.9]])
    out = RoIAlign((7, 5), spatial_scale=0.5, sampling_ratio=0, aligned=True)(feats, rois)
    ref_in = feats.detach().clone().requires_grad_()
    ref = roi_align(ref_in, rois, (7, 5), 0.5, 0, True)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(feats.grad, ref_in.grad)
    with pytest.raises(NotImplementedError, match="pool_mode='max'"):
        RoIAlign((7, 7), pool_mode="max")(feats, rois)
    with pytest.raises(NotImplementedError, match="'deform_conv_forward'.*[Bb]uild mmcv from source"):
        sys.modules["mmcv._ext"].deform_conv_forward()


def test_mmcv_ext_roi_align_in_bfloat16():
    """bf16 features (Mask R-CNN under bf16 AMP): torchvision's kernels have no bf16 version, so the stand-in
    pools in float32; forward and gradient equal the float32 ones to bf16 precision."""
    from mmcv.ops import RoIAlign
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 32, 32, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 4., 4., 60., 50.], [1, 10., 20., 100., 90.]])
    op = RoIAlign((7, 7), spatial_scale=0.25, sampling_ratio=2, aligned=True)
    ref = op(feats, rois)
    feats_bf16 = feats.detach().bfloat16().requires_grad_()
    out = op(feats_bf16, rois)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    grad = torch.randn(ref.shape, generator=g)
    (ref_grad,) = torch.autograd.grad(ref, feats, grad)
    (bf16_grad,) = torch.autograd.grad(out, feats_bf16, grad.bfloat16())
    assert bf16_grad.dtype == torch.bfloat16
    torch.testing.assert_close(bf16_grad.float(), ref_grad, rtol=2e-2, atol=2e-2)


def test_mmcv_ext_stand_in_steps_aside_for_a_compiled_one(monkeypatch):
    import importlib.machinery
    import importlib.util
    monkeypatch.delitem(sys.modules, "mmcv._ext")
    real_find_spec = importlib.util.find_spec
    compiled = importlib.machinery.ModuleSpec("mmcv._ext", None, origin="_ext.cpython.so")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: compiled if name == "mmcv._ext" else real_find_spec(name, *a))
    assert install() is False and "mmcv._ext" not in sys.modules
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    assert install() is True and is_stand_in()  # without one, the stand-in


def test_diffussm_in_mmengine_models():
    from vssm.models.diffussm import DiffuSSM
    model = MODELS.build(dict(type="DiffuSSM", input_size=8, in_chans=1, num_classes=10, hidden_size=32, depth=2))
    assert isinstance(model, DiffuSSM) and len(model.blocks) == 2
    out = model(torch.randn(3, 1, 8, 8), torch.tensor([1, 50, 999]), torch.tensor([0, 3, 10]))
    assert out.shape == (3, 2, 8, 8)
    by_name = MODELS.build(dict(type="diffussm_tiny_8", depth=1))
    assert isinstance(by_name, DiffuSSM) and by_name.hidden_size == 128 and len(by_name.blocks) == 1
    assert {"diffussm_xl_256", "diffussm_xl_512"} <= set(MODELS.module_dict)
