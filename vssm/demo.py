"""`vssm demo`: train a small Vim and a small VMamba on scikit-learn's handwritten digits.

    vssm demo [--models vim vmamba] [--epochs N] [--batch-size B] [--device cuda|cpu] [--out DIR]

The data set is embedded in scikit-learn (`sklearn.datasets.load_digits`: 1797 grey 8x8 images of the
digits 0-9, no download). It is split into train and test sets (stratified, fixed seed), and each model is
created through `timm.create_model` at a reduced size, trained with AdamW and a one-cycle learning rate,
and evaluated on the test set after every epoch. Printed per model: its parameter count, the loss and test
accuracy of every epoch (with a progress bar on a terminal), the final test accuracy, and the training and
inference throughput; the loss and test-accuracy curves of all models are written to ``<out>/curves.png``.
`vssm demo` exits with status 1 when a model ends below ``--min-acc`` (95% by default), so CI catches a broken model.

On the CPU the models run the exact float64 reference scan, so the models and their sequences are kept
short: Vim reads the 8x8 digit as a 4x4 grid of 2x2 patches (16 tokens + the class token; its head averages
the patch tokens), VMamba reads it upsampled to 32x32 (an 8x8 map after its stride-4 stem, 4x4 in its second
stage).
"""
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# name -> (timm model name, reduced-size keyword arguments, input side in pixels)
MODELS = {
    "vim": ("vim_tiny_patch16_224",
            dict(img_size=8, patch_size=2, stride=2, embed_dim=64, depth=2, d_state=8, global_pool="avg"), 8),
    "vmamba": ("vmamba_tiny", dict(depths=(2, 2), dims=32), 32),
}
MIN_ACC = 0.95


class MissingExtras(RuntimeError):
    """scikit-learn or matplotlib is not installed."""


def require_extras():
    """Import the demo's optional dependencies, or raise MissingExtras saying how to install them."""
    missing = []
    for module, package in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingExtras(f"vssm demo needs {' and '.join(missing)}: pip install 'vssm[demo]'")


@dataclass
class Digits:
    """The split data set: images (n, 1, 8, 8) float32, standardised with the training set's statistics."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(test_size=0.2, seed=0):
    """scikit-learn's digits, split stratified by class with a fixed seed."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_size,
                                           stratify=data.target, random_state=seed)
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def resize(x, side):
    """(n, 1, 8, 8) images to (n, 1, side, side), bilinear."""
    return x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


def create_model(name, seed=0):
    """One demo model through timm (a fixed seed for its initial weights); returns (model, input side)."""
    import timm

    import vssm  # noqa: F401  (registers the models with timm)

    arch, kwargs, side = MODELS[name]
    torch.manual_seed(seed)
    return timm.create_model(arch, in_chans=1, num_classes=10, **kwargs), side


def describe(name):
    """The timm.create_model call of a demo model, as text."""
    arch, kwargs, side = MODELS[name]
    return f"timm.create_model({arch!r}, {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}, in_chans=1, num_classes=10)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(model, x, y, optimizer, scheduler, batch_size, generator, desc=None):
    """One epoch over (x, y) in shuffled batches, with a progress bar labelled desc on a terminal (none
    without desc); returns (mean loss, seconds)."""
    from tqdm.auto import tqdm

    model.train()
    order = torch.randperm(len(y), generator=generator).to(x.device)
    total, t0 = 0.0, time.perf_counter()
    with tqdm(total=len(y), desc=desc, unit="img", leave=False, disable=None if desc else True) as bar:
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
            bar.update(len(batch))
            bar.set_postfix(loss=f"{loss.item():.3f}")
    _sync(x.device)
    return total / len(y), time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, x, y, batch_size):
    """Test accuracy and seconds of the inference over (x, y)."""
    model.eval()
    _sync(x.device)
    t0 = time.perf_counter()
    correct = 0
    for start in range(0, len(y), batch_size):
        correct += (model(x[start:start + batch_size]).argmax(-1) == y[start:start + batch_size]).sum().item()
    _sync(x.device)
    return correct / len(y), time.perf_counter() - t0


