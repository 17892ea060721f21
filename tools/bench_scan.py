"""Benchmark the selective scan: vssm's Triton kernels against the PyTorch reference and, where it can be
imported, mamba_ssm's CUDA kernel (``selective_scan_cuda``), at Vim-T and VMamba-T shapes.

    python tools/bench_scan.py                       # bf16, the shapes of the Foundation issue
    python tools/bench_scan.py --json out.json       # also write every number
    python tools/bench_scan.py --sweep               # also time other block sizes of the Triton kernels
    python tools/bench_scan.py --reference           # CPU: the PyTorch reference against a per-position loop

Times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph): GPU time, without Python's launch
overhead, which tools/benchmark.py measures on whole models; the torch reference is timed plainly. "fwd GB/s"
counts each input read once and the output written once. Memory is the peak allocated during forward+backward
above what the inputs already hold.
"""
import argparse
import json
import sys

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from vssm.kernels import cross_merge, cross_scan, cross_selective_scan, selective_scan
from vssm.kernels import triton_scan

try:
    import selective_scan_cuda  # mamba_ssm's extension, built from state-spaces/mamba csrc/selective_scan
except ImportError:
    selective_scan_cuda = None


def timed(fn, graph=True):
    """GPU time in ms: the median of CUDA-graph replays (the kernels' time without Python's launch overhead,
    which would otherwise dominate the small shapes), or of plain launches."""
    if graph:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_mem(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


# ---------------------------------------------------------------------------------------------------------
# Vim: bidirectional scan, batch 128, dim 384, L 197, N 16, gated by z
# ---------------------------------------------------------------------------------------------------------
def vim_inputs(batch, dim, L, N, dtype):
    r = lambda *s: torch.randn(*s, device="cuda")  # noqa: E731
    return dict(u=r(batch, dim, L).to(dtype), delta=(r(batch, dim, L) * 0.5 - 1).to(dtype),
                A=-torch.rand(dim, N, device="cuda") * N, B=r(batch, 1, N, L).to(dtype),
                C=r(batch, 1, N, L).to(dtype), D=r(dim), z=r(batch, dim, L).to(dtype), delta_bias=r(dim) * 0.5)


def vim_channels_last(batch, dim, L, N, dtype):
    """The layout Vim's blocks pass (the stepped kernels' fast one): u and z halves of one (batch, L, 2 dim)
    projection, delta (batch, L, dim), B and C slices of one (batch, L, R + 2N) projection (R = 24), all seen
    as (batch, dim, L) / (batch, N, L) views. Returns the base tensors and the function making the views."""
    r = lambda *s: torch.randn(*s, device="cuda")  # noqa: E731
    bases = dict(xz=r(batch, L, 2 * dim).to(dtype), delta=(r(batch, L, dim) * 0.5 - 1).to(dtype),
                 proj=r(batch, L, 24 + 2 * N).to(dtype), A=-torch.rand(dim, N, device="cuda") * N, D=r(dim),
                 delta_bias=r(dim) * 0.5)

    def views(b):
        u, z = b["xz"].transpose(1, 2).chunk(2, dim=1)
        return dict(u=u, z=z, delta=b["delta"].transpose(1, 2), A=b["A"], D=b["D"], delta_bias=b["delta_bias"],
                    B=b["proj"][..., 24:24 + N].transpose(1, 2), C=b["proj"][..., 24 + N:].transpose(1, 2))
    return bases, views


def leaves(inputs):
    return {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}


def bench_vim(batch, dim, L, N, dtype, rows):
    fwd_dir, bwd_dir = vim_inputs(batch, dim, L, N, dtype), vim_inputs(batch, dim, L, N, dtype)
    dout = torch.randn(batch, dim, L, device="cuda", dtype=dtype)
    io = nbytes(*fwd_dir.values()) + nbytes(dout)
    name = f"Vim b{batch} d{dim} L{L} N{N}"

    def vssm_one(x, reverse=False, backend="triton"):
        return selective_scan(**x, delta_softplus=True, reverse=reverse, backend=backend)

    def fwd_bwd(fn):
        ins = [leaves(fwd_dir), leaves(bwd_dir)]

        def run():
            fn(*ins).backward(dout)
            for x in ins:
                for v in x.values():
                    v.grad = None
        return run

    def flip(x):
        return {k: (v.flip(-1) if v.dim() >= 3 else v) for k, v in x.items()}

    variants = {
        "vssm triton, channels-first, one direction": lambda a, b: vssm_one(a),
        "vssm triton, channels-first, bidirectional (reverse=True)":
            lambda a, b: vssm_one(a) + vssm_one(b, reverse=True),
        "vssm triton, channels-first, bidirectional (flip copies)":
            lambda a, b: vssm_one(a) + vssm_one(flip(b)).flip(-1),
    }
    for label, fn in variants.items():
        with torch.no_grad():
            t_f = timed(lambda: fn(fwd_dir, bwd_dir))
        t_fb = timed(fwd_bwd(fn))
        mem = peak_mem(fwd_bwd(fn))
        dirs = 1 if "one" in label else 2
        rows.append(dict(shape=name, impl=label, fwd_ms=t_f, fwd_bwd_ms=t_fb, mem_mib=mem,
                         fwd_gbs=dirs * io / t_f / 1e6))
    # the same scans on the channels-last views that Vim's blocks pass
    (fwd_bases, views), (bwd_bases, _) = (vim_channels_last(batch, dim, L, N, dtype) for _ in range(2))
    dout_cl = dout.transpose(1, 2).contiguous().transpose(1, 2)
    ins = [leaves(fwd_bases), leaves(bwd_bases)]
    for label, fn in {
            "vssm triton, channels-last views, one direction": lambda a, b: vssm_one(a),
            "vssm triton, channels-last views, bidirectional (reverse=True)":
                lambda a, b: vssm_one(a) + vssm_one(b, reverse=True)}.items():
        def run_cl():
            fn(*[views(x) for x in ins]).backward(dout_cl)
            for x in ins:
                for t in x.values():
                    t.grad = None
        with torch.no_grad():
            t_f = timed(lambda: fn(views(fwd_bases), views(bwd_bases)))
        dirs = 1 if "one" in label else 2
        rows.append(dict(shape=name, impl=label, fwd_ms=t_f, fwd_bwd_ms=timed(run_cl), mem_mib=peak_mem(run_cl),
                         fwd_gbs=dirs * io / t_f / 1e6))
    with torch.no_grad():
        t_ref = timed(lambda: vssm_one(fwd_dir, backend="torch"), graph=False)
    rows.append(dict(shape=name, impl="torch reference, one direction", fwd_ms=t_ref, fwd_gbs=io / t_ref / 1e6))

    if selective_scan_cuda is not None:
        def mamba_fwd(x):
            out, xs, *rest = selective_scan_cuda.fwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                                     x["delta_bias"], True)
            return out, xs, rest

        def mamba_bwd(x, saved, g):
            out, xs, rest = saved
            return selective_scan_cuda.bwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                           x["delta_bias"], g, xs, out, None, True, False)

        def mamba_bidir_fwd():
            # Vim's path with mamba_ssm: flip the backward direction's inputs, scan, flip back
            f = flip(bwd_dir)
            return mamba_fwd(fwd_dir)[-1][0] + mamba_fwd(f)[-1][0].flip(-1)

        def mamba_one_fb():
            s = mamba_fwd(fwd_dir)
            mamba_bwd(fwd_dir, s, dout)

        def mamba_bidir_fb():
            f = flip(bwd_dir)
            s1, s2 = mamba_fwd(fwd_dir), mamba_fwd(f)
            mamba_bwd(fwd_dir, s1, dout)
            g = mamba_bwd(f, s2, dout.flip(-1))
            [t.flip(-1) for t in g[:2]]

        t_f1 = timed(lambda: mamba_fwd(fwd_dir))
        rows.append(dict(shape=name, impl="mamba_ssm CUDA, one direction", fwd_ms=t_f1, fwd_bwd_ms=timed(mamba_one_fb),
                         mem_mib=peak_mem(mamba_one_fb), fwd_gbs=io / t_f1 / 1e6))
        t_f2 = timed(mamba_bidir_fwd)
        rows.append(dict(shape=name, impl="mamba_ssm CUDA, bidirectional (flip copies)", fwd_ms=t_f2,
                         fwd_bwd_ms=timed(mamba_bidir_fb), mem_mib=peak_mem(mamba_bidir_fb),
                         fwd_gbs=2 * io / t_f2 / 1e6))


