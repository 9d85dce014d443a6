"""A `TrainingRun` from a Hugging Face `Trainer`'s output: its checkpoint-<step>/ directories.

Each directory holds the model (model.safetensors or shards), the optimizer's state (optimizer.pt), the trainer's
state (trainer_state.json: global step, logged learning rates) and its arguments (training_args.bin). From them:

- checkpoints and steps: the directories, at their `global_step`;
- the learning rate of every update: the Trainer's own scheduler rebuilt from its arguments
  (`transformers.get_scheduler` with the same type, warmup and length), checked against every learning rate the run
  logged and the one each optimizer.pt holds for the next update, so a schedule that was not that one raises (each
  parameter group's rate may be a constant multiple of it: a custom optimizer's groups at their own rates, read as
  the TrainingRun's lr_scale, the groups named by the names the optimizer saved or by the Trainer's grouping); times
  the gradient clipping's factor min(1, max_grad_norm / ‖g_k‖) of each update (the Trainer clips at 1.0 by default;
  a clipped update is a step of that much smaller learning rate along the same direction), from the gradient norms
  the run logged when it logged every update (logging_steps=1); with fewer logged, clipping seen at a logged step
  is warned about and the schedule taken as it is;
- the optimizer, read from optimizer.pt: SGD (its heavy-ball momentum) or Adam/AdamW (per parameter the
  bias-corrected second moment v̂ = exp_avg_sq / (1 − β₂^t) and eps, named by the Trainer's parameter groups:
  weight-decay parameters, then the others, each in `model.named_parameters()` order, checked by count and shape;
  read on access from the memory-mapped file, so only the tracked layers' v̂ are ever read);
- whether Adam's weight decay is decoupled (AdamW: torch's `decoupled_weight_decay`; a file without that flag is
  taken as AdamW, the Trainer's Adam optimizers all are), and, with `weight_decay="optimizer"`, each parameter
  group's weight decay (one number when every group has the same; else per parameter, named as above). By default
  the decay is not modelled (as in the SOURCE paper, Kronfluence and Bergson): on the deep-network tasks of
  benchmarks/lds_reproduction.py modelling it lowered the LDS (README "Weight decay").

The model files are read by `io.load_state_dict` when the analyzer loads a checkpoint (a PEFT model's directories
hold its adapter only: `io.match_to_model` puts it on the model's frozen base).

Not read: the loss scale. The Trainer's loss is a mean over the batch (over its tokens for a causal LM), so the
optimiser's per-example loss is `loss_scale` × the task's (for `sf.CausalLMTask`, its
`token_mean_loss_scale(train_dataset)`): pass it.

training_args.bin is a pickle, loaded as the Trainer loads it when resuming (`torch.load(weights_only=False)`): read
only directories you wrote.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import logging

import torch
from torch import nn

from . import io

log = logging.getLogger("source_fast")

_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The checkpoint-<step>/ directories of a Trainer's output_dir (sorted by step), or the given ones."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if (root / "trainer_state.json").is_file():
            return [root]
        found = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))
        if not found:
            raise FileNotFoundError(f"{str(root)!r} holds no checkpoint-<step> directories (a Trainer's output_dir "
                                    f"with save_strategy set) and is not one")
        return [p for _, p in found]
    dirs = [Path(p) for p in source]
    if not dirs:
        raise ValueError("checkpoint directories: got an empty list")
    return dirs


def _trainer_state(directory: Path) -> dict:
    path = directory / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no trainer_state.json: not a Trainer checkpoint directory")
    return json.loads(path.read_text())


def _training_args(directory: Path):
    args_path = directory / "training_args.bin"
    if not args_path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no training_args.bin: the learning-rate schedule cannot be "
                                f"rebuilt; pass lr= (one value per update)")
    return torch.load(args_path, weights_only=False)


def learning_rates(args, total: int, max_steps: int) -> list[float]:
    """The learning rate of updates 0 … total (one more than the run made: the next update's, which a checkpoint's
    optimizer holds), from the Trainer's scheduler (over `max_steps` updates) rebuilt from its arguments."""
    import transformers

    param = nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([param], lr=float(args.learning_rate))
    lrs = []
    try:
        scheduler = transformers.get_scheduler(
            args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.get_warmup_steps(max_steps),
            num_training_steps=max_steps, scheduler_specific_kwargs=getattr(args, "lr_scheduler_kwargs", None) or {})
        for _ in range(total + 1):
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            optimizer.step()
            scheduler.step()
    except Exception as exc:  # a schedule that needs more than the step count (reduce_lr_on_plateau: metrics)
        raise ValueError(f"the Trainer's {args.lr_scheduler_type!s} schedule could not be rebuilt from "
                         f"training_args.bin ({type(exc).__name__}: {exc}): pass lr= (one value per update)") from exc
    return lrs


