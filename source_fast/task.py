"""The Task protocol: how source_fast computes losses and measurements on your batches.

It follows Kronfluence's `Task` protocol, so a `kronfluence.Task` subclass works unchanged:

- ``compute_train_loss(batch, model, sample=False)``: the training loss **summed** over the batch,
  as a negative log-likelihood. With ``sample=True`` the labels are sampled from the model's
  predictive distribution (the true Fisher / GGN, so the curvature is PSD); source_fast seeds
  the RNG around this call. If your optimiser stepped on a rescaled loss (a mean over examples is
  handled by 1/N already; a mean over tokens, or MSE = 2 × Gaussian NLL, is not), tell
  `TrainingRun(loss_scale=...)`.
- ``compute_measurement(batch, model)``: the query measurement f, summed over the batch
  (e.g. the loss, or a margin).
- ``get_influence_tracked_modules()``: optional list of module names to track (default: every
  supported module: nn.Linear, nn.Conv2d, transformers' Conv1D).
- ``get_attention_mask(batch)``: optional ``[batch, tokens]`` mask; masked tokens do not enter the
  activation covariance.
- ``compute_train_loss_pair(batch, model)``: optional (a source_fast extension): the sampled-label and
  the true-label training loss from **one** forward pass, ``(sampled, true)``. With it, a SOURCE run that
  calls ``pairwise_scores`` without a prior ``fit`` takes the training-set gradients it scores against
  from the same forward passes as the curvature (one forward per checkpoint instead of two). Draw the
  labels exactly as ``compute_train_loss(sample=True)`` does: source_fast seeds the RNG around both
  calls the same way, so the fit is bitwise the same whichever method ran.

``sample_labels(logits)`` draws the Fisher's labels quickly (see its docstring).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Task:
    """Base class with the same methods as ``kronfluence.Task``; subclass it and implement the two
    compute methods."""

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        raise NotImplementedError("Task.compute_train_loss(batch, model, sample=False) must be implemented")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError("Task.compute_measurement(batch, model) must be implemented")

    def get_influence_tracked_modules(self) -> list[str] | None:
        return None

    def get_attention_mask(self, batch: Any) -> torch.Tensor | None:
        return None

    # Optional: compute_train_loss_pair(batch, model) -> (sampled_loss, true_loss) from one forward pass.
    # Not defined here on purpose: source_fast uses it only where a task defines it (see the module doc).


def sample_labels(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one label per row from softmax(logits) (for ``compute_train_loss(..., sample=True)``).

    The same distribution as ``torch.multinomial(logits.softmax(-1), 1)``, by a two-level inverse CDF:
    one uniform number per row picks a block of ≈ √C classes by the blocks' cumulative masses, then a
    class inside it. On a CPU (2 threads, 64 × 39 rows of a 1000-way vocabulary) it takes 1.6 ms, against
    47 ms for ``torch.multinomial`` and 6.9 ms for one cumulative sum over all classes, which otherwise
    dominate a true-Fisher pass of a small language model. Returns int64 labels of shape
    ``logits.shape[:-1]``; uses the global RNG (which source_fast seeds) unless `generator`. A class of
    zero probability (logit −inf) is never drawn.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be a tensor [..., classes] with at least one class, got "
                         f"{type(logits).__name__}{tuple(getattr(logits, 'shape', ()))}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    classes = logits.shape[-1]
    x = logits.detach().to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    mass = (x - x.amax(-1, keepdim=True)).exp_()  # unnormalised: only ratios matter
    width = _block_width(classes)
    pad = -classes % width
    if pad:
        mass = torch.nn.functional.pad(mass, (0, pad))  # zero mass: never reached
    blocks = mass.unflatten(-1, (-1, width))  # [..., blocks, width]
    block_cdf = blocks.sum(-1).cumsum_(-1)
    total = block_cdf[..., -1:]
    u = torch.rand(total.shape, dtype=x.dtype, device=x.device, generator=generator) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total: a block with mass
    block = torch.searchsorted(block_cdf, u, right=True)
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp_min(0)), torch.zeros_like(u))
    inner = blocks.gather(-2, block.unsqueeze(-1).expand(*block.shape, width)).squeeze(-2).cumsum_(-1)
    # Rounding can put u − before at or past the block's own total: keep it strictly below, so the class
    # found has inner[j] > inner[j − 1], i.e. positive mass.
    last = inner[..., -1:]
    rest = torch.minimum(u - before, torch.nextafter(last, torch.zeros_like(last)))
    within = torch.searchsorted(inner, rest, right=True)
    return (block * width + within).squeeze(-1)


def _block_width(classes: int) -> int:
    """Classes per block of `sample_labels`: ≈ √C, preferably a divisor of C within a factor 2 of √C (then
    no padded copy of the masses: 1000 → 25, 32000 → 160), else √C with padding (a prime C)."""
    root = max(1, round(classes ** 0.5))
    for width in sorted(range(max(2, root // 2), 2 * root + 1), key=lambda w: abs(w - root)):
        if classes % width == 0:
            return width
    return root


def check_task(task: Any) -> None:
    """Duck-typed check so kronfluence.Task subclasses (and any object with the methods) pass."""
    for method in ("compute_train_loss", "compute_measurement"):
        if not callable(getattr(task, method, None)):
            raise TypeError(
                f"task must implement {method}(...) (Kronfluence Task protocol, see source_fast.Task); "
                f"got {type(task).__name__} without it"
            )


def tracked_module_names(task: Any) -> list[str] | None:
    getter = getattr(task, "get_influence_tracked_modules", None)
    return getter() if callable(getter) else None


def has_loss_pair(task: Any) -> bool:
    """Whether the task defines compute_train_loss_pair (both training losses from one forward)."""
    return callable(getattr(task, "compute_train_loss_pair", None))


def attention_mask(task: Any, batch: Any) -> torch.Tensor | None:
    getter = getattr(task, "get_attention_mask", None)
    return getter(batch) if callable(getter) else None