# ---------------------------------------------------------------------------------------------------------
# VMamba: 4-direction cross-scan, batch 128, dim 192 per direction, 56 x 56, N 1, no z
# ---------------------------------------------------------------------------------------------------------
def vmamba_inputs(batch, dim, H, W, N, dtype, channels_last=False):
    """Cross-scan inputs; channels-last as VMamba's SS2D makes them (x a view of (batch, H, W, dim), delta of
    (batch, H, W, 4, dim), B and C slices of one (batch, H, W, 4 * (2N + R)) projection output, R = 6)."""
    r = lambda *s: torch.randn(*s, device="cuda")  # noqa: E731
    rest = dict(A=-torch.rand(4 * dim, N, device="cuda") - 0.5, D=r(4 * dim), delta_bias=r(4 * dim) * 0.5)
    if not channels_last:
        return dict(x=r(batch, dim, H, W).to(dtype), delta=(r(batch, 4, dim, H, W) * 0.5 - 1).to(dtype),
                    B=r(batch, 4, N, H, W).to(dtype), C=r(batch, 4, N, H, W).to(dtype), **rest)
    proj = r(batch, H, W, 4 * (6 + 2 * N)).to(dtype)
    maps = lambda t: t.permute(0, 3, 4, 1, 2)  # noqa: E731
    return dict(x=r(batch, H, W, dim).to(dtype).permute(0, 3, 1, 2),
                delta=maps((r(batch, H, W, 4, dim) * 0.5 - 1).to(dtype)),
                B=maps(proj[..., 24:24 + 4 * N].view(batch, H, W, 4, N)),
                C=maps(proj[..., 24 + 4 * N:].view(batch, H, W, 4, N)), **rest)


