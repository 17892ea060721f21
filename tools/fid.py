"""FID (and optionally Inception Score) of generated samples against a reference, by torch-fidelity.

    python tools/fid.py samples.npz imagenet_val_256/ --isc
    python tools/fid.py samples/ reference/
    python tools/fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --inception-weights pt_inception.pth

Each input is a folder of images (png/jpg, one size) or an .npz holding uint8 images (N, H, W, 3) under
"arr_0" (what tools/sample_diffusion.py --npz and DiT's sample_ddp.py write, and the format of ADM's
reference batches; (N, H, W) or (N, H, W, 1) grey images are repeated to RGB). The metrics are
torch-fidelity's (`torch_fidelity.calculate_metrics`): FID (Heusel et al. 2017) between the two inputs'
Inception-v3 pool features, and with --isc the Inception Score (Salimans et al. 2016) of the first input.

Internet: torch-fidelity downloads its Inception-v3 weights (pt_inception-2015-12-05, from its GitHub
releases) on first use into the torch hub cache. Offline, pass that file with --inception-weights.
Prints the metrics and writes them as JSON with --json.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class NpzImages(Dataset):
    """uint8 images of an .npz ("arr_0", (N, H, W, 3), (N, H, W, 1) or (N, H, W)) as torch-fidelity's input:
    uint8 tensors (3, H, W)."""

    def __init__(self, path):
        with np.load(path) as f:
            key = "arr_0" if "arr_0" in f.files else (f.files[0] if len(f.files) == 1 else None)
            if key is None:
                raise ValueError(f"{path}: no 'arr_0' among the arrays {f.files}")
            images = f[key]
        if images.dtype != np.uint8:
            raise ValueError(f"{path}: images must be uint8 in [0, 255], got {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
            raise ValueError(f"{path}: expected images (N, H, W, 3) (or grey (N, H, W[, 1])), got {images.shape}")
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2)  # a view: (N, C, H, W)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].expand(3, -1, -1).contiguous()


def as_input(path):
    """A folder path (torch-fidelity reads it) or an .npz (as NpzImages)."""
    p = Path(path)
    if p.is_dir():
        return str(p)
    if p.is_file() and p.suffix == ".npz":
        return NpzImages(p)
    raise ValueError(f"{path}: not a folder of images or an .npz file")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("samples", help="generated images: a folder or an .npz")
    p.add_argument("reference", help="reference images: a folder or an .npz")
    p.add_argument("--isc", action="store_true", help="also the Inception Score of the samples")
    p.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="(default: cuda when available)")
    p.add_argument("--inception-weights", help="local pt_inception-2015-12-05 weights file (offline use)")
    p.add_argument("--json", help="write the metrics to this JSON file")
    args = p.parse_args(argv)
    try:
        inputs = [as_input(args.samples), as_input(args.reference)]
    except ValueError as e:
        p.error(str(e))
    if args.inception_weights and not Path(args.inception_weights).is_file():
        p.error(f"--inception-weights {args.inception_weights}: no such file")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")

    import torch_fidelity

    metrics = torch_fidelity.calculate_metrics(
        input1=inputs[0], input2=inputs[1], fid=True, isc=args.isc, cuda=cuda, batch_size=args.batch_size,
        feature_extractor_weights_path=args.inception_weights, verbose=False)
    metrics = {k: float(v) for k, v in metrics.items()}
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(metrics, samples=args.samples, reference=args.reference), indent=2))
    return metrics


if __name__ == "__main__":
    main()
