"""`vssm` / `python -m vssm`: the vssm command line.

    vssm info [--device cuda|cpu] [--quick]
    vssm demo [--models vim vmamba] [--epochs N] [--batch-size B] [--device cuda|cpu] [--out DIR]
    vssm diffusion-demo [--steps N] [--batch-size B] [--cfg-scale S] [--device cuda|cpu] [--out DIR]

`info` (also what `vssm` with no subcommand runs, with the same options) prints versions, the device,
which scan backend runs there, and checks the scan on random inputs against a float64 per-position loop
(forward and gradients), with its speed against that loop and, on CUDA, the Triton kernels against the
PyTorch reference. Exits with status 1 when a check fails.

`demo` trains a small Vim and a small VMamba on scikit-learn's handwritten digits and exits with status 1
when a model ends below the accuracy bound (see `vssm.demo`). `diffusion-demo` trains a small DiffuSSM on
the same digits and exits with status 1 when a digit classifier does not recognise enough of its samples
(see `vssm.diffusion_demo`). Both need the demo extra, pip install 'vssm[demo]'; the diffusion demo also
needs diffusers (pip install 'vssm[diffusion]').
"""
import argparse
import platform
import sys
import time

import torch
import torch.nn.functional as F

from . import __version__


def _loop_scan(u, delta, A, B, C, D, z):
    """The S6 recurrence one position at a time, float64: the ground truth of the check."""
    u, dt, A, B, C = (t.double() for t in (u, F.softplus(delta.double()), A, B, C))
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, -1) + D.double()[:, None] * u) * F.silu(z.double())


