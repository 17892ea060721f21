"""Train an mmseg / mmdet model from a config with mmengine's Runner (the toolboxes' tools/train.py).

    python tools/train.py configs/vmamba/upernet_vmamba-t_8xb2-160k_ade20k-512x512.py --work-dir work_dirs/x
    bash tools/dist_train.sh CONFIG 8 [--amp] [--cfg-options key=value ...]   # several GPUs (torchrun)

The config's default_scope picks the toolbox; its custom_imports load vssm.mm (the backbones).
"""
import argparse
import os
import os.path as osp

# mmengine 0.10 resumes with bare torch.load calls, which torch >= 2.6 runs weights-only; its own checkpoints
# pickle more than tensors. Call sites that pass weights_only (vssm's checkpoint reader) are not affected.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from vssm.mm.launch import destroy_distributed, exit_worker, init_cpu_distributed  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a segmentor / detector from an OpenMMLab config")
    parser.add_argument("config", help="config file")
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config name>)")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                        help="resume from CHECKPOINT, or from the latest one in the work dir if none is given")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision (needs a GPU)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help="override config entries, e.g. train_dataloader.batch_size=4 "
                             "model.backbone.drop_path_rate=0.1")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none", help="job launcher")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def build_config(args):
    if args.amp:
        from mmengine.device import get_device
        if get_device() == "cpu":
            raise SystemExit("--amp needs a GPU (mmengine's AmpOptimWrapper); train on CPU without it")
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("work_dirs", osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def main(argv=None):
    cfg = build_config(parse_args(argv))
    init_cpu_distributed(cfg)  # torchrun without GPUs: gloo (mmengine's launcher assumes a GPU each)
    runner = RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
    runner.train()
    destroy_distributed()


if __name__ == "__main__":
    main()
    exit_worker()  # under torchrun: skip interpreter finalization, where gloo's threads can abort the process
