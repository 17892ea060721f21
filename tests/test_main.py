"""`python -m vssm` / `vssm info`: the environment and scan self-check that the README's first command runs
(`vssm` with no subcommand runs it too)."""
import pytest

import vssm.kernels
from vssm.__main__ import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().out


def test_self_check_passes_and_reports(capsys):
    code, out = run(capsys, "info", "--quick", "--device", "cpu")
    assert code == 0
    assert "torch " in out and "device: cpu" in out
    row = next(line for line in out.splitlines() if line.startswith("float32"))
    backend, fwd_err, grad_err = row.split()[1:4]
    assert backend == "torch" and float(fwd_err) < 1e-6 and float(grad_err) < 1e-6
    assert out.rstrip().endswith("self-check passed")


def test_self_check_fails_on_a_wrong_scan(capsys, monkeypatch):
    real = vssm.kernels.selective_scan
    monkeypatch.setattr(vssm.kernels, "selective_scan", lambda *a, **k: real(*a, **k) * 1.01)
    code, out = run(capsys, "--quick", "--device", "cpu")
    assert code == 1
    assert "FAILED" in out


def test_no_subcommand_runs_the_self_check(capsys):
    code, out = run(capsys, "--quick", "--device", "cpu")
    assert code == 0 and out.rstrip().endswith("self-check passed")


def test_help_lists_the_subcommands(capsys):
    code, out = run(capsys, "--help")
    menu = "{info,demo,diffusion-demo}"
    assert code == 0 and menu in out and "diffusion-demo" in out.split(menu, 1)[1]