def bench_vmamba(batch, dim, H, W, N, dtype, rows):
    L = H * W
    base = vmamba_inputs(batch, dim, H, W, N, dtype)
    dout = torch.randn(batch, dim, H, W, device="cuda", dtype=torch.float32)
    io = nbytes(*base.values()) + nbytes(dout)
    name = f"VMamba b{batch} 4x d{dim} {H}x{W} N{N}"

    def fused(x):
        return cross_selective_scan(**x, delta_softplus=True, backend="triton")

    def unfused(x, scan=None):
        # cross_scan copies of x (and of each direction's inputs, put in its scan order), one scan, merge
        xs = cross_scan(x["x"], backend="triton").view(batch, 4 * dim, L)
        ds = _orders(x["delta"]).view(batch, 4 * dim, L)
        Bs, Cs = _orders(x["B"]), _orders(x["C"])
        if scan is None:
            ys = selective_scan(xs, ds, x["A"], Bs, Cs, x["D"], None, x["delta_bias"], True, backend="triton")
        else:
            ys = scan(xs, ds, x["A"], Bs, Cs, x["D"], x["delta_bias"])
        return cross_merge(ys.view(batch, 4, dim, H, W), backend="triton").view(batch, dim, H, W)

    def fb(fn):
        ins = leaves(base)

        def run():
            fn(ins).float().backward(dout)
            for v in ins.values():
                v.grad = None
        return run

    for label, fn in {"vssm triton, fused cross-scan": fused,
                      "vssm triton, cross_scan + scan + cross_merge copies": unfused}.items():
        with torch.no_grad():
            t_f = timed(lambda: fn(base))
        rows.append(dict(shape=name, impl=label, fwd_ms=t_f, fwd_bwd_ms=timed(fb(fn)), mem_mib=peak_mem(fb(fn)),
                         fwd_gbs=io / t_f / 1e6))
    # the model's layout: the same scan reading channels-last maps
    cl = vmamba_inputs(batch, dim, H, W, N, dtype, channels_last=True)
    ins = {k: v.detach().requires_grad_() for k, v in cl.items()}  # the views themselves as leaves

    def fb_cl():
        fused(ins).backward(dout)
        for v in ins.values():
            v.grad = None
    with torch.no_grad():
        t_f = timed(lambda: fused(cl))
    rows.append(dict(shape=name, impl="vssm triton, fused cross-scan, channels-last maps", fwd_ms=t_f,
                     fwd_bwd_ms=timed(fb_cl), mem_mib=peak_mem(fb_cl), fwd_gbs=io / t_f / 1e6))
    if selective_scan_cuda is not None:
        class MambaScan(torch.autograd.Function):
            @staticmethod
            def forward(ctx, u, delta, A, B, C, D, bias):
                out, xs, *_ = selective_scan_cuda.fwd(u, delta, A, B, C, D, None, bias, True)
                ctx.save_for_backward(u, delta, A, B, C, D, bias, xs)
                return out

            @staticmethod
            def backward(ctx, g):
                u, delta, A, B, C, D, bias, xs = ctx.saved_tensors
                du, dd, dA, dB, dC, dD, dbias, *_ = selective_scan_cuda.bwd(
                    u, delta, A, B, C, D, None, bias, g.contiguous(), xs, None, None, True, False)
                return du, dd, dA, dB, dC, dD, dbias

        def mamba(x):
            return unfused(x, scan=lambda *a: MambaScan.apply(*[t.contiguous() for t in a]))

        with torch.no_grad():
            t_f = timed(lambda: mamba(base))
        rows.append(dict(shape=name, impl="mamba_ssm CUDA + vssm cross_scan/merge copies", fwd_ms=t_f,
                         fwd_bwd_ms=timed(fb(mamba)), mem_mib=peak_mem(fb(mamba)), fwd_gbs=io / t_f / 1e6))


