"""Parameters and FLOPs of any timm model (vssm's or timm's) at a resolution, the selective scan included.

    python tools/flops.py --models vmamba_tiny vim_tiny_patch16_224 deit_tiny_patch16_224 --img-size 224

Counted the way the papers' "FLOPs" are (fvcore's convention, which VMamba's and Vim's tables use): one
multiply-add is one FLOP. torch's FlopCounterMode counts the matrix products, convolutions and attention
(it reports 2 per multiply-add, halved here); layer/group norms add 5 per element as fvcore counts them;
the selective scan adds 9 * batch * L * dim * N (+ batch * dim * L for D and for z), the rule of Mamba's
authors that VMamba uses (`vssm.kernels.count_scan_flops`). Elementwise activations are not counted, as
in fvcore. Runs one forward of batch 1 on the CPU.
"""
import argparse
import json
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import vssm  # noqa: F401  (registers vssm's models with timm)
from vssm.kernels import count_scan_flops

aten = torch.ops.aten


def _norm_flops(input_shape, *args, **kwargs):
    """fvcore's rule for an affine norm: 5 operations per element."""
    numel = 1
    for s in input_shape:
        numel *= s
    return 2 * 5 * numel  # FlopCounterMode's unit is half a multiply-add; halved with the rest below


def _cpu_attention_flops(q_shape, k_shape, v_shape, *args, **kwargs):
    """SDPA's CPU kernel as torch counts its CUDA ones (torch 2.14's FlopCounterMode has no rule for it, so
    DeiT's and DiT's attention counted zero on the CPU)."""
    return sdpa_flop_count(q_shape, k_shape, v_shape)


# what FlopCounterMode counts besides its own rules: the norms (fvcore) and the CPU's attention kernel
_COUNTED = {aten.native_layer_norm: lambda x_shape, *a, **k: _norm_flops(x_shape),
            aten.native_group_norm: lambda x_shape, *a, **k: _norm_flops(x_shape),
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count(model, img_size, in_chans=3):
    """dict(params, macs of matmuls/convs/attention/norms, scan_flops, gflops = their sum / 1e9)."""
    model.eval()
    x = torch.randn(1, in_chans, img_size, img_size)
    counter = FlopCounterMode(display=False, custom_mapping=_COUNTED)
    with torch.no_grad(), counter, count_scan_flops() as scan:
        model(x)
    macs = counter.get_total_flops() // 2
    return dict(params=sum(p.numel() for p in model.parameters()), macs=macs, scan_flops=scan["flops"],
                scan_calls=scan["calls"], gflops=(macs + scan["flops"]) / 1e9)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON of extra timm.create_model arguments")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = []
    print(f"{'model':34s} {'res':>5s} {'params (M)':>11s} {'GFLOPs':>8s} {'of which scan':>14s}")
    for name in args.models:
        model = timm.create_model(name, **args.model_kwargs)
        in_chans = getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0]
        row = dict(model=name, img_size=args.img_size, **count(model, args.img_size, in_chans))
        rows.append(row)
        print(f"{name:34s} {args.img_size:5d} {row['params'] / 1e6:11.2f} {row['gflops']:8.2f} "
              f"{row['scan_flops'] / 1e9:14.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
