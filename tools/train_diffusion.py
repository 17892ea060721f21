"""Class-conditional diffusion training of DiffuSSM (or any DiT-style timm denoiser), with DiT's recipe.

    torchrun --nproc_per_node 8 tools/train_diffusion.py --model diffussm_xl_256 \
        --data-path imagenet/train --image-size 256 --results-dir runs/xl256
    python tools/train_diffusion.py --data-path imagenet/train --image-size 256 --extract-latents in256.npz
    torchrun --nproc_per_node 8 tools/train_diffusion.py --model diffussm_xl_256 --data-path in256.npz ...
    python tools/train_diffusion.py --model diffussm_tiny_8 --data-path small_rgb/ --image-size 8 --vae none ...

Data, --data-path:
  * an ImageFolder (one sub-folder per class): centre-cropped to --image-size as ADM/DiT do, randomly
    flipped; with --vae ema|mse encoded by diffusers' AutoencoderKL "stabilityai/sd-vae-ft-<vae>" (fetched
    from the Hugging Face hub) to latents x 0.18215, so the model sees 4 x size/8 x size/8; with --vae none
    the model trains on the RGB pixels in [-1, 1] (small images).
  * a .npz or .pt file of pre-extracted latents, keys "latents" (N, C, h, w), already scaled, and "labels"
    (N,), as --extract-latents writes them (one posterior sample per image, no flips).
The model is ``timm.create_model(--model, input_size, in_chans, num_classes, **--model-kwargs)`` with the
size, channels and class count of the data.

Recipe (DiT, Peebles & Xie 2023, which DiffuSSM follows): AdamW at a constant 1e-4 without weight decay,
global batch 256, EMA 0.9999 of the weights, the loss of `vssm.diffusion` (noise MSE plus improved DDPM's
variational bound for the learned variance) on DiT's 1000-step linear schedule (diffusers' DDPMScheduler).
bf16 autocast on CUDA (--precision fp32 turns it off), --grad-checkpointing through the model's
``set_grad_checkpointing``. Multi-GPU with torchrun (DDP; NCCL on CUDA, gloo on the CPU): every epoch is
one seeded permutation of the data, each rank trains on its own slice. The random draws of step s on rank
r (timesteps, noise, label dropout, VAE posterior samples) are seeded from (--seed, s, r), so --resume
continues exactly where the checkpoint left off (same world size and batch).

Writes <results-dir>/log.txt (the loss every --log-every steps, averaged over the interval and the ranks)
and <results-dir>/checkpoints/<step>.pt every --ckpt-every steps and at the end: {"model", "ema", "opt",
"step", "config"}, "config" being what tools/sample_diffusion.py needs to rebuild the model.
"""
import argparse
import json
import logging
import math
import os
import sys
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vssm  # noqa: E402,F401  (registers the models with timm)
from vssm.diffusion import make_scheduler, train_step, update_ema  # noqa: E402

VAE_SCALE = 0.18215  # Stable Diffusion's latent scaling, as DiT


def vae_id(name):
    return f"stabilityai/sd-vae-ft-{name}"


def center_crop(image, size):
    """ADM's centre crop (as DiT): halve with a box filter while the short side is >= 2 size, resize the short
    side to size (bicubic), crop the centre."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_folder(path, size):
    """An ImageFolder of RGB images at size x size in [-1, 1] (the training loop flips them: seeded per step)."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    return ImageFolder(path, transform=transforms.Compose([
        transforms.Lambda(lambda im: center_crop(im.convert("RGB"), size)),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ]))