def _orders(t):
    from vssm.kernels.reference import _to_scan_orders
    return _to_scan_orders(t).contiguous()


# ---------------------------------------------------------------------------------------------------------
def sweep(dtype, parts=("vim", "vmamba")):
    """Time other block sizes: the stepped kernels (BLOCK_D, warps) at Vim shapes, the chunked ones
    ((BLOCK_D, BLOCK_L, warps) of forward and backward) at the VMamba shape. Defaults: each module's _config."""
    from vssm.kernels import triton_step
    results = []

    def record(name, fn, x, cfg):
        out = fn(**x, delta_softplus=True)
        dout = torch.randn(out.shape, device="cuda", dtype=out.dtype)
        ins = leaves(x)

        def run():
            fn(**ins, delta_softplus=True).backward(dout)
            for v in ins.values():
                v.grad = None
        with torch.no_grad():
            t_f = timed(lambda: fn(**x, delta_softplus=True))
        results.append(dict(shape=name, cfg=cfg, fwd_ms=t_f, fwd_bwd_ms=timed(run)))
        print(results[-1], flush=True)

    default_step = triton_step._config
    for batch, L in [(128, 197), (32, 6085)] if "vim" in parts else []:
        x = vim_inputs(batch, 384, L, 16, dtype)
        for bd, w in [(8, 1), (4, 1), (16, 1), (8, 2), (16, 2), (32, 2)]:
            triton_step._config = lambda dim, N, cpg, bd=bd, w=w: dict(
                BLOCK_D=bd, BLOCK_N=triton.next_power_of_2(N), CHUNK=triton_step.CHUNK, num_warps=w)
            record(f"Vim b{batch} d384 L{L} N16 (stepped)", selective_scan, x, (bd, w))
    triton_step._config = default_step

    default_chunked = triton_scan._config
    for channels_last, configs in [] if "vmamba" not in parts else [
            (False, [((2, 512, 4), (4, 256, 4)), ((2, 512, 2), (2, 256, 2)), ((4, 256, 4), (8, 128, 4))]),
            (True, [((32, 16, 2), (16, 16, 1)), ((32, 16, 1), (32, 16, 2)), ((16, 16, 1), (16, 16, 1)),
                    ((32, 8, 1), (32, 8, 1)), ((64, 8, 2), (64, 8, 2)), ((16, 32, 1), (16, 16, 2))])]:
        for dim in (96, 192):
            cross = vmamba_inputs(128, dim, 56, 56, 1, dtype, channels_last)
            for fwd_cfg, bwd_cfg in configs:
                def cfg(dim, N, L, cpg, channels_last=False, backward=False, rows=1, fwd_cfg=fwd_cfg, bwd_cfg=bwd_cfg):
                    bd, bl, w = bwd_cfg if backward else fwd_cfg
                    return dict(BLOCK_D=bd, BLOCK_N=triton.next_power_of_2(N), BLOCK_L=bl,
                                NUM_STAGES=3 if channels_last else 1, num_warps=w)
                triton_scan._config = cfg
                layout = "channels-last" if channels_last else "channels-first"
                record(f"VMamba fused b128 4x{dim} 56x56 N1 {layout}", cross_selective_scan, cross,
                       (fwd_cfg, bwd_cfg))
    triton_scan._config = default_chunked
    return results


