"""`vssm demo`: small Vim and VMamba models trained on scikit-learn's digits, at a reduced size."""
import contextlib
import io
import re
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import vssm.models.vim  # noqa: E402
from vssm import demo  # noqa: E402
from vssm.__main__ import main  # noqa: E402

EPOCHS = 4
BOUND = 0.8  # chance is 0.1


def run(*args):
    """`vssm demo ...` on the CPU: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main(["demo", "--device", "cpu", "--no-progress", *args])
    return exit_info.value.code, out.getvalue(), err.getvalue()


def table(out):
    """The final table's rows: model -> dict(params, epochs, loss, acc)."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(\w+)\s+([\d,]+)\s+\d+x\d+\s+(\d+)\s+([\d.]+)\s+([\d.]+)%\s+(\d+)\s+(\d+)", line)
        if m:
            rows[m[1]] = dict(params=int(m[2].replace(",", "")), epochs=int(m[3]), loss=float(m[4]),
                              acc=float(m[5]) / 100, train_ips=int(m[6]), infer_ips=int(m[7]))
    return rows


def epoch_losses(out, model):
    """The per-epoch losses printed in the model's section."""
    section = out.split(f"\n{model}: ")[1].split("\n\n")[0]
    return [float(x) for x in re.findall(r"epoch\s+\d+/\d+\s+loss ([\d.]+)", section)]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo")
    code, out, _ = run("--epochs", str(EPOCHS), "--out", str(out_dir), "--min-acc", str(BOUND))
    return code, out, out_dir


def test_both_models_learn_the_digits(both):
    code, out, _ = both
    rows = table(out)
    assert set(rows) == {"vim", "vmamba"}, out
    for name, row in rows.items():
        assert row["acc"] >= BOUND, (name, out)
        assert row["epochs"] == EPOCHS and row["params"] > 10_000
        assert row["train_ips"] > 0 and row["infer_ips"] > 0
        losses = epoch_losses(out, name)
        assert len(losses) == EPOCHS and losses[-1] < 0.5 * losses[0], (name, losses)
        assert losses[-1] == pytest.approx(row["loss"], abs=1e-4)
    assert code == 0 and "demo passed" in out


def test_curves_png_written(both):
    _, out, out_dir = both
    png = out_dir / "curves.png"
    assert f"plot: {png}" in out
    from matplotlib.image import imread
    image = imread(png)
    assert image.shape[:2] == (400, 1000) and image.std() > 0.05  # a drawn figure, not a blank canvas


def test_shuffled_labels_stay_below_the_bound(monkeypatch, tmp_path):
    """A model that cannot have learnt the digits (training labels permuted) ends near chance: the bound
    catches it and the exit status is 1."""
    real = demo.load_digits

    def shuffled(**kwargs):
        data = real(**kwargs)
        data.y_train = data.y_train[torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(1))]
        return data

    monkeypatch.setattr(demo, "load_digits", shuffled)
    code, out, _ = run("--models", "vmamba", "--epochs", str(EPOCHS), "--out", str(tmp_path), "--min-acc", str(BOUND))
    assert code == 1 and table(out)["vmamba"]["acc"] < 0.3, out
    assert "BELOW 80%" in out and "demo FAILED: test accuracy below 80% for vmamba" in out


def test_vim_with_a_zeroed_scan_stays_below_the_bound(monkeypatch, tmp_path):
    """Vim without its state-space mixing (each direction's conv + scan output zeroed, so no token sees
    another) cannot tell the digits apart beyond what the patch embedding's average gives: below the bound,
    exit status 1."""
    monkeypatch.setattr(vssm.models.vim, "mamba_inner", lambda x, *a, **k: torch.zeros_like(x))
    code, out, _ = run("--models", "vim", "--epochs", str(EPOCHS), "--out", str(tmp_path), "--min-acc", str(BOUND))
    assert code == 1 and table(out)["vim"]["acc"] < BOUND, out


def test_missing_extras_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    code, out, err = run("--out", str(tmp_path))
    assert code == 2 and "scikit-learn" in err and "pip install 'vssm[demo]'" in err
    assert not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--models", "resnet"], ["--device", "nonsense"]])
def test_bad_options_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args])
    assert exit_info.value.code == 2
    assert "usage: vssm demo" in capsys.readouterr().err
