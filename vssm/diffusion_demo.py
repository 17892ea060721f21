"""`vssm diffusion-demo`: a small DiffuSSM learns scikit-learn's handwritten digits, in pixel space.

    vssm diffusion-demo [--steps N] [--batch-size B] [--cfg-scale S] [--device cuda|cpu] [--out DIR]

The proof that the diffusion model and its recipe learn, offline and on the CPU in minutes:

1. data: the 1797 grey 8x8 digits embedded in scikit-learn (values 0..16, scaled to [-1, 1]);
2. training: ``timm.create_model("diffussm_tiny_8", ...)`` at the size of ``MODEL``, class-conditional,
   with `vssm.diffusion.train_step` (DiT's recipe: the noise MSE plus the variational bound for the learned
   variance, on the 1000-step linear schedule, 10% label dropout for guidance, EMA), AdamW at a constant
   learning rate after a short warm-up;
3. sampling: ``samples_per_class`` digits of every class from the EMA weights by DDIM (clipped to the
   pixel range) with classifier-free guidance;
4. judging: an RBF support-vector classifier (scikit-learn's SVC) trained on the real digits of a
   stratified split (its accuracy on the held-out real digits is printed, about 99%) names the class of
   every sample. The demo passes when it recognises at least ``min_acc`` of the samples (80% by default,
   chance is 10%) and the training loss has fallen (the mean of the last tenth of the steps below the first
   tenth).

Writes ``<out>/diffusion-demo.png``: the samples, one row per class, and the loss curve.
"""
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch

from .demo import MissingExtras, require_extras

# the reduced DiffuSSM of the demo (diffussm_tiny_8's layout, fewer states for the CPU)
MODEL = dict(hidden_size=64, depth=4, d_state=4)
MIN_ACC = 0.8


def load_digits():
    """All of scikit-learn's digits: images (1797, 1, 8, 8) in [-1, 1] and labels (1797,)."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    return torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8 - 1, torch.tensor(data.target)


def train_judge(images, labels, seed=0):
    """An SVC on the real digits' pixels (train split); returns (classifier, accuracy on the held-out split)."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    x = images.flatten(1).numpy()
    x_train, x_test, y_train, y_test = train_test_split(x, labels.numpy(), test_size=0.25, stratify=labels.numpy(),
                                                        random_state=seed)
    judge = SVC(gamma="scale").fit(x_train, y_train)
    return judge, float(judge.score(x_test, y_test))


@dataclass
class Result:
    params: int
    losses: list
    train_s: float
    judge_acc: float
    recognised: float
    per_class: list
    samples: torch.Tensor
    labels: torch.Tensor

    @property
    def first_and_last_loss(self):
        """The mean training loss of the first and of the last tenth of the steps."""
        tenth = max(1, len(self.losses) // 10)
        return sum(self.losses[:tenth]) / tenth, sum(self.losses[-tenth:]) / tenth

    @property
    def loss_fell(self):
        first, last = self.first_and_last_loss
        return last < first


def train(model, ema, images, labels, steps, batch_size, lr, device, seed, progress):
    """`steps` training steps on random batches; returns the loss of every step."""
    from tqdm.auto import tqdm

    from .diffusion import make_scheduler, train_step

    scheduler = make_scheduler("ddpm", learn_sigma=model.learn_sigma)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50))
    generator = torch.Generator().manual_seed(seed)
    images, labels = images.to(device), labels.to(device)
    losses = []
    model.train()
    with tqdm(total=steps, desc="  training", unit="step", leave=False, disable=None if progress else True) as bar:
        for step in range(steps):
            idx = torch.randint(0, len(labels), (batch_size,), generator=generator).to(device)
            terms = train_step(model, ema, optimizer, images[idx], labels[idx], scheduler,
                               ema_decay=min(0.995, (1 + step) / (10 + step)))
            warmup.step()
            losses.append(terms["loss"].item())
            bar.update()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    return losses


