"""Counterfactual evaluation (LDS) of SOURCE against its baselines, at CPU scale (issue 4).

Reproduces the comparison of SOURCE_MATH.md §6 on four small tasks, with two ground truths each:

Tasks (data generated or bundled with scikit-learn; no download):
  digits_brief      MLP 64-64-10 on 1,000 sklearn digits, 30 % of labels flipped, plain SGD for 3 epochs
                    (96 steps; not converged).
  digits_converged  the same data and model trained for 300 epochs (9,600 steps; the noisy labels are
                    memorised, training loss ≈ 0.06).
  two_stage         pretrain on 1,000 digits (10 epochs), then fine-tune on 400 *rotated* digits (5 epochs,
                    lower lr); queries are rotated test digits; examples of both stages are attributed
                    (TrainingRun stage_boundaries / example_stages, N_ℓ per stage).
  regression        MLP 8-32-32-1 on 1,000 synthetic points (teacher tanh network + noise), 20 epochs.
                    The optimiser uses MSE (mean of (y−f)²) = 2 × the Gaussian-NLL task's ½(y−f)², so
                    TrainingRun(loss_scale=2).
  digits_decay      digits_brief's data and model, 30 epochs of SGD with weight decay 0.01 on the weights (not
                    the biases, the common recipe): Σ η·wd ≈ 2.2 over the run, so the decay, not the loss,
                    forgets the early steps; TrainingRun(weight_decay={weights: 0.01}).
  digits_decay_converged  the same for 300 epochs (Σ η·wd ≈ 22: converged to the regularised optimum).
  logistic_decay, logistic_decay_converged  the same two runs of a multinomial logistic regression 64-10 (convex:
                    its Gauss-Newton curvature is its Hessian), weight decay 0.01 on the weights.

Every run is plain SGD (no momentum; weight decay only in the *_decay tasks), batch 32, lr decaying linearly to
half its peak over each stage,
with a batch order fixed by the seed. Training randomness across seeds = init seed + batch order; the
attributed model is seed 0. Measurement f: the query's cross-entropy (classification) or squared error
(regression).

Ground truths (same α = 0.5 subsets for both, `source_fast.evaluation.draw_subset_masks`):
  same_epochs  the usual protocol: each subset is trained for as many epochs as the full run (per stage),
               i.e. half the steps and half the learning-rate mass.
  same_steps   each subset is trained for as many steps, with the same per-step learning rates, as the
               attributed run (what SOURCE's derivation describes).
Seeds are run in two halves (two `run_counterfactual` calls); their agreement gives a split-half estimate
of how much of the ground truth is seed noise (the "ceiling" columns).

Methods (`source_fast.SourceAnalyzer`, 6 evenly spaced checkpoints per run; two-stage: 2 + 4):
  source        SOURCE, L = 3 segments, C = 6 checkpoints
  source_L1     SOURCE, L = 1 segment over all 6 checkpoints (two-stage: L = 2, one per stage, the minimum)
  fast_source   Fast-SOURCE, L = 3 (curvature and gradients at each segment's parameter average)
  if_source     EK-FAC influence function at the final model, damping 1 / Σ_k η_k
  if_heuristic  EK-FAC influence function at the final model, damping 0.1 × mean Λ
  tracin        TracIn over the 6 checkpoints, weighted by the learning-rate mass
  gradient_dot  ⟨∇f, ∇L⟩ at the final model
The influence baselines get a run without stages (their curvature is fitted on all training examples); given
the staged run they must score the same (an ablation row checks it).
Checks and ablations (a separate table; --no-ablations skips them): SOURCE with L = 6 segments (one
checkpoint each), with the empirical Fisher (true labels) instead of the sampled one, and with the scoring
contraction in bf16 (score_dtype=torch.bfloat16; fp32 accumulation); EK-FAC influence with
fixed dampings 0.01 and 0.1; on two_stage, EK-FAC influence given the staged run (a check: its curvature
must come from every stage's data, as the main table's run without stages gives it); on regression, SOURCE with
loss_scale=1 (a curvature 2× too small for the MSE the optimiser used); on the *_decay tasks, SOURCE ignoring the
weight decay, and decaying the biases too (a uniform shift, which the run did not have).

    python benchmarks/lds_reproduction.py              # full run: writes benchmarks/results/lds_cpu.{csv,md,png}
    python benchmarks/lds_reproduction.py --quick      # smoke run (tiny M, S, queries; < 1 min)
    source-fast lds [--full]                           # the same through the CLI (quick by default)

Retraining results are cached per (task, protocol, configuration) under --cache-dir (default
<repo>/.lds_cache, which must not be committed), so an interrupted run resumes. In lds_cpu.md, everything
below the notes marker is hand-written analysis and is kept when the script regenerates the file.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import functools
import hashlib
import io as _io
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn
from torch.utils.data import TensorDataset

from source_fast import evaluation, io
from source_fast.analyzer import SourceAnalyzer
from source_fast.demo import DigitsTask
from source_fast.diagnostics import curvature_report
from source_fast.run import TrainingRun
from source_fast.task import Task

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NOTES_MARKER = ("<!-- notes: everything below this line is hand-written and kept when the script regenerates this "
                "file -->")
PROTOCOLS = ("same_epochs", "same_steps")
PROTOCOL_LABELS = {"same_epochs": "same epochs (usual)", "same_steps": "same steps"}


# ------------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class Stage:
    epochs: int
    lr: float
    checkpoints: int


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    kind: str  # "cls" | "reg"
    data: str  # "digits_noisy" | "digits_two_stage" | "regression"
    dims: tuple[int, ...]
    stages: tuple[Stage, ...]
    n_train: tuple[int, ...]  # per stage
    n_query: int
    label_noise: float = 0.0
    batch_size: int = 32
    decay: float = 0.5  # lr falls linearly from lr to lr·(1 − decay) over each stage
    weight_decay: float = 0.0  # L2 on the weights (not the biases), added to their gradients

    def weight_decays(self, biases: bool = False) -> dict[str, float] | float:
        """The run's weight decay for TrainingRun: by parameter name (weights only, as trained), or on every
        parameter (biases=True: a uniform decay the run did not have, for the ablation)."""
        if biases or not self.weight_decay:
            return self.weight_decay
        return {f"{2 * j}.weight": self.weight_decay for j in range(len(self.dims) - 1)}

    @property
    def loss_scale(self) -> float:
        return 2.0 if self.kind == "reg" else 1.0  # MSE mean = 2 × mean Gaussian NLL ½(y−f)²

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        if not fields["weight_decay"]:  # the key of every task from before weight decay existed: caches stay valid
            del fields["weight_decay"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def make_specs(quick: bool) -> dict[str, Spec]:
    n, q = (200, 8) if quick else (1000, 100)
    conv_epochs = 40 if quick else 300
    decay_epochs = 10 if quick else 30
    specs = [
        Spec("digits_brief", "digits MLP, 30 % label noise, 3 epochs (brief)", "cls", "digits_noisy", (64, 64, 10),
             (Stage(3, 0.3, 6),), (n,), q, label_noise=0.3),
        Spec("digits_converged", f"digits MLP, 30 % label noise, {conv_epochs} epochs (converged)", "cls",
             "digits_noisy", (64, 64, 10), (Stage(conv_epochs, 0.3, 6),), (n,), q, label_noise=0.3),
        Spec("two_stage", "pretrain on digits (10 ep.) → fine-tune on rotated digits (5 ep.)", "cls",
             "digits_two_stage", (64, 64, 10), (Stage(10, 0.3, 2), Stage(5, 0.1, 4)),
             (160, 80) if quick else (1000, 400), q),
        Spec("regression", "regression MLP 8-32-32-1, synthetic, 20 epochs", "reg", "regression", (8, 32, 32, 1),
             (Stage(20, 0.05, 6),), (n,), q),
        Spec("digits_decay", f"digits MLP, 30 % label noise, {decay_epochs} epochs, weight decay 0.01 on weights",
             "cls", "digits_noisy", (64, 64, 10), (Stage(decay_epochs, 0.3, 6),), (n,), q, label_noise=0.3,
             weight_decay=0.01),
        Spec("digits_decay_converged", f"digits MLP, 30 % label noise, {conv_epochs} epochs, weight decay 0.01 on "
             f"weights (converged)", "cls", "digits_noisy", (64, 64, 10), (Stage(conv_epochs, 0.3, 6),), (n,), q,
             label_noise=0.3, weight_decay=0.01),
        Spec("logistic_decay", f"digits logistic regression (convex), 30 % label noise, {decay_epochs} epochs, weight "
             f"decay 0.01", "cls", "digits_noisy", (64, 10), (Stage(decay_epochs, 0.3, 6),), (n,), q,
             label_noise=0.3, weight_decay=0.01),
        Spec("logistic_decay_converged", f"digits logistic regression (convex), 30 % label noise, {conv_epochs} "
             f"epochs, weight decay 0.01 (converged)", "cls", "digits_noisy", (64, 10), (Stage(conv_epochs, 0.3, 6),),
             (n,), q, label_noise=0.3, weight_decay=0.01),
    ]
    return {s.name: s for s in specs}


# The influence baselines are given a single-stage run: influence scores ignore stages anyway (one curvature at
# the final model, weight 1/N for every example). Given the staged run they must score the same (an ablation
# checks it: until 94c7c73 SourceAnalyzer fitted an influence run's curvature on stage 0's examples only).
_ONE_STAGE = {"stages": False}
METHODS = (
    # key, label, SourceAnalyzer method, damping, number of segments, options (see ABLATIONS)
    ("source", "SOURCE (L=3, C=6)", "source", None, 3, {}),
    ("source_L1", "SOURCE (L=1, C=6)", "source", None, 1, {}),
    ("fast_source", "Fast-SOURCE (L=3)", "fast_source", None, 3, {}),
    ("if_source", "EK-FAC IF, δ=1/Σηₖ", "influence", "source", 3, _ONE_STAGE),
    ("if_heuristic", "EK-FAC IF, δ=0.1·mean Λ", "influence", "heuristic", 3, _ONE_STAGE),
    ("tracin", "TracIn (C=6)", "tracin", None, 3, {}),
    ("gradient_dot", "gradient dot", "gradient_dot", None, 3, {}),
)

DECAY_TASKS = ("digits_decay", "digits_decay_converged", "logistic_decay", "logistic_decay_converged")

# Checks and ablations (reported separately from the main comparison): key, label, method, damping, segments,
# tasks (None: all), options. options: "stages": False fits a single-stage run (all examples share one data set),
# "loss_scale": overrides the task's, "fisher": "empirical" uses the true labels for the curvature, "score_dtype":
# the SourceAnalyzer option (a torch dtype name), "weight_decay": "none" (0) or "all" (biases too) instead of the run's,
# "query_rank": the SourceAnalyzer option.
ABLATIONS = (
    ("source_L6", "SOURCE (L=6, one checkpoint per segment)", "source", None, 6, None, {}),
    ("source_empirical_fisher", "SOURCE (L=3), empirical Fisher", "source", None, 3, None, {"fisher": "empirical"}),
    ("source_bf16_scores", "SOURCE (L=3), bf16 scoring contraction (score_dtype)", "source", None, 3, None,
     {"score_dtype": "bfloat16"}),
    ("source_query_rank_8", "SOURCE (L=3), query directions at rank 8 (query_rank)", "source", None, 3, None,
     {"query_rank": 8}),
    ("source_query_rank_2", "SOURCE (L=3), query directions at rank 2 (query_rank)", "source", None, 3, None,
     {"query_rank": 2}),
    ("if_damping_0.01", "EK-FAC IF, δ=0.01", "influence", 0.01, 3, None, _ONE_STAGE),
    ("if_damping_0.1", "EK-FAC IF, δ=0.1", "influence", 0.1, 3, None, _ONE_STAGE),
    ("if_source_staged_run", "EK-FAC IF, δ=1/Σηₖ, given the staged run", "influence", "source",
     3, ("two_stage",), {}),
    ("if_heuristic_staged_run", "EK-FAC IF, δ=0.1·mean Λ, given the staged run", "influence",
     "heuristic", 3, ("two_stage",), {}),
    ("source_loss_scale_1", "SOURCE (L=3) with loss_scale=1 (curvature 2× too small)", "source", None, 3,
     ("regression",), {"loss_scale": 1.0}),
    ("source_no_weight_decay", "SOURCE (L=3) ignoring the weight decay", "source", None, 3,
     DECAY_TASKS, {"weight_decay": "none"}),
    ("source_weight_decay_on_biases", "SOURCE (L=3) with the weight decay on the biases too (uniform)", "source",
     None, 3, DECAY_TASKS, {"weight_decay": "all"}),
)


# ------------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    x: torch.Tensor
    y: torch.Tensor
    stages: np.ndarray  # [N] stage of each training example
    xq: torch.Tensor
    yq: torch.Tensor
    info: dict


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target, dtype=torch.long)


def _rotate(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x.reshape(-1, 8, 8), 1, (1, 2)).reshape(-1, 64).contiguous()


@functools.lru_cache(maxsize=None)
def build_data(spec: Spec) -> Data:
    gen = torch.Generator().manual_seed(0)
    if spec.data == "digits_noisy":
        x, y = _digits()
        perm = torch.randperm(len(x), generator=gen)
        (n,) = spec.n_train
        train, query = perm[:n], perm[n:n + spec.n_query]
        y_train = y[train].clone()
        flip = torch.randperm(n, generator=gen)[: round(spec.label_noise * n)]
        y_train[flip] = (y_train[flip] + torch.randint(1, 10, (len(flip),), generator=gen)) % 10
        return Data(x[train], y_train, np.zeros(n, dtype=np.int64), x[query], y[query],
                    {"flipped": len(flip)})
    if spec.data == "digits_two_stage":
        x, y = _digits()
        perm = torch.randperm(len(x), generator=gen)
        n0, n1 = spec.n_train
        s0, s1, query = perm[:n0], perm[n0:n0 + n1], perm[n0 + n1:n0 + n1 + spec.n_query]
        return Data(torch.cat([x[s0], _rotate(x[s1])]), torch.cat([y[s0], y[s1]]),
                    np.repeat(np.arange(2), [n0, n1]), _rotate(x[query]), y[query], {})
    if spec.data == "regression":
        (n,) = spec.n_train
        d = spec.dims[0]
        xs = torch.randn(n + spec.n_query, d, generator=gen)
        w1 = torch.randn(32, d, generator=gen) / math.sqrt(d)
        w2 = torch.randn(1, 32, generator=gen) * (2 / math.sqrt(32))
        ys = torch.tanh(xs @ w1.T) @ w2.T + 0.3 * torch.randn(n + spec.n_query, 1, generator=gen)
        return Data(xs[:n], ys[:n], np.zeros(n, dtype=np.int64), xs[n:], ys[n:], {"noise_std": 0.3})
    raise ValueError(f"unknown data set {spec.data!r}")


# --------------------------------------------------------------------------- training (fast, no autograd)
def init_params(dims, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """nn.Linear's default init, U(±1/sqrt(fan_in)) for weights and biases, from a seeded generator."""
    gen = torch.Generator().manual_seed(1_000_003 * seed + 17)
    params = []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        bound = 1.0 / math.sqrt(fan_in)
        params.append(((torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound,
                       (torch.rand(fan_out, generator=gen) * 2 - 1) * bound))
    return params


def forward(params, x):
    h, acts = x, [x]
    for j, (w, b) in enumerate(params):
        h = torch.addmm(b, h, w.T)
        if j < len(params) - 1:
            h = h.clamp_min(0)
            acts.append(h)
    return h, acts


def batch_grads(params, x, y, kind: str):
    """Gradients of the optimiser's loss: mean cross-entropy (cls) or mean squared error (reg)."""
    out, acts = forward(params, x)
    if kind == "cls":
        d = torch.softmax(out, 1)
        d[torch.arange(len(y)), y] -= 1.0
    else:
        d = 2.0 * (out - y)
    d = d / len(x)
    grads = [None] * len(params)
    for j in reversed(range(len(params))):
        w, _ = params[j]
        a = acts[j]
        grads[j] = (d.T @ a, d.sum(0))
        if j:
            d = (d @ w) * (a > 0)
    return grads


def to_state_dict(params) -> dict[str, torch.Tensor]:
    """Parameters in the layout of `make_model(dims)` (nn.Sequential(Linear, ReLU, ..., Linear))."""
    state = {}
    for j, (w, b) in enumerate(params):
        state[f"{2 * j}.weight"], state[f"{2 * j}.bias"] = w.clone(), b.clone()
    return state


def make_model(dims) -> nn.Module:
    layers = []
    for j, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if j < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def stage_steps(spec: Spec, n_examples: int, stage: Stage) -> int:
    return stage.epochs * math.ceil(n_examples / spec.batch_size)


def train(spec: Spec, data: Data, keep: np.ndarray, seed: int, protocol: str, record: bool = False):
    """SGD on the kept examples. protocol: "full" (the attributed run), "same_epochs" or "same_steps".

    Each stage draws a fresh permutation of its kept examples every pass and walks it in batches (last
    batch of a pass may be smaller). Returns (params, checkpoints, checkpoint steps, per-step lrs)."""
    params = init_params(spec.dims, seed)
    gen = torch.Generator().manual_seed(7_919 * seed + 3)
    checkpoints, ckpt_steps, lrs, step = [], [], [], 0
    for s, stage in enumerate(spec.stages):
        in_stage = data.stages == s
        pool = torch.from_numpy(np.flatnonzero(keep & in_stage))
        if len(pool) == 0:
            continue
        total = stage_steps(spec, int(in_stage.sum()) if protocol in ("full", "same_steps") else len(pool), stage)
        per_pass = math.ceil(len(pool) / spec.batch_size)
        save_at = {round(total * (j + 1) / stage.checkpoints) for j in range(stage.checkpoints)} if record else set()
        for k in range(total):
            if k % per_pass == 0:
                order = pool[torch.randperm(len(pool), generator=gen)]
            idx = order[(k % per_pass) * spec.batch_size:(k % per_pass + 1) * spec.batch_size]
            eta = stage.lr * (1.0 - spec.decay * k / total)
            for (w, b), (gw, gb) in zip(params, batch_grads(params, data.x[idx], data.y[idx], spec.kind)):
                if spec.weight_decay:
                    gw = gw + spec.weight_decay * w
                w.sub_(gw, alpha=eta)
                b.sub_(gb, alpha=eta)
            lrs.append(eta)
            step += 1
            if k + 1 in save_at:
                checkpoints.append(to_state_dict(params))
                ckpt_steps.append(step)
    return params, checkpoints, ckpt_steps, lrs


def measure(spec: Spec, params, x, y) -> np.ndarray:
    """Per-query measurement f: cross-entropy (cls) or squared error (reg)."""
    out, _ = forward(params, x)
    if spec.kind == "cls":
        values = F.cross_entropy(out, y, reduction="none")
    else:
        values = (out - y).pow(2).sum(1)
    return values.double().numpy()


def retrain_measure(spec: Spec, protocol: str, seed_offset: int, mask: np.ndarray, seed: int) -> np.ndarray:
    """`run_counterfactual` job: train on the subset `mask` with seed `seed_offset + seed`, measure queries."""
    data = build_data(spec)
    params, _, _, _ = train(spec, data, np.asarray(mask, dtype=bool), seed_offset + seed, protocol)
    return measure(spec, params, data.xq, data.yq)


def check_gradients(spec: Spec) -> float:
    """Max abs difference between `batch_grads` and autograd on a few examples (sanity check)."""
    data = build_data(spec)
    params = init_params(spec.dims, 0)
    model = make_model(spec.dims)
    model.load_state_dict(to_state_dict(params))
    x, y = data.x[:16], data.y[:16]
    out = model(x)
    loss = F.cross_entropy(out, y) if spec.kind == "cls" else (out - y).pow(2).mean()
    reference = torch.autograd.grad(loss, list(model.parameters()))
    mine = [g for pair in batch_grads(params, x, y, spec.kind) for g in pair]
    return max(float((a - b).abs().max()) for a, b in zip(mine, reference))


# ------------------------------------------------------------------------------------------- attribution
class GaussianTask(Task):
    """Unit-variance Gaussian NLL ½(y−f)² summed; sampled targets y ~ N(f, 1); measurement (y−f)²."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        out = model(x)
        if sample:
            with torch.no_grad():
                y = out + torch.randn_like(out)
        return 0.5 * (out - y).pow(2).sum()

    def compute_measurement(self, batch, model):
        x, y = batch
        return (model(x) - y).pow(2).sum()


def attributed_run(spec: Spec, data: Data):
    keep = np.ones(len(data.x), dtype=bool)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread, as in the retraining workers
    try:
        t0 = time.perf_counter()
        params, ckpts, steps, lrs = train(spec, data, keep, 0, "full", record=True)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    bounds, start = [], 0
    for s, stage in enumerate(spec.stages[:-1]):
        start += stage_steps(spec, int((data.stages == s).sum()), stage)
        bounds.append(start)
    return params, ckpts, steps, lrs, bounds, seconds


def method_entries(spec: Spec, ablations: bool):
    """(key, label, method, damping, segments, options, is_ablation) for this task. A multi-stage run needs one
    segment per stage at least, so "L=1" becomes L = number of stages there (and says so in its label)."""
    entries = []
    for key, label, method, damping, segments, options in METHODS:
        if method in ("source", "fast_source") and segments < len(spec.stages):
            label = label.replace(f"L={segments}", f"L={len(spec.stages)}, one per stage")
        entries.append((key, label, method, damping, segments, options, False))
    if ablations:
        entries += [(key, label, method, damping, segments, options, True)
                    for key, label, method, damping, segments, tasks, options in ABLATIONS
                    if tasks is None or spec.name in tasks]
    return entries


def attribute(spec: Spec, data: Data, ckpts, steps, lrs, bounds, progress: bool, ablations: bool):
    """Scores [Q, N] of every method, seconds per method, and SOURCE's curvature report."""
    model = make_model(spec.dims)
    task = DigitsTask() if spec.kind == "cls" else GaussianTask()
    train_ds, query_ds = TensorDataset(data.x, data.y), TensorDataset(data.xq, data.yq)
    scores, seconds, report = {}, {}, None
    for key, _, method, damping, segments, options, _ in method_entries(spec, ablations):
        staged = len(spec.stages) > 1 and options.get("stages", True)
        decay = {"none": 0.0, "all": spec.weight_decays(biases=True)}.get(options.get("weight_decay"),
                                                                          spec.weight_decays())
        run = TrainingRun(ckpts, steps, lr=lrs, momentum=0.0,
                          num_segments=max(segments, len(spec.stages)) if staged else segments,
                          stage_boundaries=bounds if staged else None,
                          example_stages=data.stages.tolist() if staged else None,
                          loss_scale=options.get("loss_scale", spec.loss_scale), weight_decay=decay)
        t0 = time.perf_counter()
        score_dtype = getattr(torch, options["score_dtype"]) if "score_dtype" in options else None
        analyzer = SourceAnalyzer(model, task, run, method=method, damping=damping, batch_size=500,
                                  fisher=options.get("fisher", "sampled"), progress=progress, score_dtype=score_dtype,
                                  query_rank=options.get("query_rank"))
        analyzer.fit(train_ds)
        scores[key] = analyzer.pairwise_scores(query_ds, train_ds).double().numpy()
        seconds[key] = time.perf_counter() - t0
        if key == "source":
            report = curvature_report(analyzer)
    return scores, seconds, report


# ---------------------------------------------------------------------------------------------- ground truth
def ground_truth(spec: Spec, masks: np.ndarray, protocol: str, num_seeds: int, cache_dir: Path, workers: int,
                 progress: bool):
    """Seed-averaged measurements [M, Q], computed in two halves of the seeds (split-half noise estimate)."""
    half = num_seeds // 2
    tag = hashlib.sha256(np.packbits(masks, axis=1).tobytes() + repr(masks.shape).encode()).hexdigest()[:8]
    base = cache_dir / f"{spec.name}-{protocol}-{spec.key()}-{tag}"
    halves, fresh_seconds = [], 0.0
    for offset, count in ((0, half), (half, num_seeds - half)):
        directory = base / f"seeds_from_{offset}"
        timing = directory / "timing.json"
        fresh = not timing.exists()
        t0 = time.perf_counter()
        fn = functools.partial(retrain_measure, spec, protocol, offset)
        halves.append(evaluation.run_counterfactual(fn, masks, count, directory, num_workers=workers,
                                                    progress=progress))
        if fresh:  # wall time of the first complete computation (a resumed one included), kept for the report
            io.atomic_write_json(timing, {"seconds": time.perf_counter() - t0, "jobs": len(masks) * count,
                                          "workers": workers})
        fresh_seconds += json.loads(timing.read_text())["seconds"]
    mean = (halves[0] * half + halves[1] * (num_seeds - half)) / num_seeds
    return mean, halves, fresh_seconds


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of a with the same column of b ([M, Q] each) -> [Q]."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(0) / np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))


def split_half(halves) -> dict:
    """Per-query Spearman between the two seed halves over subsets, and the implied ceiling of LDS."""
    r = float(np.nanmean(spearman_columns(halves[0], halves[1])))
    reliability = 2 * r / (1 + r) if r > -1 else float("nan")
    return {"split_half": r, "ceiling": math.sqrt(reliability) if reliability > 0 else 0.0}


PAIRS = (("source", "if_source"), ("source", "if_heuristic"), ("source", "tracin"), ("if_source", "tracin"),
         ("source_L1", "source"))


def paired_difference(a: np.ndarray, b: np.ndarray, n_bootstrap: int, seed: int = 0) -> dict:
    """Mean over queries of per-query LDS a − b, with a percentile bootstrap CI over queries (paired)."""
    valid = np.isfinite(a) & np.isfinite(b)
    diff = (a - b)[valid]
    if diff.size == 0:
        return {"mean": float("nan"), "ci": (float("nan"), float("nan"))}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_bootstrap, diff.size))].mean(1)
    return {"mean": float(diff.mean()), "ci": tuple(float(v) for v in np.percentile(means, [2.5, 97.5]))}