def _check_logged(lrs: list[float], log_history: list[dict]) -> None:
    """Every learning rate the run logged is the rebuilt schedule's: the one of the update at that step (Trainers
    log it after the update, as the lr it used or, in older versions, the next one's)."""
    logged = [(int(e["step"]), float(e["learning_rate"])) for e in log_history
              if "learning_rate" in e and "step" in e and 0 < int(e["step"]) <= len(lrs) - 1]
    for shift in (1, 0):  # lr of update step − 1 (the one it used), or of update step (the next)
        if all(math.isclose(lr, lrs[step - shift], rel_tol=1e-5, abs_tol=1e-12) for step, lr in logged):
            return
    step, lr = next((s, v) for s, v in logged if not math.isclose(v, lrs[s - 1], rel_tol=1e-5, abs_tol=1e-12))
    raise ValueError(f"the learning rate logged at step {step} ({lr:.6g}) is not the rebuilt schedule's "
                     f"({lrs[step - 1]:.6g}): the run's schedule is not its Trainer's default one (a custom "
                     f"scheduler or optimizer?); pass lr= (one value per update)")


def clipping_factors(log_history: list[dict], total: int, max_grad_norm: float | None) -> list[float] | None:
    """Per update k = 0 … total − 1, the factor min(1, max_grad_norm / (‖g_k‖ + 1e-6)) by which the Trainer's
    clipping (torch.nn.utils.clip_grad_norm_) scaled its gradient, from the norms logged at steps 1 … total; None
    when the run did not clip, or did not log every update's norm (then a warning if a logged one was clipped)."""
    if not max_grad_norm or max_grad_norm <= 0:
        return None
    norms = {int(e["step"]): float(e["grad_norm"]) for e in log_history
             if "grad_norm" in e and "step" in e and 0 < int(e["step"]) <= total}
    if not norms:
        log.info("source_fast: the run clipped gradients at norm %g but logged no gradient norm: updates it clipped "
                 "(if any) count as full steps", max_grad_norm)
        return None
    factors = {step: min(1.0, max_grad_norm / (norm + 1e-6)) for step, norm in norms.items()}
    if len(factors) == total:
        return [factors[k + 1] for k in range(total)]
    clipped = sum(f < 1 for f in factors.values())
    if clipped:
        warnings.warn(f"gradient clipping (max_grad_norm={max_grad_norm:g}) scaled {clipped} of the {len(factors)} "
                      f"updates whose gradient norm the run logged, but only {len(factors)} of its {total} updates "
                      f"were logged: the learning rates are taken unscaled, so clipped updates count as full steps "
                      f"(train with logging_steps=1, or pass lr= with the effective rates)", RuntimeWarning,
                      stacklevel=3)
    return None


def _decay_parameter_names(model: nn.Module) -> list[str]:
    """The Trainer's own rule (no parameter group of its own is built here: the method reads only the model)."""
    import transformers

    try:
        return list(transformers.Trainer.get_decay_parameter_names(None, model))
    except Exception as exc:  # another transformers whose rule needs a Trainer
        raise ValueError(f"transformers {transformers.__version__}: the Trainer's weight-decay grouping could not be "
                         f"rebuilt ({type(exc).__name__}: {exc}), so optimizer.pt's parameters cannot be named: build "
                         f"the TrainingRun with optimizer='adam' and adam_second_moments by hand") from exc


