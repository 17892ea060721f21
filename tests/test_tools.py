"""The command-line tools on tiny inputs (CPU)."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vssm.kernels import selective_scan

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_cli_on_cpu(tmp_path, capsys):
    benchmark = load_tool("benchmark")
    out = tmp_path / "bench"
    rows = benchmark.main([
        "--models", "vim_tiny_patch16_224", "vmamba_tiny", "--device", "cpu", "--img-size", "32", "48",
        "--batch-size", "2", "--mode", "infer", "train", "--train-img-size", "32", "--warmup", "0", "--iters", "1",
        "--model-kwargs", '{"num_classes": 4, "depth": 1, "embed_dim": 16}',
        "--json", str(out / "rows.json"), "--csv", str(out / "rows.csv"), "--plot", str(out / "plot.png")])
    # Vim takes the reduced kwargs; VMamba has no `depth`/`embed_dim` arguments: its rows record the error
    vim = [r for r in rows if r["model"] == "vim_tiny_patch16_224"]
    assert [(r["mode"], r["img_size"]) for r in vim] == [("infer", 32), ("infer", 48), ("train", 32)]
    assert all(r["img_per_s"] > 0 and r["ms_per_iter"] > 0 and r["peak_mib"] is None for r in vim)
    assert all(r["params_m"] < 0.1 for r in vim)  # the reduced model, not Vim-T's 7M
    vmamba = [r for r in rows if r["model"] == "vmamba_tiny"]
    assert len(vmamba) == 3 and all("depth" in r["error"] or "embed_dim" in r["error"] for r in vmamba)
    assert json.loads((out / "rows.json").read_text()) == rows
    with open(out / "rows.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "vim_tiny_patch16_224" in printed and "failed" in printed


def test_benchmark_cli_rejects_mismatched_batch_sizes():
    benchmark = load_tool("benchmark")
    with pytest.raises(SystemExit):
        benchmark.main(["--models", "vim_tiny_patch16_224", "--device", "cpu", "--img-size", "32", "48", "64",
                        "--batch-size", "1", "2"])


def test_benchmark_cli_cuda_graph_needs_cuda(capsys):
    benchmark = load_tool("benchmark")
    with pytest.raises(SystemExit):
        benchmark.main(["--models", "vim_tiny_patch16_224", "--cuda-graph", "--device", "cpu"])
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_benchmark_cli_compile_mode(monkeypatch, capsys):
    """--compile alone compiles in torch's default mode, --compile MODE in that mode; unknown modes are refused."""
    benchmark = load_tool("benchmark")
    modes = []
    monkeypatch.setattr(benchmark.torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    args = ["--models", "vim_tiny_patch16_224", "--device", "cpu", "--img-size", "32", "--batch-size", "1",
            "--mode", "infer", "--warmup", "0", "--iters", "1", "--model-kwargs", '{"depth": 1, "embed_dim": 16}']
    benchmark.main(args + ["--compile"])
    benchmark.main(args + ["--compile", "reduce-overhead"])
    benchmark.main(args)
    assert modes == ["default", "reduce-overhead"]
    with pytest.raises(SystemExit):
        benchmark.main(args + ["--compile", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


class _ConvNormScan(torch.nn.Module):
    """A 3x3 conv (3 -> 4 channels), a LayerNorm over the channels and one selective scan over the map."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = torch.nn.LayerNorm(4)
        self.A = torch.nn.Parameter(-torch.rand(4, 5) - 0.5)

    def forward(self, x):
        x = self.conv(x)                                        # (1, 4, 8, 8)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).flatten(2)  # (1, 4, 64)
        B = C = x[:, :1].repeat(1, 5, 1)                        # (1, N=5, 64)
        return selective_scan(x, x.sigmoid(), self.A, B, C, D=torch.ones(4), z=x)


def test_flops_of_a_known_layer_by_hand():
    flops = load_tool("flops")
    row = flops.count(_ConvNormScan(), img_size=8)
    conv = 4 * 8 * 8 * (3 * 3 * 3)              # multiply-adds: output elements x (in_chans x k x k)
    norm = 5 * (4 * 8 * 8)                      # fvcore's 5 operations per normalised element
    scan = 9 * 1 * 64 * 4 * 5 + 1 * 4 * 64 * 2  # 9 B L D N, + B D L for D and for z
    assert (row["macs"], row["scan_flops"], row["scan_calls"]) == (conv + norm, scan, 1)
    assert row["gflops"] == (conv + norm + scan) / 1e9


def test_flops_cli_matches_the_published_vmamba_tiny(tmp_path):
    flops = load_tool("flops")
    rows = flops.main(["--models", "vmamba_tiny", "--json", str(tmp_path / "f.json")])
    assert abs(rows[0]["gflops"] - 4.9) < 0.05  # the official README's 4.9G (fvcore + the scan rule)
    assert rows[0]["params"] == 30_249_064
    assert json.loads((tmp_path / "f.json").read_text()) == rows


def test_bench_diffusion_cli_on_cpu(tmp_path):
    bench = load_tool("bench_diffusion")
    rows = bench.main(["--models", "diffussm_tiny_8", "dit_s_2", "--device", "cpu", "--latent-size", "8",
                       "--batch-size", "2", "--warmup", "0", "--iters", "1", "--json", str(tmp_path / "rows.json")])
    assert [r["model"] for r in rows] == ["diffussm_tiny_8", "dit_s_2"]
    assert all(r["samples_per_s"] > 0 and r["gflops"] > 0 for r in rows)
    assert json.loads((tmp_path / "rows.json").read_text()) == rows


def test_bench_diffusion_gflops_follow_dits_convention():
    """DiT-S/2 at 256 (32x32 latents) has 6.06 GFLOPs in DiT's table 1; the DiffuSSM count includes its scans."""
    bench = load_tool("bench_diffusion")
    cpu = torch.device("cpu")
    assert bench.gflops(bench.create("dit_s_2", 32, cpu).eval(), 32, cpu) == pytest.approx(6.06, abs=0.02)
    model = bench.create("diffussm_tiny_8", 8, cpu).eval()
    flops = load_tool("flops")
    counter = FlopCounterMode(display=False, custom_mapping=flops._COUNTED)  # the same count without the scans
    with torch.no_grad(), counter:
        model(torch.randn(1, 1, 8, 8), torch.tensor([3]), torch.tensor([1]))
    assert bench.gflops(model, 8, cpu) > counter.get_total_flops() / 2 / 1e9
