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


def attention_mask(task: Any, batch: Any) -> torch.Tensor | None:
    getter = getattr(task, "get_attention_mask", None)
    return getter(batch) if callable(getter) else None
