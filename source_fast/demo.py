"""The embedded demo: SOURCE on a briefly trained digits MLP with flipped labels.

1. Train an MLP (64→64→10) on scikit-learn's bundled 8×8 digits (no download) for a few epochs with
   SGD + momentum and a decaying learning rate, 15 % of training labels flipped; save 6 evenly
   spaced checkpoints (files) and the per-step learning rates.
2. Run SOURCE with 3 segments (2 checkpoints each) and score a handful of test digits.
3. Print each query's top proponents and opponents (label, flipped?, score), how often flipped
   labels appear among the strongest opponents, and write a PNG figure.
"""
from __future__ import annotations

import io as _io
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

from . import io
from .analyzer import SourceAnalyzer
from .run import TrainingRun
from .task import Task, sample_labels


class DigitsTask(Task):
    """Summed cross-entropy; the measurement is the query's loss (τ > 0: the example helped it)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = sample_labels(logits)
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_train_loss_pair(self, batch, model):
        """Both training losses from one forward (sampled labels drawn as above), so that scoring
        without a prior fit() makes one pass per checkpoint."""
        x, y = batch
        logits = model(x)
        with torch.no_grad():
            sampled = sample_labels(logits)
        return F.cross_entropy(logits, sampled, reduction="sum"), F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def load_digits_data(flip_fraction: float, seed: int):
    """Train/test split of sklearn's digits, inputs scaled to [0, 1]; flips a fraction of train labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    train_idx, test_idx = perm[:1400], perm[1400:]
    y_train = y[train_idx].clone()
    flipped = torch.zeros(len(train_idx), dtype=torch.bool)
    flip = torch.randperm(len(train_idx), generator=gen)[: int(flip_fraction * len(train_idx))]
    y_train[flip] = (y_train[flip] + torch.randint(1, 10, (len(flip),), generator=gen)) % 10
    flipped[flip] = True
    return (x[train_idx], y_train, y[train_idx], flipped), (x[test_idx], y[test_idx])


def train(model, x, y, *, epochs, batch_size, lr, momentum, num_checkpoints, out_dir: Path, seed: int):
    """SGD + momentum with a linearly decaying lr; returns checkpoint paths, steps and per-step lrs."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    schedule = [lr * (1.0 - 0.5 * k / total) for k in range(total)]
    save_at = {round(total * (j + 1) / num_checkpoints) for j in range(num_checkpoints)}
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    paths, steps, step = [], [], 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            for group in opt.param_groups:
                group["lr"] = schedule[step]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if step in save_at:
                path = out_dir / "checkpoints" / f"step_{step:05d}.pt"
                buffer = _io.BytesIO()
                torch.save(model.state_dict(), buffer)
                io.atomic_write_bytes(path, buffer.getvalue())
                paths.append(str(path))
                steps.append(step)
    return paths, steps, schedule


def run_demo(output_dir: str = "demo_output", *, num_queries: int = 6, top_k: int = 3, epochs: int = 4,
             seed: int = 0, plot: bool = True, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    out = Path(output_dir)
    (x_tr, y_tr, y_clean, flipped), (x_te, y_te) = load_digits_data(flip_fraction=0.15, seed=seed)
    model = make_model()
    print(f"[1/3] training a 64-64-10 MLP on {len(x_tr)} digits ({int(flipped.sum())} labels flipped), "
          f"{epochs} epochs of SGD (momentum 0.9)")
    paths, steps, lrs = train(model, x_tr, y_tr, epochs=epochs, batch_size=32, lr=0.05, momentum=0.9,
                              num_checkpoints=6, out_dir=out, seed=seed)
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    print(f"      test accuracy {acc:.3f} (briefly trained, not converged); checkpoints at steps {steps}")

    train_ds, test_ds = TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te)
    queries = Subset(test_ds, list(range(num_queries)))
    run = TrainingRun(paths, steps, lr=lrs, momentum=0.9, num_segments=3)
    print("[2/3] SOURCE, 3 segments × 2 checkpoints")
    print("      " + run.describe().replace("\n", "\n      "))
    analyzer = SourceAnalyzer(model, DigitsTask(), run, output_dir=out / "source", batch_size=128,
                              progress=progress)
    # No separate fit(): the curvature and the scored gradients then share one pass per checkpoint.
    scores = analyzer.pairwise_scores(queries, train_ds)

    print(f"[3/3] top {top_k} proponents (τ > 0: removing them would raise the query's loss) and opponents")
    summary = {"test_accuracy": acc, "queries": []}
    for q in range(num_queries):
        order = torch.argsort(scores[q], descending=True)
        pro, opp = order[:top_k].tolist(), order.flip(0)[:top_k].tolist()
        fmt = lambda i: (f"#{i:4d} label {int(y_tr[i])}{'*' if flipped[i] else ' '} "  # noqa: E731
                         f"τ={scores[q, i].item():+.2e}")
        print(f"  query {q} (label {int(y_te[q])}):")
        print("     proponents: " + " | ".join(fmt(i) for i in pro))
        print("     opponents:  " + " | ".join(fmt(i) for i in opp))
        summary["queries"].append({"label": int(y_te[q]), "proponents": pro, "opponents": opp})
    k = 20
    opp_all = torch.argsort(scores, dim=1)[:, :k]
    pro_all = torch.argsort(scores, dim=1, descending=True)[:, :k]
    rate_opp = flipped[opp_all].float().mean().item()
    rate_pro = flipped[pro_all].float().mean().item()
    print(f"  (* = flipped label) flipped labels among each query's {k} strongest opponents: {rate_opp:.0%}, "
          f"among proponents: {rate_pro:.0%}, base rate {flipped.float().mean().item():.0%}")
    summary.update(flipped_rate_opponents=rate_opp, flipped_rate_proponents=rate_pro)
    if plot:
        figure = out / "source_demo.png"
        _plot(figure, x_tr, y_tr, flipped, x_te, y_te, scores, top_k)
        print(f"  figure written to {figure}")
        summary["figure"] = str(figure)
    summary["seconds"] = time.perf_counter() - t0
    io.atomic_write_json(out / "summary.json", summary)
    print(f"done in {summary['seconds']:.1f} s; results in {out}/")
    return summary


def _plot(path, x_tr, y_tr, flipped, x_te, y_te, scores, top_k):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nq = scores.shape[0]
    cols = 1 + 2 * top_k
    fig, axes = plt.subplots(nq, cols, figsize=(1.6 * cols, 1.8 * nq), squeeze=False)
    for q in range(nq):
        order = torch.argsort(scores[q], descending=True).tolist()
        panels = [("query", x_te[q], f"query\nlabel {int(y_te[q])}", "black")]
        panels += [("pro", x_tr[i], f"+{scores[q, i].item():.1e}\nlabel {int(y_tr[i])}{'*' if flipped[i] else ''}",
                    "tab:green") for i in order[:top_k]]
        panels += [("opp", x_tr[i], f"{scores[q, i].item():.1e}\nlabel {int(y_tr[i])}{'*' if flipped[i] else ''}",
                    "tab:red") for i in order[::-1][:top_k]]
        for ax, (_, img, title, color) in zip(axes[q], panels):
            ax.imshow(img.reshape(8, 8).numpy(), cmap="gray_r")
            ax.set_title(title, fontsize=7, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("SOURCE on digits: query | top proponents (green) | top opponents (red); * = flipped label",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    io.atomic_write_bytes(path, buffer.getvalue())


def main_json(summary: dict) -> str:
    return json.dumps(summary, indent=2)