def plot(result, path):
    """The samples (a row per class) and the training loss, side by side, to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cls = int(result.labels.max()) + 1
    per = len(result.labels) // n_cls
    grid = result.samples.view(per, n_cls, 8, 8).transpose(0, 1)  # (class, sample, 8, 8)
    grid = torch.nn.functional.pad(grid, (1, 1, 1, 1), value=-1).permute(0, 2, 1, 3).reshape(n_cls * 10, per * 10)
    fig, (ax_img, ax_loss) = plt.subplots(1, 2, figsize=(11, 5))
    ax_img.imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1)
    ax_img.set(title=f"samples (rows: classes 0-9), {100 * result.recognised:.0f}% recognised",
               xticks=[], yticks=[])
    window = max(1, len(result.losses) // 50)
    smooth = torch.tensor(result.losses).unfold(0, window, window).mean(1)
    ax_loss.plot(range(window, window * len(smooth) + 1, window), smooth.numpy())
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss (mean over windows)", yscale="log")
    ax_loss.grid(alpha=0.3)
    fig.suptitle("vssm diffusion-demo: DiffuSSM on scikit-learn digits")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(steps=800, batch_size=64, lr=3e-3, samples_per_class=10, sample_steps=50, cfg_scale=3.0, device="cpu",
        out="vssm-demo", min_acc=MIN_ACC, seed=0, progress=True):
    """The whole demo; returns (Result, passed)."""
    import timm

    import vssm  # noqa: F401  (registers the models with timm)

    from .diffusion import make_scheduler, sample

    require_extras()
    try:
        import diffusers  # noqa: F401  (the schedulers)
    except ImportError:
        raise MissingExtras("vssm diffusion-demo needs diffusers: pip install 'vssm[diffusion]'") from None
    device = torch.device(device)
    images, labels = load_digits()
    judge, judge_acc = train_judge(images, labels, seed)
    torch.manual_seed(seed)
    model = timm.create_model("diffussm_tiny_8", **MODEL).to(device)
    ema = deepcopy(model).requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    print(f"vssm diffusion-demo: {len(labels)} scikit-learn digits (8x8 grey, pixel space), device {device}\n"
          f"  model: timm.create_model('diffussm_tiny_8', {', '.join(f'{k}={v}' for k, v in MODEL.items())}), "
          f"{params:,} parameters\n"
          f"  judge: SVC on the real digits, {100 * judge_acc:.1f}% on held-out real digits", flush=True)

    t0 = time.perf_counter()
    losses = train(model, ema, images, labels, steps, batch_size, lr, device, seed, progress)
    train_s = time.perf_counter() - t0

    ema.eval()
    wanted = torch.arange(10).repeat(samples_per_class)
    samples = sample(ema, make_scheduler("ddim", learn_sigma=ema.learn_sigma, clip_sample=True), wanted,
                     (1, 8, 8), sample_steps, cfg_scale, generator=torch.Generator().manual_seed(seed))
    samples = samples.clamp(-1, 1).cpu()
    named = torch.as_tensor(judge.predict(samples.flatten(1).numpy()))
    hits = named == wanted
    per_class = [hits[wanted == c].float().mean().item() for c in range(10)]
    result = Result(params, losses, train_s, judge_acc, hits.float().mean().item(), per_class, samples, wanted)
    first, last = result.first_and_last_loss
    print(f"  trained {steps} steps of batch {batch_size} in {train_s:.0f} s: loss {first:.4f} (first tenth) -> "
          f"{last:.4f} (last tenth)")
    path = plot(result, Path(out) / "diffusion-demo.png")
    print(f"  {len(wanted)} samples (DDIM {sample_steps} steps, cfg scale {cfg_scale}): the judge recognises "
          f"{100 * result.recognised:.0f}% (per class: {' '.join(f'{100 * a:.0f}' for a in per_class)})\n"
          f"  plot: {path}")
    passed = result.recognised >= min_acc and result.loss_fell
    if passed:
        print(f"diffusion demo passed: >= {100 * min_acc:g}% of the samples recognised, the loss fell")
    else:
        why = [f"{100 * result.recognised:.0f}% recognised < {100 * min_acc:g}%"] * (result.recognised < min_acc)
        why += ["the loss did not fall"] * (not result.loss_fell)
        print(f"diffusion demo FAILED: {'; '.join(why)}")
    return result, passed