@dataclass
class Result:
    name: str
    params: int
    side: int
    losses: list = field(default_factory=list)
    accs: list = field(default_factory=list)
    train_s: float = 0.0
    train_imgs: int = 0
    infer_s: float = 0.0
    infer_imgs: int = 0

    @property
    def acc(self):
        return self.accs[-1]

    @property
    def train_ips(self):
        return self.train_imgs / self.train_s

    @property
    def infer_ips(self):
        return self.infer_imgs / self.infer_s


def train_model(name, data, epochs, batch_size, device, lr=3e-3, weight_decay=0.05, seed=0, progress=True):
    """Create, train and evaluate one model; prints a line per epoch and returns its Result."""
    model, side = create_model(name, seed)
    model.to(device)
    x_train, x_test = (resize(x, side).to(device) for x in (data.x_train, data.x_test))
    y_train, y_test = data.y_train.to(device), data.y_test.to(device)
    result = Result(name, sum(p.numel() for p in model.parameters()), side)
    print(f"\n{name}: {describe(name)}\n  {result.params:,} parameters, input {side}x{side}", flush=True)

    steps = epochs * -(-len(y_train) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    evaluate(model, x_test[:batch_size], y_test[:batch_size], batch_size)  # warm-up, not timed
    for epoch in range(1, epochs + 1):
        desc = f"  {name} epoch {epoch}/{epochs}" if progress else None
        loss, seconds = train_epoch(model, x_train, y_train, optimizer, scheduler, batch_size, generator, desc)
        acc, infer_s = evaluate(model, x_test, y_test, batch_size)
        result.losses.append(loss)
        result.accs.append(acc)
        result.train_s += seconds
        result.train_imgs += len(y_train)
        result.infer_s += infer_s
        result.infer_imgs += len(y_test)
        print(f"  epoch {epoch:>2}/{epochs}  loss {loss:.4f}  test acc {100 * acc:6.2f}%  ({seconds:.1f} s)",
              flush=True)
    return result


def plot(results, path):
    """Training loss and test accuracy per epoch of every model, side by side, to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = range(1, len(r.losses) + 1)
        ax_loss.plot(epochs, r.losses, marker="o", label=r.name)
        ax_acc.plot(epochs, [100 * a for a in r.accs], marker="o", label=r.name)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("vssm demo: scikit-learn digits")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary(results, min_acc):
    """The final table; returns its lines."""
    lines = [f"{'model':<8}{'params':>9}{'input':>7}{'epochs':>7}{'loss':>8}{'test acc':>10}"
             f"{'train img/s':>13}{'infer img/s':>13}{'train s':>9}"]
    for r in results:
        flag = "" if r.acc >= min_acc else f"   BELOW {100 * min_acc:g}%"
        lines.append(f"{r.name:<8}{r.params:>9,}{f'{r.side}x{r.side}':>7}{len(r.losses):>7}{r.losses[-1]:>8.4f}"
                     f"{100 * r.acc:>9.2f}%{r.train_ips:>13.0f}{r.infer_ips:>13.0f}{r.train_s:>9.1f}{flag}")
    return lines


def run(models=("vim", "vmamba"), epochs=10, batch_size=64, device="cpu", out="vssm-demo", min_acc=MIN_ACC,
        seed=0, progress=True):
    """The whole demo; returns (results, passed)."""
    require_extras()
    device = torch.device(device)
    data = load_digits(seed=seed)
    where = {"cpu": f", {torch.get_num_threads()} CPU threads",
             "cuda": f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else ''})"}
    print(f"vssm demo: scikit-learn digits, {len(data.y_train)} train / {len(data.y_test)} test images "
          f"(8x8 grey, stratified split, seed {seed}); device {device}{where.get(device.type, '')}")
    results = [train_model(name, data, epochs, batch_size, device, seed=seed, progress=progress)
               for name in dict.fromkeys(models)]
    path = plot(results, Path(out) / "curves.png")
    print("\n" + "\n".join(summary(results, min_acc)))
    print(f"\nplot: {path}")
    below = [r.name for r in results if r.acc < min_acc]
    if below:
        print(f"demo FAILED: test accuracy below {100 * min_acc:g}% for {', '.join(below)}")
    else:
        print(f"demo passed: test accuracy >= {100 * min_acc:g}% for every model")
    return results, not below