def reference_vs_loop():
    """CPU: vssm's PyTorch reference against the per-position loop of mamba_ssm's selective_scan_ref
    (deltaA, deltaB_u precomputed, one step per Python iteration), float32, forward only."""
    import time
    import torch.nn.functional as F
    from vssm.kernels import selective_scan_ref

    def loop(u, delta, A, B, C, D, z, bias):
        delta = F.softplus(delta + bias[:, None])
        G = B.shape[1]
        Bx, Cx = (t.repeat_interleave(u.shape[1] // G, 1) for t in (B, C))
        dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
        dBu = torch.einsum("bdl,bdnl,bdl->bdln", delta, Bx, u)
        x, ys = A.new_zeros(u.shape[0], u.shape[1], A.shape[1]), []
        for i in range(u.shape[2]):
            x = dA[:, :, i] * x + dBu[:, :, i]
            ys.append(torch.einsum("bdn,bdn->bd", x, Cx[:, :, :, i]))
        return (torch.stack(ys, 2) + u * D[:, None]) * F.silu(z)

    print(f"CPU, {torch.get_num_threads()} threads, float32, forward; best of 3, interleaved")
    print("| batch, dim, N, L, groups | per-position loop ms | vssm reference ms | speed-up |\n|---|---|---|---|")
    for (b, d, n, L, G) in [(2, 192, 16, 196, 1), (2, 192, 16, 3136, 1), (8, 384, 16, 197, 1),
                            (2, 192, 1, 3136, 4), (1, 96, 1, 3136, 4)]:
        g = torch.Generator().manual_seed(0)
        x = dict(u=torch.randn(b, d, L, generator=g), delta=torch.randn(b, d, L, generator=g) - 2,
                 A=-torch.arange(1, n + 1.0).repeat(d, 1), B=torch.randn(b, G, n, L, generator=g),
                 C=torch.randn(b, G, n, L, generator=g), D=torch.randn(d, generator=g),
                 z=torch.randn(b, d, L, generator=g), bias=torch.randn(d, generator=g) * 0.5)
        times = [float("inf")] * 2
        ref_args = {k: v for k, v in x.items() if k != "bias"}
        fns = (lambda: loop(**x), lambda: selective_scan_ref(**ref_args, delta_bias=x["bias"], delta_softplus=True))
        for _ in range(3):  # interleaved: this machine class's speed drifts between runs
            for i, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                times[i] = min(times[i], (time.perf_counter() - t0) * 1e3)
        print(f"| {b}, {d}, {n}, {L}, {G} | {times[0]:.0f} | {times[1]:.0f} | {times[0] / times[1]:.1f}x |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--sweep", action="store_true", help="also time other block sizes")
    p.add_argument("--reference", action="store_true", help="CPU: reference against a per-position loop")
    args = p.parse_args(argv)
    if args.reference:
        return reference_vs_loop()
    if not torch.cuda.is_available():
        sys.exit("bench_scan.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"mamba_ssm CUDA kernel: {'yes' if selective_scan_cuda else 'not importable'}", flush=True)
    out = {"device": torch.cuda.get_device_name(), "dtype": args.dtype}
    rows = []
    bench_vim(128, 384, 197, 16, dtype, rows)
    bench_vim(32, 384, 6085, 16, dtype, rows)
    bench_vmamba(128, 192, 56, 56, 1, dtype, rows)
    out["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"\n| shape | implementation | fwd ms | fwd+bwd ms | fwd+bwd extra MiB | fwd GB/s |\n|---|---|---|---|---|---|")
    for r in rows:
        cell = lambda k, f: (f.format(r[k]) if k in r else "-")  # noqa: E731
        print(f"| {r['shape']} | {r['impl']} | {cell('fwd_ms', '{:.3f}')} | {cell('fwd_bwd_ms', '{:.3f}')} | "
              f"{cell('mem_mib', '{:.0f}')} | {cell('fwd_gbs', '{:.0f}')} |")
    if args.sweep:
        out["sweep"] = sweep(dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