def load_latents(path):
    """Pre-extracted latents (.npz or .pt with "latents" and "labels") as a TensorDataset and class count."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as f:  # "classes" (names, strings) stays behind
            data = {k: torch.from_numpy(f[k]) for k in f.files if k in ("latents", "labels", "num_classes")}
    elif path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: pre-extracted latents must be a .npz or .pt file (or pass an ImageFolder)")
    if not {"latents", "labels"} <= set(data):
        raise ValueError(f"{path}: needs the keys 'latents' (N, C, h, w) and 'labels' (N,), has {sorted(data)}")
    latents, labels = data["latents"], data["labels"].long()
    if latents.dim() != 4 or labels.shape != latents.shape[:1]:
        raise ValueError(f"{path}: latents {tuple(latents.shape)} and labels {tuple(labels.shape)} do not match "
                         "(N, C, h, w) and (N,)")
    num_classes = int(data["num_classes"]) if "num_classes" in data else int(labels.max()) + 1
    return TensorDataset(latents, labels), num_classes


@torch.no_grad()
def extract_latents(args, device):
    """Encode the ImageFolder once (no flips, one posterior sample each) and save latents x 0.18215 (float16)
    with labels and the class names to --extract-latents."""
    from diffusers.models import AutoencoderKL
    from tqdm.auto import tqdm

    dataset = image_folder(args.data_path, args.image_size)
    vae = AutoencoderKL.from_pretrained(vae_id(args.vae)).to(device).eval()
    loader = DataLoader(dataset, batch_size=args.global_batch_size, num_workers=args.num_workers)
    torch.manual_seed(args.seed)
    latents = []
    for x, _ in tqdm(loader, desc=f"encoding with {vae_id(args.vae)}"):
        latents.append((vae.encode(x.to(device)).latent_dist.sample() * VAE_SCALE).half().cpu())
    out = dict(latents=torch.cat(latents).numpy(), labels=np.asarray(dataset.targets, dtype=np.int64),
               num_classes=np.int64(len(dataset.classes)), classes=np.asarray(dataset.classes))
    if args.extract_latents.endswith(".pt"):
        torch.save({k: torch.as_tensor(v) for k, v in out.items() if k != "classes"}, args.extract_latents)
    else:
        np.savez(args.extract_latents, **out)
    print(f"saved {out['latents'].shape} latents of {len(dataset.classes)} classes to {args.extract_latents}")


def epoch_indices(n, epoch, seed, rank, world, batch):
    """This rank's sample indices of an epoch: a permutation seeded by (seed, epoch), split across ranks,
    cut to whole batches."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    mine = perm[rank::world][: (n // world) // batch * batch]
    return mine.tolist()


def create_logger(results_dir, rank):
    logger = logging.getLogger("train_diffusion")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):  # a previous run in this process wrote to its own results dir
        logger.removeHandler(handler)
        handler.close()
    if rank == 0:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(results_dir / "log.txt")):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    logger.propagate = False
    return logger


