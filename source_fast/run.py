"""TrainingRun: what SOURCE needs to know about the training run (SOURCE_MATH.md §2, §4).

Conventions (stated once, used everywhere):
- Updates are numbered k = 0..T−1: θ_{k+1} = θ_k − η_k · (mean-over-batch gradient). A checkpoint
  "at step s" is θ_s (taken after s updates); the last checkpoint is the final model, T = steps[-1].
- ``lr`` gives η_k for update k: a sequence (entry k, length ≥ T), a callable k → η_k, or a float.
- Segment ℓ covers updates [start_ℓ, end_ℓ); its learning-rate mass is c_ℓ = Σ_{k∈ℓ} η_k (the
  actual schedule), divided by (1 − β) for heavy-ball momentum β. Its checkpoints are those with
  step s in (start_ℓ, end_ℓ] (step 0, the initialisation, belongs to the first segment).
- Stages (multi-stage runs): ``stage_boundaries`` are the steps where a new stage starts; segments
  never cross them; ``example_stages[m]`` is the stage whose data set contains training example m.
- Weight decay wd (constant over the run): SGD and Adam add wd·θ to the gradient (an L2 term wd·½‖θ‖² in the
  objective, torch.optim.SGD/Adam's ``weight_decay``); AdamW subtracts η_k·wd·θ_k apart from the preconditioned
  step (torch.optim.AdamW). Either way the dynamics' curvature gains wd I, so a segment's operators are evaluated on
  H̄ + wd I: s = exp(−c (H̄ + wd)) forgets earlier segments faster (docs/DESIGN.md, "Weight decay").
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from .io import load_state_dict

CheckpointLike = "Mapping[str, torch.Tensor] | str | os.PathLike"


def _number(value, what: str, *, positive: bool) -> float:
    """A finite float, > 0 (positive) or >= 0, or a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{what} must be a finite number {'>' if positive else '>='} 0, got {value!r}")
    return float(value)


def _by_parameter(values: Mapping, what: str, *, positive: bool) -> dict[str, float]:
    """A per-parameter mapping checked: names (str) to `_number`s."""
    for key in values:
        if not isinstance(key, str):
            raise TypeError(f"{what}: keys must be parameter names (str), got {key!r}")
    return {key: _number(value, f"{what}[{key!r}]", positive=positive) for key, value in values.items()}


@dataclass(frozen=True)
class Segment:
    index: int
    start: int  # first update index (inclusive)
    end: int  # last update index (exclusive)
    checkpoints: tuple[int, ...]  # indices into TrainingRun.checkpoints
    lr_mass: float  # c_ℓ = Σ η_k over the segment (raw schedule)
    c: float  # effective mass used by the operators: lr_mass / (1 − momentum)
    stage: int
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_steps(self) -> int:
        return self.end - self.start


