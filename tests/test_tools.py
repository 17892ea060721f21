"""The command-line tools on tiny inputs (CPU)."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest

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