def _optimizer_names(model: nn.Module, groups: list[dict]) -> list[str]:
    """Parameter names in the optimizer's order: those the optimizer saved (torch keeps `param_names` when it was
    built from named parameters, as a custom optimizer may be), else the Trainer's groups rebuilt (weight decay, then
    the others)."""
    if groups and all("param_names" in g for g in groups):
        known = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        names: list[str] = [""] * (1 + max(i for g in groups for i in g["params"]))
        for group in groups:
            for index, name in zip(group["params"], group["param_names"]):
                names[index] = name
        unknown = [n for n in names if n and n not in known]
        if unknown:
            raise ValueError(f"optimizer.pt names parameters the model does not have, e.g. {unknown[:3]}: pass the "
                             f"model the run trained")
        return names
    decay = set(_decay_parameter_names(model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in params if n in decay] + [n for n, _ in params if n not in decay]
    sizes = [len(g["params"]) for g in groups]
    expected = [sum(n in decay for n, _ in params), sum(n not in decay for n, _ in params)]
    if sizes != [s for s in expected if s] and sizes != expected:
        raise ValueError(f"optimizer.pt has parameter groups of sizes {sizes}, but the Trainer's grouping of this "
                         f"model gives {expected}: build the TrainingRun by hand (adam_second_moments, weight_decay "
                         f"by parameter name)")
    return names


class SecondMoments(Mapping):
    """A checkpoint's Adam v̂ by parameter name, read on access from its memory-mapped optimizer.pt: the analyzer
    takes only its tracked layers' (holding every parameter's v̂ of every checkpoint would not fit a large model).
    Tied weights' aliases (GPT-2's lm_head.weight) map to their parameter's."""

    def __init__(self, path: Path, state: dict, entries: dict[str, tuple[int, float]]):
        self._path, self._state, self._entries = path, state, entries  # name -> (state index, β₂)

    def __getitem__(self, name: str) -> torch.Tensor:
        index, beta2 = self._entries[name]
        entry = self._state[index]
        return entry["exp_avg_sq"].float() / (1 - beta2 ** float(entry["step"]))

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"SecondMoments({str(self._path)!r}, {len(self)} parameters)"


def _load_optimizer(directory: Path) -> dict:
    path = directory / "optimizer.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no optimizer.pt (saved with save_only_model?): the optimizer "
                                f"cannot be read")
    try:  # memory-mapped: only the tensors read are read
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a file in torch's legacy (non-zip) format cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _adam_entries(saved: dict, names: list[str], shapes: dict[str, torch.Size],
                  tied: list[list[str]]) -> dict[str, tuple[int, float]]:
    """{parameter name: (index in optimizer.pt's state, β₂)}, tied weights' aliases included."""
    entries: dict[str, tuple[int, float]] = {}
    for group in saved["param_groups"]:
        beta2 = float(group["betas"][1])
        for index in group["params"]:
            name = names[index] if index < len(names) else None
            entry = saved["state"].get(index)
            if entry is None:  # a parameter that never got a gradient
                continue
            if "exp_avg_sq" not in entry or "step" not in entry:  # bitsandbytes' 8-bit Adam keeps state1/state2
                raise ValueError(f"optimizer.pt's state holds {sorted(entry)}, not torch Adam's exp_avg_sq and step "
                                 f"(a quantised or other Adam implementation?): pass adam_second_moments (v̂ per "
                                 f"parameter) by hand")
            if name is None or tuple(entry["exp_avg_sq"].shape) != tuple(shapes[name]):
                raise ValueError(f"optimizer.pt's parameter {index} ({tuple(entry['exp_avg_sq'].shape)}) does not "
                                 f"match the model's parameter {name!r} in the Trainer's order: pass "
                                 f"adam_second_moments by hand")
            entries[name] = (index, beta2)
    return io.fill_aliases(entries, tied)  # the optimizer saw one parameter where the model has tied names