class TrainingRun:
    """Checkpoints, schedule and segmentation of one training run.

    Args:
        checkpoints: state_dicts or paths, in training order; the last one is the final model. A path is a
            torch.save of a state_dict, a .safetensors file, or a Hugging Face model directory
            (`save_pretrained`, a Trainer's checkpoint-<step>/; tied weights it stores once are filled in).
        steps: global step (number of updates done) at which each checkpoint was taken, strictly
            increasing.
        lr: per-update learning rates (sequence, index k = update k), a callable k -> lr, or a float. A run that
            clipped its gradient norm at `max` took steps of η_k · min(1, max / ‖g_k‖): pass those effective rates
            (`from_hf_trainer` does, from a Trainer's logged norms).
        momentum: heavy-ball momentum β in [0, 1) (0 for plain SGD); operators use c / (1 − β).
        num_segments: number of segments L (checkpoints are grouped evenly, segments aligned to
            stages), or a sequence of interior boundary steps (a new segment starts at each).
        stage_boundaries: multi-stage runs: global steps where a new stage starts.
        example_stages: multi-stage runs: stage index of each training example.
        loss_scale: the optimiser's per-example loss = loss_scale × the task's per-example loss
            (e.g. 2 for MSE trained against a Gaussian-NLL task, 1/tokens for a per-token mean).
        optimizer: "sgd" (default), "adam" or "adamw" (SOURCE_MATH.md §4 approximation; both need
            ``adam_second_moments``; they differ only in how weight decay enters: added to the gradient for
            "adam", decoupled for "adamw").
        adam_second_moments: for "adam"/"adamw": one mapping per checkpoint from parameter name to the
            bias-corrected second moment v̂ (same shape as the parameter).
        adam_eps: Adam's epsilon in the preconditioner 1 / (sqrt(v̂) + eps).
        weight_decay: the optimizer's weight decay wd ≥ 0: one number for every parameter, or a mapping from
            parameter name to its decay (names it lacks: 0), as parameter groups set it (e.g. none on biases).
            It enters SOURCE's operators (methods "source" and "fast_source"; "influence" takes its damping as
            given). A layer whose bias is decayed otherwise than its weight gets the decay's diagonal in its
            eigenbasis (exact when uniform).
        lr_scale: parameters trained at their own learning rate, a constant multiple of `lr` (a head at 10× its
            backbone's rate, layer-wise rate decay): a mapping from parameter name to that ratio (names it lacks:
            1). A tracked layer's operators and TracIn weight take its weight's ratio, c_ℓ → ratio × c_ℓ.
    """

    def __init__(self, checkpoints: Sequence, steps: Sequence[int], lr, momentum: float = 0.0,
                 num_segments: int | Sequence[int] = 3, stage_boundaries: Sequence[int] | None = None,
                 example_stages: Sequence[int] | None = None, *, loss_scale: float = 1.0,
                 optimizer: str = "sgd", adam_second_moments: Sequence[Mapping[str, torch.Tensor]] | None = None,
                 adam_eps: float = 1e-8, weight_decay: float | Mapping[str, float] = 0.0,
                 lr_scale: Mapping[str, float] | None = None):
        if isinstance(checkpoints, (str, os.PathLike, Mapping)) or not isinstance(checkpoints, Sequence):
            raise TypeError(f"checkpoints must be a list of state_dicts or paths, got {type(checkpoints).__name__}")
        if len(checkpoints) == 0:
            raise ValueError("checkpoints must contain at least one checkpoint (the final model), got an empty list")
        for i, ckpt in enumerate(checkpoints):
            if not isinstance(ckpt, (Mapping, str, os.PathLike)):
                raise TypeError(f"checkpoints[{i}] must be a state_dict or a file path, got {type(ckpt).__name__}")
        self.checkpoints = list(checkpoints)
        self.steps = self._check_steps(steps, len(self.checkpoints))
        self.total_steps = self.steps[-1]
        if self.total_steps <= 0:
            raise ValueError(f"steps[-1] (the final model's step) must be > 0, got {self.total_steps}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.lrs = self._check_lr(lr, self.total_steps)
        if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not (
                math.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
        self.loss_scale = float(loss_scale)
        self.stage_boundaries = self._check_stage_boundaries(stage_boundaries, self.total_steps)
        self.num_stages = len(self.stage_boundaries) + 1
        self.example_stages = self._check_example_stages(example_stages, self.num_stages)
        if optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")
        self.optimizer = optimizer
        if self.is_adam:
            if adam_second_moments is None or len(adam_second_moments) != len(self.checkpoints):
                got = None if adam_second_moments is None else len(adam_second_moments)
                raise ValueError(f"optimizer={optimizer!r} needs adam_second_moments with one mapping per checkpoint "
                                 f"({len(self.checkpoints)}), got {got}")
            if not (isinstance(adam_eps, (int, float)) and math.isfinite(adam_eps) and adam_eps > 0):
                raise ValueError(f"adam_eps must be a finite number > 0, got {adam_eps!r}")
        self.adam_second_moments = list(adam_second_moments) if adam_second_moments is not None else None
        self.adam_eps = float(adam_eps)
        self.weight_decay = self._check_weight_decay(weight_decay)
        self.lr_scale = self._check_lr_scale(lr_scale)
        self.segments = self._make_segments(num_segments)

    @property
    def is_adam(self) -> bool:
        """Adam or AdamW: the walk leaves the eigenbasis (elementwise preconditioner, SOURCE_MATH.md §4)."""
        return self.optimizer in ("adam", "adamw")

    def parameter_weight_decay(self, name: str) -> float:
        """The weight decay of parameter `name`."""
        if isinstance(self.weight_decay, float):
            return self.weight_decay
        return self.weight_decay.get(name, 0.0)

    def parameter_lr_scale(self, name: str) -> float:
        """The ratio of parameter `name`'s learning rate to the run's `lr` (1 unless `lr_scale` says otherwise)."""
        return self.lr_scale.get(name, 1.0)

    @property
    def has_lr_scale(self) -> bool:
        return any(v != 1.0 for v in self.lr_scale.values())

    @property
    def has_weight_decay(self) -> bool:
        values = [self.weight_decay] if isinstance(self.weight_decay, float) else self.weight_decay.values()
        return any(v > 0 for v in values)

    # ----------------------------------------------------------------------------------- checks
    @staticmethod
    def _check_lr_scale(lr_scale) -> dict[str, float]:
        if lr_scale is None:
            return {}
        if not isinstance(lr_scale, Mapping):
            raise TypeError(f"lr_scale must be a mapping from parameter name to its learning rate's ratio to lr, got "
                            f"{type(lr_scale).__name__}")
        return _by_parameter(lr_scale, "lr_scale", positive=True)

    @staticmethod
    def _check_weight_decay(weight_decay) -> float | dict[str, float]:
        if isinstance(weight_decay, Mapping):
            return _by_parameter(weight_decay, "weight_decay", positive=False)
        return _number(weight_decay, "weight_decay", positive=False)

    @staticmethod
    def _check_steps(steps, n):
        if not isinstance(steps, Sequence) and not isinstance(steps, (np.ndarray, torch.Tensor)):
            raise TypeError(f"steps must be a sequence of ints, got {type(steps).__name__}")
        steps = [s.item() if hasattr(s, "item") else s for s in steps]
        if len(steps) != n:
            raise ValueError(f"steps must have one entry per checkpoint ({n}), got {len(steps)}")
        for i, s in enumerate(steps):
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
                raise ValueError(f"steps[{i}] must be an integer >= 0, got {s!r}")
        for i in range(1, n):
            if steps[i] <= steps[i - 1]:
                raise ValueError(f"steps must be strictly increasing (training order), got steps[{i - 1}]="
                                 f"{steps[i - 1]} and steps[{i}]={steps[i]}")
        return [int(s) for s in steps]

    @staticmethod
    def _check_lr(lr, total):
        if callable(lr):
            values = [lr(k) for k in range(total)]
        elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
            values = [float(lr)] * total
        elif isinstance(lr, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(lr, (str, bytes)):
            values = [float(x) for x in lr]
            if len(values) < total:
                raise ValueError(f"lr must have at least one entry per update (steps[-1] = {total}), got {len(values)}")
            values = values[:total]
        else:
            raise TypeError(f"lr must be a float, a sequence of per-step floats or a callable, got {type(lr).__name__}")
        for k, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"lr at step {k} must be a finite number >= 0, got {v!r}")
        return np.asarray(values, dtype=np.float64)

    @staticmethod
    def _check_stage_boundaries(bounds, total):
        if bounds is None:
            return []
        bounds = [int(b) for b in bounds]
        for i, b in enumerate(bounds):
            if not 0 < b < total:
                raise ValueError(f"stage_boundaries[{i}] must be a step in (0, {total}), got {b}")
            if i and b <= bounds[i - 1]:
                raise ValueError(f"stage_boundaries must be strictly increasing, got {bounds}")
        return bounds

    @staticmethod
    def _check_example_stages(stages, num_stages):
        if stages is None:
            if num_stages > 1:
                raise ValueError("example_stages is required with stage_boundaries (stage index of each training "
                                 "example)")
            return None
        arr = torch.as_tensor(np.asarray(stages))
        if arr.dim() != 1 or arr.dtype.is_floating_point or arr.dtype == torch.bool:
            raise ValueError(f"example_stages must be a 1-D sequence of integer stage indices, got dtype "
                             f"{arr.dtype} shape {tuple(arr.shape)}")
        if arr.numel() and (int(arr.min()) < 0 or int(arr.max()) >= num_stages):
            raise ValueError(f"example_stages values must be in [0, {num_stages - 1}] ({num_stages} stages), got "
                             f"range [{int(arr.min())}, {int(arr.max())}]")
        return arr.long()

    # ------------------------------------------------------------------------------- segmentation
    def stage_of_step(self, step: int) -> int:
        """Stage of the checkpoint taken at `step` (i.e. of the update step − 1; step 0 → stage 0)."""
        k = max(step - 1, 0)
        return sum(1 for b in self.stage_boundaries if k >= b)

    def _stage_span(self, stage):
        edges = [0, *self.stage_boundaries, self.total_steps]
        return edges[stage], edges[stage + 1]

    def _make_segments(self, num_segments):
        C = len(self.checkpoints)
        if isinstance(num_segments, bool):
            raise TypeError("num_segments must be an int or a sequence of boundary steps, got bool")
        if isinstance(num_segments, (int, np.integer)):
            if num_segments < 1:
                raise ValueError(f"num_segments must be >= 1, got {num_segments}")
            if num_segments > C:
                raise ValueError(f"num_segments ({num_segments}) must not exceed the number of checkpoints ({C}): "
                                 "each segment needs at least one checkpoint")
            if num_segments < self.num_stages:
                raise ValueError(f"num_segments ({num_segments}) must be >= the number of stages "
                                 f"({self.num_stages}): segments never cross a stage boundary")
            bounds = self._default_boundaries(int(num_segments))
        elif isinstance(num_segments, Sequence):
            bounds = [int(b) for b in num_segments]
            for i, b in enumerate(bounds):
                if not 0 < b < self.total_steps or (i and b <= bounds[i - 1]):
                    raise ValueError(f"num_segments as boundaries must be strictly increasing steps in "
                                     f"(0, {self.total_steps}), got {list(num_segments)}")
            missing = [b for b in self.stage_boundaries if b not in bounds]
            if missing:
                raise ValueError(f"segment boundaries {bounds} must include every stage boundary; missing {missing}")
        else:
            raise TypeError(f"num_segments must be an int or a sequence of boundary steps, got "
                            f"{type(num_segments).__name__}")
        edges = [0, *bounds, self.total_steps]
        segments = []
        for idx in range(len(edges) - 1):
            start, end = edges[idx], edges[idx + 1]
            members = tuple(i for i, s in enumerate(self.steps)
                            if (start < s <= end) or (idx == 0 and s == 0))
            if not members:
                raise ValueError(f"segment {idx} (updates [{start}, {end})) contains no checkpoint; every segment "
                                 f"needs one (checkpoint steps: {self.steps})")
            mass = float(self.lrs[start:end].sum())
            segments.append(Segment(idx, start, end, members, mass, mass / (1.0 - self.momentum),
                                    self.stage_of_step(end)))
        return segments

    def _default_boundaries(self, num_segments):
        by_stage: list[list[int]] = [[] for _ in range(self.num_stages)]
        for i, s in enumerate(self.steps):
            by_stage[self.stage_of_step(s)].append(i)
        empty = [j for j, members in enumerate(by_stage) if not members]
        if empty:
            raise ValueError(f"stages {empty} contain no checkpoint; each stage needs at least one "
                             f"(checkpoint steps {self.steps}, stage boundaries {self.stage_boundaries})")
        # One segment per stage, the rest by largest remainder ∝ checkpoints, capped by checkpoints.
        alloc = [1] * self.num_stages
        for _ in range(num_segments - self.num_stages):
            ratios = [(len(m) / a if a < len(m) else -1.0) for m, a in zip(by_stage, alloc)]
            alloc[int(np.argmax(ratios))] += 1
        bounds = []
        for stage, (members, parts) in enumerate(zip(by_stage, alloc)):
            groups = np.array_split(np.asarray(members), parts)
            for group in groups[:-1]:
                bounds.append(self.steps[int(group[-1])])
            if stage < self.num_stages - 1:
                bounds.append(self._stage_span(stage)[1])
        return bounds

    @classmethod
    def from_hf_trainer(cls, source, model=None, *, num_segments: int | Sequence[int] = 3, lr=None,
                        loss_scale: float = 1.0, stage_boundaries: Sequence[int] | None = None,
                        example_stages: Sequence[int] | None = None,
                        weight_decay: "str | float | Mapping[str, float] | None" = None) -> "TrainingRun":
        """The run a Hugging Face `Trainer` saved: its output_dir (every checkpoint-<step>/ in it) or a list of
        checkpoint directories (see `source_fast.hf_trainer`).

        Reads the steps, the learning rate of every update (the Trainer's scheduler rebuilt from
        training_args.bin and checked against the logged rates and each optimizer.pt's, scaled by the gradient
        clipping of each update when every update's norm was logged, each parameter group's constant multiple of it
        as `lr_scale`; or `lr` as given) and the optimizer from optimizer.pt: SGD with its heavy-ball momentum, or
        Adam/AdamW with each parameter's v̂ and eps (`model` names the parameters: needed for Adam). `loss_scale`: the Trainer's loss is a batch mean (a
        token mean for causal LMs), so pass the optimiser's per-example loss over the task's (for `CausalLMTask`,
        its `token_mean_loss_scale(train_dataset)`); the default 1 suits a per-example mean such as
        `ClassificationTask`'s. `weight_decay`: None (default) leaves the optimizer's weight decay out of the
        operators, as the SOURCE paper does (modelling it lowered the LDS on the deep-network tasks measured: README
        "Weight decay"); "optimizer" takes each parameter group's from optimizer.pt; a number or mapping is taken
        as given.
        """
        from . import hf_trainer

        return cls(**hf_trainer.run_arguments(source, model, lr, weight_decay), num_segments=num_segments,
                   stage_boundaries=stage_boundaries, example_stages=example_stages, loss_scale=loss_scale)

    # --------------------------------------------------------------------------------- helpers
    def load_checkpoint(self, index: int) -> dict[str, torch.Tensor]:
        ckpt = self.checkpoints[index]
        if isinstance(ckpt, Mapping):
            return dict(ckpt)
        try:
            return load_state_dict(ckpt)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"checkpoints[{index}]: {exc}") from None

    def averaged_state(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Parameter average of several checkpoints (Fast-SOURCE); non-float buffers from the last."""
        states = [self.load_checkpoint(i) for i in indices]
        out = {}
        for key, last in states[-1].items():
            if torch.is_floating_point(last):
                out[key] = sum(s[key].to(torch.float64) for s in states).div(len(states)).to(last.dtype)
            else:
                out[key] = last
        return out

    def stage_sizes(self, n_train: int) -> list[int]:
        """N_ℓ per stage: the number of training examples in each stage's data set."""
        if self.example_stages is None:
            return [n_train]
        return [int((self.example_stages == j).sum()) for j in range(self.num_stages)]

    def describe(self) -> str:
        rows = [f"TrainingRun: {len(self.checkpoints)} checkpoints at steps {self.steps}, T={self.total_steps}, "
                f"momentum={self.momentum}, optimizer={self.optimizer}, loss_scale={self.loss_scale}"
                + (f", weight_decay={self._weight_decay_summary()}" if self.has_weight_decay else "")
                + (f", lr_scale {min(self.lr_scale.values()):g}–{max(self.lr_scale.values()):g} over "
                   f"{len(self.lr_scale)} named parameters" if self.has_lr_scale else "")]
        for seg in self.segments:
            rows.append(f"  segment {seg.index}: updates [{seg.start}, {seg.end}), checkpoints "
                        f"{[self.steps[i] for i in seg.checkpoints]}, lr mass {seg.lr_mass:.4g}, c={seg.c:.4g}, "
                        f"stage {seg.stage}")
        return "\n".join(rows)

    def _weight_decay_summary(self) -> str:
        if isinstance(self.weight_decay, float):
            return f"{self.weight_decay:g}"
        values = sorted(set(self.weight_decay.values()))
        return f"{'/'.join(f'{v:g}' for v in values)} over {len(self.weight_decay)} named parameters"

    def fingerprint(self) -> dict:
        """What identifies this run's segmentation in stored factors and scores (weight decay only when there is
        one, "adamw" as "adam" without it: the same operators, and lr_scale only when it is not all 1; so stores
        written before these existed stay valid)."""
        out = {
            "steps": self.steps,
            "segments": [[s.start, s.end, list(s.checkpoints), round(s.c, 12), s.stage] for s in self.segments],
            "momentum": self.momentum,
            "loss_scale": self.loss_scale,
            "optimizer": "adam" if self.is_adam and not self.has_weight_decay else self.optimizer,
            "stage_boundaries": self.stage_boundaries,
        }
        if self.has_weight_decay:
            out["weight_decay"] = self.weight_decay
        if self.has_lr_scale:
            out["lr_scale"] = self.lr_scale
        return out