# --------------------------------------------------------------------------------------------------- output
def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    io.atomic_write_bytes(path, buffer.getvalue().encode())


def _fmt(value: float, digits: int = 3) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def write_markdown(path: Path, rows: list[dict], tasks: list[dict], settings: dict) -> None:
    labels = {key: label for key, label, *_ in METHODS}
    out = ["# LDS reproduction at CPU scale", "",
           f"Generated by `python benchmarks/lds_reproduction.py{' --quick' if settings['quick'] else ''}` on "
           f"{settings['date']} ({settings['machine']}; torch {settings['torch']}, {settings['workers']} worker "
           f"processes). Raw numbers: `{path.with_suffix('.csv').name}`; figure: `{path.with_suffix('.png').name}`.",
           "", "## Settings", "",
           f"- Subsets: M = {settings['num_subsets']} random halves (α = 0.5) of each training set, the same masks for "
           f"both protocols; S = {settings['num_seeds']} training seeds per subset (init + batch order; common "
           f"across subsets), run as two halves of {settings['num_seeds'] // 2} seeds.",
           f"- Queries: {settings['num_queries']} held-out examples per task; LDS = mean over queries of the "
           f"Spearman correlation over subsets; 95 % CI from {settings['n_bootstrap']} bootstrap resamples of the "
           "queries (it does not include the noise of the subset draw or of the ground truth).",
           "- Training: plain SGD, batch 32, lr decaying linearly to half its peak over each stage; the attributed "
           "run is seed 0 on the full data. Scores come from 6 evenly spaced checkpoints of that run "
           "(two-stage: 2 in pretraining, 4 in fine-tuning).",
           "- Ground truths: *same epochs* trains each subset for the run's epochs (half the steps and lr mass); "
           "*same steps* trains it for the run's steps with the same per-step lr.",
           "- Ceiling: split-half reliability r of the ground truth (seed halves, Spearman over subsets, averaged "
           "over queries); ceiling ≈ sqrt(2r/(1+r)), the correlation a perfect predictor of the infinite-seed "
           "ground truth would reach (approximate).", "",
           "| task | setup | N | steps | c per segment (L=3) | attributed model |",
           "|---|---|---|---|---|---|"]
    for t in tasks:
        out.append(f"| {t['name']} | {t['title']} | {t['n_train']} | {t['steps']} | "
                   f"{', '.join(f'{c:.3g}' for c in t['c'])} | {t['quality']} |")
    out += ["", "## LDS (mean over queries, 95 % bootstrap CI)", ""]
    header = "| task | method | " + " | ".join(PROTOCOL_LABELS[p] for p in PROTOCOLS) + " |"
    out += [header, "|---|---|" + "---|" * len(PROTOCOLS)]
    for t in tasks:
        for key, label in t["labels"].items():
            cells = []
            for p in PROTOCOLS:
                r = next(r for r in rows if r["task"] == t["name"] and r["method"] == key and r["protocol"] == p)
                cells.append(f"{_fmt(r['lds'])} [{_fmt(r['ci_low'], 2)}, {_fmt(r['ci_high'], 2)}]")
            out.append(f"| {t['name']} | {label} | " + " | ".join(cells) + " |")
    extra = [r for r in rows if r["ablation"]]
    if extra:
        out += ["", "## Checks and ablations (same ground truths; not part of the main comparison)", "",
                "| task | variant | " + " | ".join(PROTOCOL_LABELS[p] for p in PROTOCOLS) + " |",
                "|---|---|" + "---|" * len(PROTOCOLS)]
        for t in tasks:
            for key in dict.fromkeys(r["method"] for r in extra if r["task"] == t["name"]):
                sel = {r["protocol"]: r for r in extra if r["task"] == t["name"] and r["method"] == key}
                out.append(f"| {t['name']} | {sel[PROTOCOLS[0]]['method_label']} | " + " | ".join(
                    f"{_fmt(sel[p]['lds'])} [{_fmt(sel[p]['ci_low'], 2)}, {_fmt(sel[p]['ci_high'], 2)}]"
                    for p in PROTOCOLS) + " |")
    out += ["", "## Paired differences (per-query LDS differences, mean and 95 % bootstrap CI over queries)", "",
            "| task | protocol | " + " | ".join(f"{labels[a]} − {labels[b]}" for a, b in PAIRS) + " |",
            "|---|---|" + "---|" * len(PAIRS)]
    for t in tasks:
        for p in PROTOCOLS:
            out.append(f"| {t['name']} | {PROTOCOL_LABELS[p]} | " + " | ".join(
                f"{_fmt(d['mean'])} [{_fmt(d['ci'][0], 2)}, {_fmt(d['ci'][1], 2)}]"
                for d in (t["paired"][p][pair] for pair in PAIRS)) + " |")
    out += ["", "## Ground truth quality", "",
            "| task | protocol | split-half r | ceiling | Spearman(same epochs, same steps) "
            "| retraining time (M×S jobs) |",
            "|---|---|---|---|---|---|"]
    for t in tasks:
        for p in PROTOCOLS:
            g = t["gt"][p]
            out.append(f"| {t['name']} | {PROTOCOL_LABELS[p]} | {g['split_half']:.3f} | {g['ceiling']:.3f} | "
                       f"{t['cross_protocol']:.3f} | {g['seconds']:.0f} s |")
    out += ["", "## Curvature regimes of SOURCE (L=3; `source_fast.diagnostics`, all layers pooled)", "",
            "Share of EK-FAC eigen-directions with c·σ < 0.1 (TracIn-like), in between, and > 10 (influence-like).",
            "", "| task | segment | stage | c | σ_max | TracIn-like | between | influence-like |",
            "|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        for seg in t["regimes"]:
            out.append(f"| {t['name']} | {seg['segment']} | {seg['stage']} | {seg['c']:.3g} | {seg['sigma_max']:.3g} | "
                       f"{100 * seg['tracin_like']:.1f} % | {100 * seg['intermediate']:.1f} % | "
                       f"{100 * seg['influence_like']:.1f} % |")
    out += ["", "## Timings (wall clock, seconds)", "", "| task | attributed run | "
            + " | ".join(labels[k] for k, *_ in METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for t in tasks:
        out.append(f"| {t['name']} | {t['train_seconds']:.2f} | "
                   + " | ".join(f"{t['method_seconds'][k]:.1f}" for k, *_ in METHODS) + " |")
    retraining = sum(t["gt"][p]["seconds"] for t in tasks for p in PROTOCOLS)
    out += ["", f"Retraining (all tasks and protocols, {settings['workers']} workers, when first computed): "
            f"{retraining:.0f} s. This invocation (attribution, LDS, report; retraining results from the cache where "
            f"already computed): {settings['total_seconds']:.0f} s. The machine (2 cores) was shared with other jobs, "
            "so timings are indicative.", "", NOTES_MARKER, ""]
    notes = ""
    if path.exists():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1].lstrip("\n")
    io.atomic_write_bytes(path, ("\n".join(out) + notes).encode())


def write_figure(path: Path, rows: list[dict], tasks: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(tasks))  # rows of four panels: eight tasks in one row would be unreadable
    rows_of_panels = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4.2 * columns, 4.6 * rows_of_panels), squeeze=False,
                             sharey=True)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    width = 0.38
    colors = {"same_epochs": "tab:blue", "same_steps": "tab:orange"}
    for ax, t in zip(axes.flat, tasks):
        xs = np.arange(len(METHODS))
        for i, p in enumerate(PROTOCOLS):
            sel = [next(r for r in rows if r["task"] == t["name"] and r["method"] == key and r["protocol"] == p)
                   for key, *_ in METHODS]
            means = np.array([r["lds"] for r in sel])
            err = np.array([[r["lds"] - r["ci_low"] for r in sel], [r["ci_high"] - r["lds"] for r in sel]])
            ax.bar(xs + (i - 0.5) * width, means, width, yerr=err, capsize=2, color=colors[p],
                   label=PROTOCOL_LABELS[p])
            ax.hlines(t["gt"][p]["ceiling"], -0.5, len(METHODS) - 0.5, colors=colors[p], linestyles="dashed",
                      linewidth=0.8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(xs)
        ax.set_xticklabels(list(t["labels"].values()), rotation=60, ha="right", fontsize=7)
        ax.set_title(t["name"], fontsize=9)
    for row in axes:
        row[0].set_ylabel("LDS (α = 0.5), 95 % CI over queries")
    handles, names = axes[0][0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="gray", linestyle="dashed", linewidth=0.8))
    names.append("split-half ceiling of the ground truth")
    fig.legend(handles, names, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.07 / rows_of_panels))
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    io.atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------------ main
def _pooled_regimes(report: list[dict]) -> list[dict]:
    out = []
    for seg in sorted({r["segment"] for r in report}):
        rs = [r for r in report if r["segment"] == seg]
        n = sum(r["n_directions"] for r in rs)
        out.append({"segment": seg, "stage": rs[0]["stage"], "c": rs[0]["c"],
                    "sigma_max": max(r["sigma_max"] for r in rs),
                    **{k: sum(r[k] * r["n_directions"] for r in rs) / n
                       for k in ("tracin_like", "intermediate", "influence_like")}})
    return out


