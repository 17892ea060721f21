"""Class-conditional samples from a checkpoint of tools/train_diffusion.py, with a diffusers scheduler.

    python tools/sample_diffusion.py --ckpt runs/xl256/checkpoints/0400000.pt --scheduler ddpm --steps 250 \
        --cfg-scale 4 --class-ids 207 360 387 974 88 979 417 279 --out sample.png
    python tools/sample_diffusion.py --ckpt ... --cfg-scale 1.5 --num-samples 50000 --npz samples.npz

The model is rebuilt from the checkpoint's config (EMA weights unless --weights model) and run by
`vssm.diffusion.sample`: --scheduler ddpm (ancestral, with the learned variance; DiT's sampler), ddim or
dpm-solver (DPM-Solver++), --steps of it, classifier-free guidance at --cfg-scale (1: none), noise from
--seed. Latent-space models are decoded by diffusers' AutoencoderKL "stabilityai/sd-vae-ft-<vae>" (the
training run's VAE unless --vae; fetched from the Hugging Face hub) from latents / 0.18215.

Labels: --num-samples labels that cycle through --class-ids (default: every class), so each row of the grid
(as many columns as class ids, up to 16) shows the classes in order. Writes the first 256 samples as a PNG
grid to --out (images smaller than 64 pixels enlarged, nearest neighbour, for viewing) and, with --npz, all
samples as uint8 (N, H, W, 3) under "arr_0" (DiT's sample_ddp.py format, for tools/fid.py; grey images
repeated to RGB) with their "labels".
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vssm  # noqa: E402,F401  (registers the models with timm)
from vssm.diffusion import SCHEDULERS, make_scheduler, sample  # noqa: E402

VAE_SCALE = 0.18215
GRID_MAX = 256


def load_model(path, weights, device):
    """The model of a train_diffusion.py checkpoint with its EMA (or raw) weights, in eval mode, and its config."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "config" not in ckpt:
        raise ValueError(f"{path}: not a tools/train_diffusion.py checkpoint (no 'config')")
    config = ckpt["config"]
    model = timm.create_model(config["model"], **config["model_kwargs"])
    model.load_state_dict(ckpt[weights])
    return model.to(device).eval(), config


def to_uint8(images):
    """[-1, 1] floats (N, C, H, W) -> uint8 (N, H, W, 3) as DiT's sample_ddp.py rounds them."""
    images = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return images.expand(-1, -1, -1, 3) if images.shape[-1] == 1 else images


def save_grid(images, path, ncol):
    """uint8 (N, H, W, 3) -> a PNG grid of ncol columns, 2-pixel gaps; small images enlarged to >= 64 px."""
    from PIL import Image
    from torchvision.utils import make_grid

    x = images.permute(0, 3, 1, 2)
    scale = max(1, math.ceil(64 / max(x.shape[-2:])))
    x = x.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    grid = make_grid(x, nrow=ncol, padding=2, pad_value=255)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as DiT
        torch.backends.cudnn.allow_tf32 = True
    model, config = load_model(args.ckpt, args.weights, device)
    num_classes = model.num_classes
    class_ids = args.class_ids if args.class_ids is not None else list(range(num_classes))
    bad = [c for c in class_ids if not 0 <= c < num_classes]
    if bad:
        sys.exit(f"--class-ids {bad}: the model has classes 0..{num_classes - 1}")
    n = args.num_samples or len(class_ids)
    labels = torch.tensor([class_ids[i % len(class_ids)] for i in range(n)])
    pixel = config["space"] == "pixel"
    scheduler = make_scheduler(args.scheduler, learn_sigma=model.learn_sigma, clip_sample=pixel)
    vae = None
    if not pixel:
        from diffusers.models import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(f"stabilityai/sd-vae-ft-{args.vae or config['vae']}").to(device).eval()
    shape = (model.in_chans, *config["model_kwargs"]["input_size"])
    print(f"{config['model']} ({args.weights} weights of {args.ckpt}): {n} samples of {len(set(class_ids))} "
          f"classes, {args.scheduler} {args.steps} steps, cfg scale {args.cfg_scale}, seed {args.seed}, {device}")

    generator = torch.Generator().manual_seed(args.seed)
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, n, args.batch_size), desc="batches", disable=None):
        with torch.no_grad():
            x = sample(model, scheduler, labels[start:start + args.batch_size], shape, args.steps, args.cfg_scale,
                       generator)
            if vae is not None:
                x = vae.decode(x / VAE_SCALE).sample
        out.append(to_uint8(x.float().cpu()))
    images = torch.cat(out)
    save_grid(images[:GRID_MAX], args.out, len(class_ids) if len(class_ids) <= 16 else math.ceil(math.sqrt(min(n, GRID_MAX))))
    print(f"grid of {min(n, GRID_MAX)} samples: {args.out}")
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, arr_0=images.numpy(), labels=labels.numpy())
        print(f"{tuple(images.shape)} uint8 samples: {args.npz}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--ckpt", required=True, help="a checkpoint of tools/train_diffusion.py")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="(default: ema)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddpm", help="(default: ddpm)")
    p.add_argument("--steps", type=int, default=250, help="sampling steps (default: 250)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale, 1 = none (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--class-ids", type=int, nargs="+", help="classes to sample (default: all)")
    p.add_argument("--num-samples", type=int, help="number of samples (default: one per class id)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch (default: 64)")
    p.add_argument("--out", default="samples.png", help="PNG grid (default: samples.png)")
    p.add_argument("--npz", help="also write all samples as uint8 arr_0 (N, H, W, 3) to this .npz")
    p.add_argument("--vae", choices=("ema", "mse"), help="decoder of latent models (default: the training run's)")
    p.add_argument("--device", help="torch device (default: cuda when available)")
    args = p.parse_args(argv)
    for name in ("steps", "num_samples", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


if __name__ == "__main__":
    main()