def _inputs(batch, dim, N, L, device, dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(u=r(batch, dim, L), delta=r(batch, dim, L) * 0.5 - 1, A=-torch.rand(dim, N, generator=g) * N,
             B=r(batch, N, L), C=r(batch, N, L), D=r(dim), z=r(batch, dim, L))
    return {k: v.to(device=device, dtype=dtype if v.dim() == 3 else torch.float32).requires_grad_()
            for k, v in t.items()}


def _time(fn, device, repeat=3):
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def info(device, quick=False):
    from vssm.kernels import scan_backend, selective_scan, triton_available

    print(f"vssm {__version__} | python {platform.python_version()} | torch {torch.__version__} | "
          f"triton {_version('triton') if triton_available() else 'not installed'} | timm {_version('timm')}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(f"device: {device} ({name}), {torch.get_num_threads()} CPU threads")
    ok = True
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    batch, dim, N, L = (2, 64, 16, 128) if quick else (2, 192, 16, 197)
    print(f"\nselective scan check: batch {batch}, dim {dim}, N {N}, L {L}, softplus(delta), D, z; "
          "error = ||out - truth|| / ||truth|| against a float64 per-position loop")
    print(f"{'dtype':<10}{'backend':<9}{'fwd err':>10}{'grad err':>10}{'fwd ms':>10}{'loop ms':>10}{'speed-up':>10}")
    for dtype in dtypes:
        x = _inputs(batch, dim, N, L, device, dtype)
        backend = scan_backend(device, dtype)
        truth = _loop_scan(**x)
        y = selective_scan(**x, delta_softplus=True)
        gy = torch.randn_like(truth)
        grads_truth = torch.autograd.grad(truth, list(x.values()), gy)
        grads = torch.autograd.grad(y, list(x.values()), gy.to(y.dtype))
        err = _rel(y, truth)
        gerr = max(_rel(g, gt) for g, gt in zip(grads, grads_truth))
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        ok &= err < tol and gerr < tol
        with torch.no_grad():
            t_scan = _time(lambda: selective_scan(**x, delta_softplus=True), device)
            t_loop = _time(lambda: _loop_scan(**x), device, repeat=1)
        print(f"{str(dtype)[6:]:<10}{backend:<9}{err:>10.1e}{gerr:>10.1e}{t_scan:>10.2f}{t_loop:>10.1f}"
              f"{t_loop / t_scan:>9.1f}x" + ("" if err < tol and gerr < tol else "   FAILED"))
    if device.type == "cuda":
        x = _inputs(32, 384, 16, 197, device, torch.bfloat16)
        with torch.no_grad():
            t_tri = _time(lambda: selective_scan(**x, delta_softplus=True, backend="triton"), device, 10)
            t_ref = _time(lambda: selective_scan(**x, delta_softplus=True, backend="torch"), device)
        print(f"\nTriton vs PyTorch reference at batch 32, dim 384, L 197, N 16, bf16: {t_tri:.3f} ms vs "
              f"{t_ref:.2f} ms ({t_ref / t_tri:.0f}x)")
    print("\nself-check " + ("passed" if ok else "FAILED"))
    return ok


def _rel(out, truth):
    return ((out.double() - truth.double()).norm() / truth.double().norm()).item()


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def _device(parser, name):
    """--device's value (default: cuda when available) as a torch.device; a usage error when unusable."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device {name}: not a torch device; use cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    return device


def _run_demo(run, **kwargs):
    """A demo's exit status: 0 passed, 1 failed, 2 its optional packages are missing."""
    from .demo import MissingExtras

    try:
        _, passed = run(**kwargs)
    except MissingExtras as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if passed else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="vssm", description="vssm command line (no subcommand: info)")
    sub = parser.add_subparsers(dest="command", metavar="{info,demo,diffusion-demo}")
    p_info = sub.add_parser("info", help="environment and selective-scan self-check (the default)",
                            description="Environment and selective-scan self-check; exit status 1 if it fails.")
    for p in (parser, p_info):
        p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
        p.add_argument("--quick", action="store_true", help="smaller check")
    p_demo = sub.add_parser(
        "demo", help="train a small Vim and VMamba on scikit-learn's digits",
        description="Train small Vim and VMamba models (timm.create_model, reduced sizes) on scikit-learn's "
                    "8x8 handwritten digits; print their loss, accuracy and throughput, plot the curves to "
                    "OUT/curves.png. Exit status 1 if a model ends below --min-acc. Needs pip install 'vssm[demo]'.")
    p_demo.add_argument("--models", nargs="+", choices=("vim", "vmamba"), default=["vim", "vmamba"],
                        help="models to train (default: vim vmamba)")
    p_demo.add_argument("--epochs", type=_positive, default=10, help="training epochs per model (default: 10)")
    p_demo.add_argument("--batch-size", type=_positive, default=64, help="batch size (default: 64)")
    p_demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p_demo.add_argument("--out", default="vssm-demo", help="output folder for curves.png (default: ./vssm-demo)")
    p_demo.add_argument("--min-acc", type=float, default=0.95,
                        help="final test accuracy every model must reach, as a fraction (default: 0.95)")
    p_demo.add_argument("--seed", type=int, default=0, help="seed of the split, weights and batches (default: 0)")
    p_demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_diff = sub.add_parser(
        "diffusion-demo", help="train a small DiffuSSM on scikit-learn's digits and judge its samples",
        description="Train a small class-conditional DiffuSSM on scikit-learn's 8x8 digits in pixel space, "
                    "sample every class with classifier-free guidance, and let a classifier trained on the "
                    "real digits name the samples; plot them and the loss to OUT/diffusion-demo.png. Exit "
                    "status 1 if fewer than --min-acc of the samples are recognised or the loss did not fall. "
                    "Needs pip install 'vssm[demo,diffusion]'.")
    p_diff.add_argument("--steps", type=_positive, default=800, help="training steps (default: 800)")
    p_diff.add_argument("--batch-size", type=_positive, default=64, help="batch size (default: 64)")
    p_diff.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale (default: 3)")
    p_diff.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p_diff.add_argument("--out", default="vssm-demo", help="output folder (default: ./vssm-demo)")
    p_diff.add_argument("--min-acc", type=float, default=0.8,
                        help="fraction of the samples the classifier must recognise (default: 0.8)")
    p_diff.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p_diff.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    device = _device({"info": p_info, "demo": p_demo, "diffusion-demo": p_diff}.get(args.command, parser),
                     args.device)
    if args.command in ("demo", "diffusion-demo"):
        common = dict(batch_size=args.batch_size, device=device, out=args.out, min_acc=args.min_acc, seed=args.seed,
                      progress=not args.no_progress)
        if args.command == "demo":
            from . import demo
            sys.exit(_run_demo(demo.run, models=args.models, epochs=args.epochs, **common))
        from . import diffusion_demo
        sys.exit(_run_demo(diffusion_demo.run, steps=args.steps, cfg_scale=args.cfg_scale, **common))
    sys.exit(0 if info(device, args.quick) else 1)


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


if __name__ == "__main__":
    main()
