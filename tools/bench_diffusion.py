"""Training-step throughput, peak memory and GFLOPs of DiffuSSM against DiT (diffusers), in one run.

    python tools/bench_diffusion.py --models diffussm_xl_256 dit_xl_2 --latent-size 32 64 --batch-size 32 8

A training step is what DiT's train.py does per iteration, minus the VAE: a forward on noised latents with
random timesteps and class labels, the MSE on the noise channels, backward and an AdamW step (bf16 autocast
on CUDA). vssm names are timm models created with ``input_size=latent``; ``dit_xl_2`` / ``dit_l_2`` /
``dit_b_2`` / ``dit_s_2`` are diffusers' ``DiTTransformer2DModel`` in DiT's configurations (learned sigma,
adaLN-Zero, SDPA attention). GFLOPs: one forward of one sample, counted like tools/flops.py (multiply-adds of
matmuls/convs/attention, fvcore's norm rule, and the selective scan by the Mamba authors' rule), the
convention of DiT's 118.6 GFLOPs for DiT-XL/2 at 256.
"""
import argparse
import json
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import time_step  # noqa: E402
from flops import _COUNTED  # noqa: E402

import vssm  # noqa: E402,F401  (registers vssm's models with timm)
from vssm.kernels import count_scan_flops  # noqa: E402

# DiT's table 1: (depth, hidden size, heads), patch size 2
_DIT = {"dit_s_2": (12, 384, 6), "dit_b_2": (12, 768, 12), "dit_l_2": (24, 1024, 16), "dit_xl_2": (28, 1152, 16)}


class DiT(torch.nn.Module):
    """diffusers' DiTTransformer2DModel behind DiT's ``forward(x, t, y)``."""

    def __init__(self, name, latent_size, in_chans=4, num_classes=1000):
        super().__init__()
        from diffusers import DiTTransformer2DModel
        self.in_chans, self.num_classes = in_chans, num_classes
        depth, width, heads = _DIT[name]
        self.net = DiTTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=width // heads, in_channels=in_chans,
            out_channels=2 * in_chans, num_layers=depth, sample_size=latent_size, patch_size=2,
            num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero")

    def forward(self, x, t, y):
        return self.net(x, timestep=t, class_labels=y).sample


def create(name, latent_size, device):
    if name in _DIT:
        return DiT(name, latent_size).to(device)
    return timm.create_model(name, input_size=latent_size).to(device)


def gflops(model, latent_size, device):
    """GFLOPs of one forward of one sample (see the module docs)."""
    x = torch.randn(1, model.in_chans, latent_size, latent_size, device=device)
    t, y = torch.tensor([500], device=device), torch.tensor([1], device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_COUNTED)
    with torch.no_grad(), counter, count_scan_flops() as scan:
        model(x, t, y)
    return (counter.get_total_flops() // 2 + scan["flops"]) / 1e9


def measure(name, latent_size, batch, device, dtype, warmup, iters):
    torch.manual_seed(0)
    model = create(name, latent_size, device)
    params = sum(p.numel() for p in model.parameters())
    flops = gflops(model.eval(), latent_size, device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)  # DiT's optimizer
    x = torch.randn(batch, model.in_chans, latent_size, latent_size, device=device)
    noise = torch.randn_like(x)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            out = model(x, t, y)
            loss = F.mse_loss(out[:, :model.in_chans].float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    seconds, peak = time_step(step, device, warmup, iters)
    return dict(model=name, latent_size=latent_size, batch=batch, dtype=str(dtype).replace("torch.", ""),
                params_m=round(params / 1e6, 1), gflops=round(flops, 1), ms_per_step=round(seconds * 1e3, 2),
                samples_per_s=round(batch / seconds, 1), peak_mib=None if peak is None else round(peak))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["diffussm_xl_256", "dit_xl_2"])
    p.add_argument("--latent-size", type=int, nargs="+", default=[32, 64])
    p.add_argument("--batch-size", type=int, nargs="+", default=[32, 8], help="one per latent size")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if len(args.batch_size) != len(args.latent_size):
        p.error(f"--batch-size needs one value per --latent-size ({len(args.latent_size)}), "
                f"got {len(args.batch_size)}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    rows = []
    print(f"{'model':18s} {'latent':>6s} {'batch':>5s} {'Mparam':>7s} {'GFLOPs':>7s} {'ms/step':>8s} "
          f"{'samples/s':>9s} {'peak MiB':>9s}")
    for size, batch in zip(args.latent_size, args.batch_size):
        for name in args.models:
            r = measure(name, size, batch, device, dtype, args.warmup, args.iters)
            rows.append(r)
            print(f"{name:18s} {size:6d} {batch:5d} {r['params_m']:7.1f} {r['gflops']:7.1f} {r['ms_per_step']:8.2f} "
                  f"{r['samples_per_s']:9.1f} {r['peak_mib'] if r['peak_mib'] is not None else '-':>9}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