def _optimizer_kind(groups: list[dict]) -> str:
    first = groups[0]
    if "betas" in first:
        if any(g.get("amsgrad") for g in groups):
            raise ValueError("optimizer.pt is AMSGrad: SOURCE's Adam approximation takes Adam's v̂")
        return "adamw" if first.get("decoupled_weight_decay", True) else "adam"
    if "momentum" in first:
        if any(g.get("nesterov") or g.get("dampening") for g in groups):
            raise ValueError("optimizer.pt is SGD with Nesterov momentum or dampening: TrainingRun models heavy-ball "
                             "momentum only")
        return "sgd"
    raise ValueError(f"optimizer.pt is neither SGD nor Adam/AdamW (its parameter groups hold {sorted(first)}): "
                     f"SOURCE models those two")


def _group_weight_decays(saved: list[dict]) -> list[float]:
    """Each parameter group's weight decay, the same in every checkpoint."""
    per_checkpoint = [[float(g.get("weight_decay", 0.0)) for g in o["param_groups"]] for o in saved]
    if any(values != per_checkpoint[0] for values in per_checkpoint):
        raise ValueError(f"the checkpoints' optimizers have different weight decays {per_checkpoint}: TrainingRun "
                         f"models a constant one")
    return per_checkpoint[0]


def _named_by_group(groups: list[dict], values: list[float], names: list[str],
                    tied: list[list[str]]) -> dict[str, float]:
    """A value per parameter group (weight decay, learning-rate ratio) as a value per parameter name (tied aliases
    included)."""
    return io.fill_aliases({names[index]: value for group, value in zip(groups, values) for index in group["params"]},
                           tied)


def _group_lr_ratios(dirs: list[Path], steps: list[int], saved: list[dict], lrs: list[float]) -> list[float]:
    """Each parameter group's learning rate over the rebuilt schedule, from the rate each checkpoint's optimizer holds
    for its next update: constant per group when the Trainer's scheduler scaled every group alike (a custom optimizer's
    groups at their own rates: layer-wise decay, a faster head). Raises when a group's ratio moves."""
    ratios: list[float | None] = [None] * len(saved[0]["param_groups"])
    for directory, step, optimizer in zip(dirs, steps, saved):
        for g, group in enumerate(optimizer["param_groups"]):
            held, scheduled = float(group["lr"]), lrs[step]
            if scheduled == 0.0 or held == 0.0:  # the schedule's end: nothing to compare but both being 0
                if held != scheduled:
                    raise ValueError(f"{str(directory)!r}: its optimizer holds lr {held:.6g} for the next update, the "
                                     f"rebuilt schedule {scheduled:.6g}: pass lr= (one value per update)")
                continue
            ratio = held / scheduled
            if ratios[g] is None:
                ratios[g] = ratio
            elif not math.isclose(ratio, ratios[g], rel_tol=1e-5):
                raise ValueError(f"{str(directory)!r}: parameter group {g} holds lr {held:.6g} for the next update, "
                                 f"{ratio:.6g} × the rebuilt schedule's {scheduled:.6g}, but {ratios[g]:.6g} × it at an "
                                 f"earlier checkpoint: not the Trainer's schedule; pass lr= (one value per update)")
    return [1.0 if r is None else r for r in ratios]


