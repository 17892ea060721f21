"""Evaluate a checkpoint on a config's test set with mmengine's Runner; prints the metrics and writes them
to <work-dir>/metrics.json (ADE20K: aAcc, mIoU, mAcc; COCO: bbox and segm AP).

    python tools/test.py configs/vmamba/upernet_vmamba-t_8xb2-160k_ade20k-512x512.py CHECKPOINT
    bash tools/dist_test.sh CONFIG CHECKPOINT 8 [--tta]                         # several GPUs (torchrun)
"""
import argparse
import json
import os
import os.path as osp

# see tools/train.py: mmengine's checkpoints are read by bare torch.load calls
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from vssm.mm.launch import destroy_distributed, exit_worker, init_cpu_distributed  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a segmentor / detector checkpoint")
    parser.add_argument("config", help="config file")
    parser.add_argument("checkpoint", help="checkpoint file (tools/train.py's, or an mmseg/mmdet one)")
    parser.add_argument("--work-dir", help="where logs and metrics.json go (default: work_dirs/<config name>)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (multi-scale + flip) "
                                                         "with the config's tta_model / tta_pipeline")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help="override config entries, e.g. test_dataloader.dataset.data_root=data/ade")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none", help="job launcher")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def build_config(args):
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("work_dirs", osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    if args.tta:
        if "tta_model" not in cfg or "tta_pipeline" not in cfg:
            raise SystemExit(f"--tta: {args.config} defines no tta_model / tta_pipeline")
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    return cfg


def _plain(value):
    try:
        return value.item()  # numpy / torch scalars
    except AttributeError:
        return value


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args)
    init_cpu_distributed(cfg)  # torchrun without GPUs: gloo (mmengine's launcher assumes a GPU each)
    runner = RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
    metrics = {k: _plain(v) for k, v in runner.test().items()}
    destroy_distributed()
    if runner.rank == 0:
        path = osp.join(cfg.work_dir, "metrics.json")
        with open(path, "w") as f:
            json.dump(dict(config=args.config, checkpoint=args.checkpoint, metrics=metrics), f, indent=2)
        print("\n".join([f"{k}: {v}" for k, v in metrics.items()] + [f"metrics written to {path}"]))
    return metrics


if __name__ == "__main__":
    main()
    exit_worker()  # under torchrun: skip interpreter finalization, where gloo's threads can abort the process
