"""Training-iteration time and peak memory of OpenMMLab configs (vssm's and the toolboxes' own), in one run.

    python tools/bench_mm.py configs/vmamba/upernet_vmamba-t_8xb2-160k_ade20k-512x512.py \
        mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py

Each config's model is built as mmengine's Runner builds it (SyncBN reverted to BN on one process, no
pretrained weights loaded) and trained with ``model.train_step`` on synthetic samples of the config's size:
segmentors on ``--seg-size`` crops (random labels of the config's classes), detectors on ``--det-size``
images with a few random boxes and masks. Batch = the config's ``train_dataloader.batch_size`` (per GPU),
bf16 autocast through mmengine's AmpOptimWrapper by default (``--fp32`` to turn it off), the config's
optimizer. CUDA-event median over ``--iters`` iterations after ``--warmup``; "peak MiB" is the peak allocation
during the timed iterations above what was allocated before them (weights, optimizer state, inputs).
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import time_step  # noqa: E402

import vssm.mm  # noqa: E402,F401  (registers vssm's backbones; puts the mmcv ops stand-in in place)


def _DictAction(*args, **kwargs):
    from mmengine.config import DictAction
    return DictAction(*args, **kwargs)


def load_config(spec, options=None):
    """A config path, or 'mmseg::path' / 'mmdet::path' inside the installed toolbox."""
    from mmengine.config import Config
    if "::" in spec:  # a config shipped inside an installed toolbox: its .mim/configs folder
        # (mmengine.hub.get_config does this too, but needs pkg_resources, gone from setuptools >= 81)
        package, rel = spec.split("::", 1)
        spec = Path(importlib.import_module(package).__file__).parent / ".mim" / "configs" / rel
    cfg = Config.fromfile(spec)
    if options:
        cfg.merge_from_dict(options)
    cfg.model.pop("pretrained", None)
    cfg.model.backbone.init_cfg = None  # no downloads: random weights time the same
    return cfg


def build(cfg, device):
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(cfg.get("default_scope", "mmengine"))
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    return model.to(device).train()


def seg_batch(cfg, batch, size, device):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    classes = cfg.model.decode_head.num_classes
    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8).to(device))
        s = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, classes, (1, size, size), generator=g).to(device))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def det_batch(cfg, batch, size, device, boxes=8):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    H, W = size
    classes = cfg.model.roi_head.bbox_head.num_classes
    rng = np.random.default_rng(0)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.from_numpy(rng.integers(0, 256, (3, H, W), dtype=np.uint8)).to(device))
        xy = rng.uniform(0, 0.7, (boxes, 2)) * (W, H)
        wh = rng.uniform(0.1, 0.3, (boxes, 2)) * (W, H)
        xyxy = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        masks = np.zeros((boxes, H, W), dtype=np.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, xyxy.astype(int)):
            m[y0:y1, x0:x1] = 1
        s = DetDataSample(metainfo=dict(img_shape=(H, W), ori_shape=(H, W), pad_shape=(H, W),
                                        batch_input_shape=(H, W), scale_factor=(1.0, 1.0)))
        s.gt_instances = InstanceData(bboxes=torch.from_numpy(xyxy).to(device),
                                      labels=torch.from_numpy(rng.integers(0, classes, boxes)).to(device),
                                      masks=BitmapMasks(masks, H, W))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def measure(spec, args, device):
    from mmengine.optim import build_optim_wrapper
    cfg = load_config(spec, args.cfg_options)
    model = build(cfg, device)
    params = sum(p.numel() for p in model.parameters())
    batch = args.batch_size or cfg.train_dataloader.batch_size
    if "decode_head" in cfg.model:
        data, size = seg_batch(cfg, batch, args.seg_size, device), f"{args.seg_size}x{args.seg_size}"
    else:
        data, size = det_batch(cfg, batch, tuple(args.det_size), device), "x".join(map(str, args.det_size))
    wrapper_cfg = cfg.optim_wrapper.copy()
    wrapper_cfg.pop("loss_scale", None)
    if not args.fp32 and device.type == "cuda":
        wrapper_cfg.update(type="AmpOptimWrapper", dtype="bfloat16")
    else:
        wrapper_cfg.update(type="OptimWrapper")
    optim_wrapper = build_optim_wrapper(model, wrapper_cfg)

    def step():
        model.train_step(data, optim_wrapper)

    seconds, peak = time_step(step, device, args.warmup, args.iters)
    ms, peak = seconds * 1e3, None if peak is None else round(peak)
    return dict(config=spec, size=size, batch=batch, params_m=round(params / 1e6, 2), ms_per_iter=round(ms, 1),
                img_per_s=round(batch / ms * 1e3, 1), peak_mib=peak,
                amp=not args.fp32 and device.type == "cuda")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", help="config files, or mmseg::/mmdet:: paths of the toolboxes' configs")
    p.add_argument("--seg-size", type=int, default=512)
    p.add_argument("--det-size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, help="default: the config's train_dataloader.batch_size")
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu: wall-clock times of a float32 step, for a quick look")
    p.add_argument("--cfg-options", nargs="+", action=_DictAction, default={},
                   help="key=value overrides of every config, as in tools/train.py")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(f"{'config':70s} {'size':>9s} {'batch':>5s} {'Mparam':>7s} {'ms/iter':>8s} {'img/s':>7s} {'peak MiB':>9s}")
    for spec in args.configs:
        r = measure(spec, args, device)
        rows.append(r)
        print(f"{Path(spec).name[:70]:70s} {r['size']:>9s} {r['batch']:5d} {r['params_m']:7.2f} {r['ms_per_iter']:8.1f} "
              f"{r['img_per_s']:7.1f} {r['peak_mib'] if r['peak_mib'] is not None else '-':>9}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