def run_arguments(source, model: nn.Module | None = None, lr=None, weight_decay=None) -> dict:
    """`TrainingRun`'s checkpoints, steps, lr, lr_scale, momentum, optimizer and weight-decay arguments for a Trainer's
    run (see the module doc); each checkpoint's trainer_state.json and optimizer.pt are read once. weight_decay: None
    (not modelled), "optimizer" (the parameter groups'), or a TrainingRun weight_decay taken as given."""
    dirs = checkpoint_dirs(source)
    states = [_trainer_state(d) for d in dirs]
    steps = [int(s["global_step"]) for s in states]
    saved = [_load_optimizer(d) for d in dirs]
    ratios = [1.0]
    if lr is None:
        args = _training_args(dirs[-1])
        history = states[-1].get("log_history", [])
        lrs = learning_rates(args, steps[-1], int(states[-1].get("max_steps") or steps[-1]))
        ratios = _group_lr_ratios(dirs, steps, saved, lrs)
        if len(set(ratios)) == 1:  # every group at one rate (the Trainer's own optimizer: ratio 1)
            lrs, ratios = [ratios[0] * x for x in lrs], [1.0]
        _check_logged([ratios[0] * x for x in lrs], history)  # the Trainer logs its first group's rate
        lr = lrs[:steps[-1]]
        factors = clipping_factors(history, steps[-1], getattr(args, "max_grad_norm", None))
        if factors is not None:
            lr = [eta * f for eta, f in zip(lr, factors)]
            if any(f < 1 for f in factors):
                log.info("source_fast: gradient clipping scaled %d of %d updates (learning rates scaled alike, "
                         "smallest factor %.3g)", sum(f < 1 for f in factors), len(factors), min(factors))
    kinds = {_optimizer_kind(o["param_groups"]) for o in saved}
    if len(kinds) > 1:
        raise ValueError(f"the checkpoints were saved by different optimizers: {sorted(kinds)}")
    arguments = {"checkpoints": [str(d) for d in dirs], "steps": steps, "lr": lr}
    groups = saved[0]["param_groups"]
    decays = _group_weight_decays(saved)
    read_decay = isinstance(weight_decay, str) and weight_decay == "optimizer"
    if isinstance(weight_decay, str) and not read_decay:
        raise ValueError(f"weight_decay must be None, 'optimizer', a number or a mapping, got {weight_decay!r}")
    if weight_decay is None and any(decays):
        log.info("source_fast: the run's optimizer used weight decay %s, not modelled (weight_decay='optimizer' "
                 "models it; README 'Weight decay')", sorted(set(decays)))
    names = tied = None
    named_decays = read_decay and len(set(decays)) > 1
    named_rates = len(ratios) > 1
    if kinds != {"sgd"} or named_decays or named_rates:  # parameters to name: v̂, or the groups' own decays or rates
        if model is None:
            need = "an Adam run" if kinds != {"sgd"} else \
                f"parameter groups with different weight decays {decays}" if named_decays else \
                f"parameter groups at different learning rates ({[round(r, 6) for r in ratios]} × the schedule)"
            raise ValueError(f"{need} needs the model to name its parameters (TrainingRun.from_hf_trainer(..., "
                             f"model=model))")
        names = _optimizer_names(model, groups)  # the same order in every checkpoint
        tied = io.tied_names(dict(model.named_parameters(remove_duplicate=False)))
    if named_rates:
        arguments["lr_scale"] = _named_by_group(groups, ratios, names, tied)
    if read_decay:
        weight_decay = _named_by_group(groups, decays, names, tied) if named_decays else decays[0]
    arguments["weight_decay"] = 0.0 if weight_decay is None else weight_decay
    if kinds == {"sgd"}:
        momenta = {float(g["momentum"]) for o in saved for g in o["param_groups"]}
        if len(momenta) > 1:
            raise ValueError(f"the checkpoints' optimizers use different momenta {sorted(momenta)}")
        return {**arguments, "momentum": momenta.pop()}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    moments = [SecondMoments(d / "optimizer.pt", o["state"], _adam_entries(o, names, shapes, tied))
               for d, o in zip(dirs, saved)]
    return {**arguments, "momentum": 0.0, "optimizer": kinds.pop(), "adam_second_moments": moments,
            "adam_eps": float(saved[-1]["param_groups"][0]["eps"])}