def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as DiT
        torch.backends.cudnn.allow_tf32 = True
    if args.extract_latents:
        if world > 1:
            sys.exit("--extract-latents runs in one process (not under torchrun)")
        return extract_latents(args, device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.global_batch_size % world:
        sys.exit(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} processes")
    batch = args.global_batch_size // world
    results_dir = Path(args.results_dir)
    (results_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    logger = create_logger(results_dir, rank)

    # data: latents from a file, or an ImageFolder (encoded on the fly, or pixels)
    data_path = Path(args.data_path)
    vae = None
    if data_path.is_file():
        dataset, num_classes = load_latents(data_path)
        sample_shape, space = tuple(dataset.tensors[0].shape[1:]), "latent"
    else:
        dataset = image_folder(data_path, args.image_size)
        num_classes = len(dataset.classes)
        if args.vae == "none":
            sample_shape, space = (3, args.image_size, args.image_size), "pixel"
        else:
            if args.image_size % 8:
                sys.exit(f"--image-size {args.image_size} must be a multiple of 8 (the VAE downsamples by 8)")
            from diffusers.models import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(vae_id(args.vae)).to(device).eval().requires_grad_(False)
            sample_shape, space = (4, args.image_size // 8, args.image_size // 8), "latent"
    steps_per_epoch = len(dataset) // args.global_batch_size
    if steps_per_epoch == 0:
        sys.exit(f"{len(dataset)} samples are fewer than one global batch of {args.global_batch_size}")

    # model, EMA, optimizer
    config = dict(model=args.model, space=space, vae=args.vae if space == "latent" else None,
                  image_size=args.image_size if data_path.is_dir() else 8 * sample_shape[-1],
                  model_kwargs=dict(args.model_kwargs, input_size=sample_shape[1:], in_chans=sample_shape[0],
                                    num_classes=num_classes))
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, **config["model_kwargs"])
    if args.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            sys.exit(f"{args.model} has no set_grad_checkpointing")
        model.set_grad_checkpointing(True)
    model.to(device)
    ema = deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
    step = 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        logger.info(f"resumed from {args.resume} at step {step}")
    raw = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()  # label dropout on: the null class for classifier-free guidance
    scheduler = make_scheduler("ddpm", learn_sigma=getattr(ema, "learn_sigma", True))
    autocast = torch.bfloat16 if device.type == "cuda" and args.precision == "bf16" else None
    logger.info(f"{args.model}: {sum(p.numel() for p in ema.parameters()):,} parameters, {space} space "
                f"{'x'.join(map(str, sample_shape))}, {num_classes} classes; {len(dataset):,} samples from "
                f"{data_path}, {world} process(es) x batch {batch}, {steps_per_epoch} steps per epoch; "
                f"device {device}, {'bf16 autocast' if autocast else 'fp32'}")

    def save():
        if rank == 0:
            path = results_dir / "checkpoints" / f"{step:07d}.pt"
            torch.save(dict(model=raw.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                            step=step, config=config), path)
            logger.info(f"saved {path}")
        if world > 1:
            dist.barrier()

    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    sums, count, t0 = None, 0, time.perf_counter()
    with logging_redirect_tqdm([logger]), tqdm(total=args.steps, initial=step, desc="training", unit="step",
                                               disable=rank != 0 or None, dynamic_ncols=True) as bar:
        while step < args.steps:
            epoch, skip = divmod(step, steps_per_epoch)
            indices = epoch_indices(len(dataset), epoch, args.seed, rank, world, batch)[skip * batch:]
            loader = DataLoader(dataset, batch_size=batch, sampler=indices, num_workers=args.num_workers,
                                pin_memory=device.type == "cuda", drop_last=True)
            for x, y in loader:
                torch.manual_seed((args.seed * 1_000_003 + step) * 1_009 + rank)
                x, y = x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True)
                if data_path.is_dir():  # random horizontal flips, as DiT
                    x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
                if vae is not None:
                    with torch.no_grad():
                        x = vae.encode(x).latent_dist.sample() * VAE_SCALE
                terms = train_step(model, ema, opt, x, y, scheduler, args.ema_decay, autocast)
                step += 1
                stacked = torch.stack(list(terms.values()))
                sums, count = (stacked if sums is None else sums + stacked), count + 1
                bar.update()
                if step % args.log_every == 0 or step == args.steps:
                    if world > 1:
                        dist.all_reduce(sums)
                    means = dict(zip(terms, (sums / (count * world)).tolist()))
                    rate = count / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{means['loss']:.4f}")
                    logger.info(f"step {step:07d}  " + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
                                + f"  {rate:.2f} steps/s")
                    sums, count, t0 = None, 0, time.perf_counter()
                if step % args.ckpt_every == 0 or step == args.steps:
                    save()
                if step >= args.steps:
                    break
    if world > 1:
        dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--data-path", required=True, help="ImageFolder, or a .npz/.pt of pre-extracted latents")
    p.add_argument("--results-dir", default="results", help="log.txt and checkpoints/ go here (default: results)")
    p.add_argument("--model", default="diffussm_xl_256", help="timm model name (default: diffussm_xl_256)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON of extra timm.create_model arguments")
    p.add_argument("--image-size", type=int, default=256, help="image side for an ImageFolder (default: 256)")
    p.add_argument("--vae", choices=("ema", "mse", "none"), default="ema",
                   help="sd-vae-ft-ema/-mse latents, or none: pixel space (default: ema)")
    p.add_argument("--steps", type=int, default=400_000, help="total training steps (default: 400000)")
    p.add_argument("--global-batch-size", type=int, default=256, help="over all processes (default: 256)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (default: 1e-4)")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="(default: 0.9999)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast on CUDA (default)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the blocks in the backward pass")
    p.add_argument("--resume", help="checkpoint to continue from")
    p.add_argument("--extract-latents", metavar="FILE",
                   help="only encode the ImageFolder with the VAE and save the latents to FILE (.npz or .pt)")
    p.add_argument("--num-workers", type=int, default=4, help="data loader workers per process (default: 4)")
    p.add_argument("--log-every", type=int, default=100, help="(default: 100)")
    p.add_argument("--ckpt-every", type=int, default=50_000, help="(default: 50000)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    args = p.parse_args(argv)
    if args.extract_latents and args.vae == "none":
        p.error("--extract-latents needs --vae ema or mse")
    fixed = {"input_size", "in_chans", "num_classes"} & set(args.model_kwargs)
    if fixed:
        p.error(f"--model-kwargs: {', '.join(sorted(fixed))} come from the data (--image-size, the classes)")
    return args


if __name__ == "__main__":
    main()
