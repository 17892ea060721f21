"""Where the N = 1 fused cross-scan (VMamba's SS2D) spends its time: timed variants of kernels/triton_scan.py.

    python tools/scan_anatomy.py        # CUDA only; numbers in BENCHMARKS.md

A diagnostic for kernel work, not a benchmark of vssm: it writes edited copies of the kernel module to /tmp
and times them at VMamba-T's stage-1 shape (batch 128, 96 and 192 channels per direction, 56x56, N = 1,
bf16): the kernel as it is; with the column-major directions read in row-major order (wrong results: the
cost of the strided column reads); without the per-chunk carry extraction (wrong results: its cost); other
forward block sizes; and the plain chunked scan over contiguous (batch, 4 * dim, L) sequences (the same
bytes with no cross orders and no merge), against the bytes moved at 3 TB/s.
"""
import importlib.util
from pathlib import Path

import torch
from triton.testing import do_bench

def inputs(batch=128, dim=96, H=56, W=56, N=1):
    g = torch.Generator(device="cuda").manual_seed(0)
    L = H * W
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    u = r(batch, dim, L).bfloat16()
    delta = (r(batch, 4 * dim, L) * 0.5 - 1).bfloat16()
    A = -torch.rand(4 * dim, N, device="cuda") - 0.5
    B = r(batch, 4, N, L).bfloat16(); C = r(batch, 4, N, L).bfloat16()
    D = torch.ones(4 * dim, device="cuda"); bias = torch.rand(4 * dim, device="cuda") * 0.1
    return u, delta, A, B, C, D, None, bias, (H, W)


def main():
    src = (Path(__file__).resolve().parents[1] / "kernels" / "triton_scan.py").read_text()
    col = "        if k % 2 == 1:\n            t = (t % H) * W + t // H"
    assert col in src
    red = "            h = tl.sum(tl.where(s[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)"
    assert red in src
    variants = {
        "current": src,
        "row-major only (wrong result)": src.replace(col, "        if k % 2 == 7:\n            t = (t % H) * W + t // H"),
        "no carry extraction (wrong)": src.replace(red, "            h = h * 0.5"),
    }
    mods = {}
    for i, (name, text) in enumerate(variants.items()):
        path = f"/tmp/scan_variant_{i}.py"
        open(path, "w").write(text)
        spec = importlib.util.spec_from_file_location(f"scan_variant_{i}", path)
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); mods[name] = m
    for shape in [dict(), dict(dim=192)]:
        u, delta, A, B, C, D, z, bias, hw = inputs(**shape)
        print("shape", shape or "VMamba-T stage 1 (b128 d96 56x56)")
        for name, m in mods.items():
            f = lambda: m.scan_fwd(u, delta, A, B, C, D, z, bias, True, False, hw, out_dtype=torch.float32)
            out = f()[0]
            dout = torch.randn_like(out)
            b = lambda: m.scan_bwd(dout, None, u, delta, A, B, C, D, z, bias, True, False, hw)
            print(f"  {name:32s} fwd {do_bench(f):7.3f} ms   bwd {do_bench(b):7.3f} ms", flush=True)
        m = mods["current"]
        orig = m._config
        for bd, bl, w in [(1, 512, 4), (2, 256, 4), (2, 1024, 4), (4, 512, 4), (2, 512, 8), (2, 512, 2), (1, 1024, 4), (1, 2048, 8)]:
            m._config = lambda dim, N, L, cpg, backward=False, bd=bd, bl=bl, w=w: dict(BLOCK_D=bd, BLOCK_N=1, BLOCK_L=bl, num_warps=w) if not backward else orig(dim, N, L, cpg, True)
            f = lambda: m.scan_fwd(u, delta, A, B, C, D, z, bias, True, False, hw, out_dtype=torch.float32)
            print(f"  fwd config BLOCK_D {bd} BLOCK_L {bl} warps {w}: {do_bench(f):7.3f} ms", flush=True)
        m._config = orig
        # plain contiguous grouped scan over (B, 4*dim, L), the same bytes without the cross orders
        u4 = u.repeat(1, 4, 1)
        f = lambda: m.scan_fwd(u4, delta, A, B, C, D, z, bias, True, False, None, out_dtype=torch.float32)
        print(f"  plain grouped scan (B, 4*dim, L), contiguous: fwd {do_bench(f):7.3f} ms", flush=True)
        nbytes = u.numel() * 2 + delta.numel() * 2 + B.numel() * 4 + u.numel() * 4
        print(f"  bytes in+out {nbytes / 1e6:.0f} MB -> at 3 TB/s {nbytes / 3e9:.3f} ms")


if __name__ == "__main__":
    main()