def _quality(spec: Spec, data: Data, params) -> str:
    with torch.no_grad():
        out_tr, _ = forward(params, data.x)
        out_q, _ = forward(params, data.xq)
        if spec.kind == "cls":
            return (f"train loss {F.cross_entropy(out_tr, data.y).item():.3f}, query loss "
                    f"{F.cross_entropy(out_q, data.yq).item():.3f}, query acc "
                    f"{(out_q.argmax(1) == data.yq).float().mean().item():.3f}")
        return (f"train MSE {(out_tr - data.y).pow(2).mean().item():.3f}, query MSE "
                f"{(out_q - data.yq).pow(2).mean().item():.3f} (noise var 0.09)")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny data, M, S and queries (< 1 min)")
    parser.add_argument("--full", dest="quick", action="store_false", help="the full run (default)")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of: digits_brief, digits_converged, "
                                                      "two_stage, regression, digits_decay, digits_decay_converged, "
                                                      "logistic_decay, logistic_decay_converged")
    parser.add_argument("--num-subsets", type=int, default=None, help="M (default 100; quick 8)")
    parser.add_argument("--num-seeds", type=int, default=None, help="S, even (default 8; quick 2)")
    parser.add_argument("--workers", type=int, default=2, help="retraining processes (0: in this process)")
    parser.add_argument("--cache-dir", default=None, help="retraining cache (default <repo>/.lds_cache)")
    parser.add_argument("--out-dir", default=None,
                        help="results directory (default benchmarks/results; quick: <cache-dir>/quick)")
    parser.add_argument("--n-bootstrap", type=int, default=None, help="bootstrap resamples (default 2000; quick 200)")
    parser.add_argument("--no-ablations", action="store_true", help="skip the checks and ablations")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.num_subsets = args.num_subsets or (8 if args.quick else 100)
    args.num_seeds = args.num_seeds or (2 if args.quick else 8)
    args.n_bootstrap = args.n_bootstrap or (200 if args.quick else 2000)
    if args.num_subsets < 3:
        parser.error(f"--num-subsets must be >= 3, got {args.num_subsets}")
    if args.num_seeds < 2 or args.num_seeds % 2:
        parser.error(f"--num-seeds must be even and >= 2 (two halves for the ceiling), got {args.num_seeds}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    specs = make_specs(args.quick)
    names = list(specs) if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; choose from {list(specs)}")
    cache_dir = Path(args.cache_dir) if args.cache_dir else REPO / ".lds_cache"
    out_dir = Path(args.out_dir) if args.out_dir else (cache_dir / "quick" if args.quick else HERE / "results")
    progress = not args.no_progress
    torch.manual_seed(0)
    rows, tasks = [], []
    for name in names:
        spec = specs[name]
        data = build_data(spec)
        err = check_gradients(spec)
        if err > 1e-5:
            raise RuntimeError(f"{name}: hand-written gradients disagree with autograd by {err:.2e}")
        n_train = len(data.x)
        print(f"== {name}: {spec.title}; N = {n_train}, {spec.n_query} queries", flush=True)
        params, ckpts, steps, lrs, bounds, train_seconds = attributed_run(spec, data)
        quality = _quality(spec, data, params)
        print(f"   attributed run: {len(lrs)} steps in {train_seconds:.2f} s; {quality}", flush=True)

        masks = evaluation.draw_subset_masks(n_train, args.num_subsets, alpha=0.5, seed=1)
        truth, gt_info = {}, {}
        for protocol in PROTOCOLS:
            t0 = time.perf_counter()
            truth[protocol], halves, fresh = ground_truth(spec, masks, protocol, args.num_seeds, cache_dir,
                                                          args.workers, progress)
            gt_info[protocol] = {**split_half(halves), "seconds": fresh}
            print(f"   ground truth {protocol}: {time.perf_counter() - t0:.0f} s now ({fresh:.0f} s when computed), "
                  f"split-half r {gt_info[protocol]['split_half']:.3f}", flush=True)
        cross = float(np.nanmean(spearman_columns(truth["same_epochs"], truth["same_steps"])))

        per_query = {}
        scores, method_seconds, report = attribute(spec, data, ckpts, steps, lrs, bounds, progress,
                                                   not args.no_ablations)
        for key, label, *_, ablation in method_entries(spec, not args.no_ablations):
            for protocol in PROTOCOLS:
                result = evaluation.lds(scores[key], masks, truth[protocol], n_bootstrap=args.n_bootstrap, seed=0)
                per_query[key, protocol] = result["per_query"]
                rows.append({"task": name, "method": key, "method_label": label, "ablation": ablation,
                             "protocol": protocol,
                             "lds": result["mean"], "ci_low": result["ci"][0], "ci_high": result["ci"][1],
                             "n_valid": result["n_valid"], "n_query": result["n_query"],
                             "num_subsets": args.num_subsets, "num_seeds": args.num_seeds,
                             "gt_split_half": gt_info[protocol]["split_half"],
                             "gt_ceiling": gt_info[protocol]["ceiling"],
                             "attribution_seconds": round(method_seconds[key], 3)})
            print(f"   {label[:26]:<26} " + "  ".join(
                f"{p}: {rows[-2 + i]['lds']:+.3f} [{rows[-2 + i]['ci_low']:+.2f}, {rows[-2 + i]['ci_high']:+.2f}]"
                for i, p in enumerate(PROTOCOLS)) + f"  ({method_seconds[key]:.1f} s)", flush=True)
        source_run = TrainingRun(ckpts, steps, lr=lrs, num_segments=max(3, len(spec.stages)),
                                 stage_boundaries=bounds or None,
                                 example_stages=data.stages.tolist() if len(spec.stages) > 1 else None)
        tasks.append({"name": name, "title": spec.title, "n_train": n_train if len(spec.stages) == 1 else
                      " + ".join(str(int((data.stages == s).sum())) for s in range(len(spec.stages))),
                      "steps": len(lrs) if not bounds else f"{bounds[0]} + {len(lrs) - bounds[0]}",
                      "c": [s.c for s in source_run.segments], "quality": quality, "gt": gt_info,
                      "cross_protocol": cross, "regimes": _pooled_regimes(report), "train_seconds": train_seconds,
                      "method_seconds": method_seconds,
                      "labels": {key: label for key, label, *_ in method_entries(spec, False)},
                      "paired": {p: {(a, b): paired_difference(per_query[a, p], per_query[b, p], args.n_bootstrap)
                                     for a, b in PAIRS} for p in PROTOCOLS}})

    settings = {"quick": args.quick, "date": _dt.date.today().isoformat(),
                "machine": f"{platform.machine()}, {platform.system()}", "torch": torch.__version__,
                "workers": args.workers, "num_subsets": args.num_subsets, "num_seeds": args.num_seeds,
                "num_queries": ", ".join(sorted({str(specs[n].n_query) for n in names})),
                "n_bootstrap": args.n_bootstrap, "total_seconds": time.perf_counter() - t_start}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "lds_cpu.csv", rows)
    write_markdown(out_dir / "lds_cpu.md", rows, tasks, settings)
    if not args.no_plot:
        write_figure(out_dir / "lds_cpu.png", rows, tasks)
    print(f"results in {out_dir}/ (lds_cpu.csv, lds_cpu.md{'' if args.no_plot else ', lds_cpu.png'}); "
          f"{settings['total_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
