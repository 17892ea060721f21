"""Throughput and peak memory of vssm models against timm peers, in one run.

    python tools/benchmark.py --models vim_tiny_patch16_224 deit_tiny_patch16_224 \
        --img-size 224 512 1024 --batch-size 128 32 8 --mode infer train --json out/bench.json

Every model is created through ``timm.create_model(name, img_size=size)`` (vssm's models are registered on
``import vssm``; any timm name works). Inference: ``model(x)`` under ``torch.inference_mode``; training:
forward, cross-entropy on random labels, backward and an AdamW step. On CUDA, times are CUDA-event
medians over ``--iters`` iterations after ``--warmup`` ones (bf16 autocast by default); peak memory is
``torch.cuda.max_memory_allocated`` during the timed iterations minus what was allocated before (weights,
optimizer state, input). On the CPU (``--device cpu``, float32) it is a quick look: wall-clock medians,
no memory figure. Writes a table to stdout, and optionally JSON/CSV rows and a plot (img/s and memory
against resolution).
"""
import argparse
import csv
import gc
import json
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import vssm  # noqa: F401  (registers vssm's models with timm)


def create(name, img_size, device, **kwargs):
    """timm.create_model at img_size where the model takes that argument (ConvNeXt does not need it)."""
    try:
        model = timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError:
        model = timm.create_model(name, **kwargs)
    return model.to(device)


def time_step(step, device, warmup, iters):
    """The benchmark protocol shared by the tools: `warmup` untimed calls of step(), then the median seconds
    of `iters` timed ones (CUDA events on CUDA, wall clock elsewhere) and the peak memory they allocate on top
    of what was allocated before them, in MiB (None off CUDA)."""
    cuda = device.type == "cuda"

    def once():
        if not cuda:
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    for _ in range(warmup):
        once()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median([once() for _ in range(iters)]) if iters else None
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if cuda else None
    return seconds, peak


def graphed(step, warmup=3):
    """step captured once into a CUDA graph: a replay launches all its kernels at once, so the time measured
    is the GPU's alone, without Python's per-kernel launch overhead. Fixed input; a training step captures
    forward, backward and an optimizer made with ``capturable=True`` (PyTorch's whole-network capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture (Triton compiles, cuDNN picks algorithms)
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def measure(name, mode, img_size, batch, device, dtype, warmup, iters, compile_mode=None, model_kwargs=None,
            cuda_graph=False):
    """One row: seconds per iteration, images per second and peak extra memory (MiB) of one model."""
    torch.manual_seed(0)
    model = create(name, img_size, device, **(model_kwargs or {}))
    if compile_mode:
        model = torch.compile(model, mode=compile_mode)
    compiled_graphs = compile_mode in ("reduce-overhead", "max-autotune")  # modes that replay CUDA graphs
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    # no cast cache under capture: the cached bf16 weights would be freed when the captured step ends
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=not cuda_graph)
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model(x)
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=cuda_graph)
        labels = torch.randint(0, model.num_classes, (batch,), device=device)

        def step():
            with autocast:
                loss = F.cross_entropy(model(x), labels)
            loss.backward()
            optimizer.step()
            # keep gradient buffers (they count as resident memory), except where the step runs as torch.compile's
            # CUDA graphs, whose next replay overwrites them
            optimizer.zero_grad(set_to_none=compiled_graphs)
    if cuda_graph:
        step = graphed(step)
    seconds, peak = time_step(step, device, warmup, iters)
    if cuda_graph or compiled_graphs:
        peak = None  # a graph's memory is allocated at capture, before time_step's baseline
    return dict(model=name, mode=mode, img_size=img_size, batch=batch, dtype=str(dtype).replace("torch.", ""),
                params_m=round(params / 1e6, 2), ms_per_iter=round(seconds * 1e3, 3),
                img_per_s=round(batch / seconds, 1), peak_mib=None if peak is None else round(peak, 1))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, mode) in sorted({(r["model"], r["mode"]) for r in rows if "error" not in r}):
        pts = sorted((r["img_size"], r["img_per_s"], r["peak_mib"]) for r in rows
                     if r["model"] == name and r["mode"] == mode and "error" not in r)
        label = f"{name} ({mode})"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if pts[0][2] is not None:
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    axes[0].set(xlabel="resolution (px)", ylabel="images / s", yscale="log", title="throughput")
    axes[1].set(xlabel="resolution (px)", ylabel="peak extra memory (MiB)", yscale="log", title="memory")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="timm model names (vssm's or any timm model)")
    p.add_argument("--img-size", nargs="+", type=int, default=[224])
    p.add_argument("--batch-size", nargs="+", type=int, default=[64],
                   help="one batch size for all resolutions, or one per --img-size")
    p.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer"])
    p.add_argument("--train-img-size", nargs="+", type=int, default=None,
                   help="resolutions for --mode train (default: those of --img-size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="autocast dtype (default bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile every model, in this mode (default: 'default'; 'reduce-overhead' replays "
                        "CUDA graphs)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time CUDA graph replays of each step (forward; or forward, backward and AdamW): the "
                        "GPU's time without Python's launch overhead")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help='JSON of extra timm.create_model arguments for every model, e.g. \'{"depth": 12}\'')
    p.add_argument("--json", type=Path)
    p.add_argument("--csv", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    if args.cuda_graph and not args.device.startswith("cuda"):
        p.error("--cuda-graph needs a CUDA device")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    iters = args.iters if args.iters is not None else (30 if cuda else 3)
    if len(args.batch_size) not in (1, len(args.img_size)):
        p.error("--batch-size takes one value or one per --img-size")
    batch_of = dict(zip(args.img_size, args.batch_size * (len(args.img_size) if len(args.batch_size) == 1 else 1)))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'} | torch {torch.__version__} | "
          f"timm {timm.__version__} | vssm {vssm.__version__} | {str(dtype).replace('torch.', '')}")
    print(f"{'model':34s} {'mode':5s} {'res':>5s} {'batch':>5s} {'Mparam':>7s} {'ms/iter':>9s} {'img/s':>9s} "
          f"{'peak MiB':>9s}")
    rows = []
    for mode in args.mode:
        sizes = args.train_img_size if mode == "train" and args.train_img_size else args.img_size
        for size in sizes:
            for name in args.models:
                batch = batch_of.get(size, args.batch_size[0])
                try:
                    row = measure(name, mode, size, batch, device, dtype, warmup, iters, args.compile, args.model_kwargs,
                                  args.cuda_graph)
                except Exception as e:  # e.g. out of memory or a model that cannot take the size
                    row = dict(model=name, mode=mode, img_size=size, batch=batch, error=f"{type(e).__name__}: {e}"[:300])
                rows.append(row)
                if "error" in row:
                    print(f"{name:34s} {mode:5s} {size:5d} {batch:5d}  failed: {row['error'][:90]}")
                else:
                    print(f"{name:34s} {mode:5s} {size:5d} {batch:5d} {row['params_m']:7.2f} {row['ms_per_iter']:9.2f} "
                          f"{row['img_per_s']:9.1f} {row['peak_mib'] if row['peak_mib'] is not None else '-':>9}")
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
