"""SourceAnalyzer: SOURCE (and the baselines that share its machinery) on any PyTorch model.

    run = sf.TrainingRun(checkpoints, steps, lr, momentum=0.9, num_segments=3)
    analyzer = sf.SourceAnalyzer(model, task, run, output_dir="out")
    analyzer.fit(train_dataset)                                       # EK-FAC per segment
    scores = analyzer.pairwise_scores(query_dataset, train_dataset)   # [n_query, n_train]
    self_scores = analyzer.self_scores(train_dataset)                 # [n_train]

Scores are removal effects: τ(z_q, z_m) > 0 means removing z_m would raise the query measurement
(for f = loss, z_m helps the query). τ = Σ_ℓ (1/N_ℓ) ⟨v_ℓ, ḡ_ℓ(z_m)⟩ (SOURCE_MATH.md §2).

Passes over the training data (each with a progress bar): per fitted checkpoint one for the
covariances and one for the eigenvalue correction (the first one's rows replace the second within
SOURCE_FAST_ROW_CACHE_MIB); per scored checkpoint one scoring pass for all queries at once. SOURCE's
pairwise_scores without a prior fit() needs no scoring passes: segments are fitted last to first and
scored from the covariance passes' rows (`_segment_major_pairwise`; needs Task.compute_train_loss_pair for
the sampled Fisher). Per-example gradients exist only for one batch at a time.
"""
from __future__ import annotations

import functools
import itertools
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from . import _config, _extension, _linalg, _torch_ops, ekfac, io, modules, ops, spectral
from .batches import batches
from .directions import (LowRankDirections, RankOneDirections, as_dense, left_product_queries_innermost,
                         right_product_queries_innermost, truncated)
from .ekfac import EKFACBlock
from .modules import Capture, OutputChangedInPlace, Rebuilt, TrackedLayer, find_tracked_layers
from .rows import (Formed, Pieces, RowBudget, RowCache, formed_layers, kept_nbytes, kept_rows, member_lists,
                   merge_rows, one_channel_families, rows_nbytes, stacked, stacking_pays, with_formed_gradients)
from .run import TrainingRun
from .task import attention_mask, check_task, has_loss_pair, tracked_module_names
from .walk import (SegmentByStepWalk, WalkPlan, query_walk, rotate_in, rotated_walk, rotated_walk_visit,
                   workspace_buffer)

log = logging.getLogger("source_fast")

METHODS = ("source", "fast_source", "influence", "tracin", "gradient_dot")
# Scoring segment by segment holds the [Q, N] running sum on the device; above this, block by block.
SEGMENT_MAJOR_MAX_SCORE_BYTES = 1 << 30


class Unit:
    """A model state at which gradients are taken: a checkpoint, or a segment's parameter average."""

    def __init__(self, uid: str, load: Callable[[], dict], segment: int):
        self.uid, self.load, self.segment = uid, load, segment


class CovarianceSum:
    """Σ x xᵀ over the row blocks of a pass (`ops.covariance` into one accumulator), where blocks shorter than
    MIN_ROWS of a factor at least MIN_WIDTH wide are gathered first: a product of a few rows re-reads the whole
    [D, D] accumulator for little work (C++ covariance, 2-core Zen 4: D = 2049 at 128 rows took 3.1x the time
    per row of 1024-row blocks, D = 785 2.1x, D = 513 1.5x). The gathered rows are copies (4·R·D bytes)."""

    MIN_ROWS = 1024
    MIN_WIDTH = 256

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device, *, backend=None, deterministic=None):
        self.sum = torch.zeros(width, width, dtype=dtype, device=device)
        self._kwargs = {"backend": backend, "deterministic": deterministic}
        self._pending: torch.Tensor | None = None  # [MIN_ROWS, D] buffer, its first _filled rows gathered
        self._filled = 0

    def add(self, x: torch.Tensor) -> None:
        """x: [R, D] rows of this pass."""
        if x.shape[0] >= self.MIN_ROWS or x.shape[1] < self.MIN_WIDTH:
            ops.covariance(x, out=self.sum, **self._kwargs)
            return
        if self._pending is None or self._pending.dtype != x.dtype:
            self._flush()
            self._pending = torch.empty(self.MIN_ROWS, x.shape[1], dtype=x.dtype, device=x.device)
        start = 0
        while start < x.shape[0]:
            take = min(x.shape[0] - start, self.MIN_ROWS - self._filled)
            self._pending[self._filled:self._filled + take].copy_(x[start:start + take])
            self._filled += take
            start += take
            if self._filled == self.MIN_ROWS:
                self._flush()

    def add_tokens(self, x: torch.Tensor) -> None:
        """x: [B, T, D] token rows, any strides. A conv layer's output gradients are positions-innermost views
        ([B, D, positions] transposed): for a narrow factor or many positions per example Σ_b x_bᵀ x_b is one batched
        product that reads them in place (`_batched_product_pays`); otherwise the rows are flattened (a copy for
        such a view) and added by `add`."""
        if _batched_product_pays(x):
            xs = x.to(self.sum.dtype)
            per_example = torch.bmm(xs.transpose(1, 2), xs)  # [B, D, D]
            total = per_example.sum(dim=0)
            self.add_sum(total.add_(total.T.clone()).mul_(0.5))  # symmetric, as the covariance op's output
            return
        self.add(x.reshape(-1, x.shape[-1]))

    def add_sum(self, total: torch.Tensor) -> None:
        """Add a precomputed Σ x xᵀ [D, D] (`modules.conv_patch_covariance`)."""
        self.sum.add_(total.to(self.sum.dtype))

    def _flush(self) -> None:
        if self._filled:
            ops.covariance(self._pending[:self._filled], out=self.sum, **self._kwargs)
            self._filled = 0

    def total(self) -> torch.Tensor:
        """The sum over every row added so far."""
        self._flush()
        return self.sum


class LambdaSum:
    """The fit's Λ += Σ_n ((g_n Q_S)ᵀ (a_n Q_A))² over a pass, for one layer. Short blocks of one-token rows (a
    linear layer's 128 examples of a batch) are gathered to MIN_ROWS examples before the op: its rotation packs
    the whole eigenbasis per call, so a few rows per call pay that again and again (compiled GEMM, 2-core Zen 4,
    time per 128 rows at 128 against 512 rows per call: 1.24x at 785 columns, 1.28x at 513, 1.55x at 2049, 2.0x at
    257). Gathered rows are copies (4·rows·(I + O) bytes); tokens, conv rows and GPU rows go to the op as they
    come."""

    MIN_ROWS = 512

    def __init__(self, q_a: torch.Tensor, q_s: torch.Tensor, out: torch.Tensor, *, backend=None, deterministic=None):
        self.q_a, self.q_s, self.out = q_a, q_s, out
        self._kwargs = {"backend": backend, "deterministic": deterministic}
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._rows = 0

    def add(self, a, g) -> None:
        """a, g: one block's token rows, or `rows.Formed` per-example gradients and None."""
        if isinstance(a, Formed):
            self._add_formed(a.grads)
            return
        if (not isinstance(a, torch.Tensor) or a.device.type != "cpu" or a.dim() != 3 or a.shape[1] != 1
                or a.shape[0] >= self.MIN_ROWS):  # (on GPU unmeasured: rows go to the op as they come)
            ops.lambda_accum(a, g, self.q_a, self.q_s, out=self.out, **self._kwargs)
            return
        self._pending.append((a, g))
        self._rows += a.shape[0]
        if self._rows >= self.MIN_ROWS:
            self.flush()

    def _add_formed(self, grads: torch.Tensor) -> None:
        """Λ += Σ_n (Q_Sᵀ G_n Q_A)² from per-example gradients [n, O, I] (a conv layer's, kept as `rows.Formed`):
        two products and a sum of squares, in chunks of examples bounded like the ops' own."""
        dt = self.out.dtype
        o, i = grads.shape[1:]
        step = max(1, _FORMED_CHUNK_BYTES // (2 * o * i * self.out.element_size()))
        for start in range(0, grads.shape[0], step):  # (contiguous: the same products for kept and fresh G_n)
            rotated = rotate_in(grads[start:start + step].to(dt).contiguous(), self)  # self holds q_a, q_s
            self.out.add_(rotated.square_().sum(dim=0))

    def flush(self) -> None:
        """Add the gathered rows (call once the pass is over)."""
        if not self._pending:
            return
        a, g = (torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*self._pending))
        self._pending, self._rows = [], 0
        ops.lambda_accum(a, g, self.q_a, self.q_s, out=self.out, **self._kwargs)


_FORMED_CHUNK_BYTES = 64 << 20  # rotated per-example gradients held at once by LambdaSum (and their input)


class GroupsLambdaSum:
    """`LambdaSum._add_formed` for all the groups of one module at once (a depthwise convolution's: hundreds of
    [m, k² + 1] layers): Λ_c += Σ_n (Q_S,cᵀ G_n,c Q_A,c)² by two batched products over the groups' stacked bases
    instead of two tiny products per group and batch."""

    def __init__(self, names: list[str], basis: dict, acc: dict):
        self.names = names
        self.outs = [acc[name] for name in names]
        dt = self.outs[0].dtype
        self.q_a = torch.stack([basis[name][0].to(dt) for name in names])  # [C, I, I]
        self.q_s_t = torch.stack([basis[name][1].T.to(dt) for name in names])[:, None]  # [C, 1, m, m]

    def add(self, grads: list[torch.Tensor]) -> None:
        """grads: the groups' per-example gradients [B, m, I] each, in `names` order."""
        dt = self.outs[0].dtype
        c, (b, m, i) = len(grads), grads[0].shape
        step = max(1, _FORMED_CHUNK_BYTES // (2 * c * m * i * self.outs[0].element_size()))
        totals = torch.zeros(c, m, i, dtype=dt, device=self.outs[0].device)
        for start in range(0, b, step):
            g = torch.stack([x[start:start + step].to(dt) for x in grads])  # [C, n, m, I]
            n = g.shape[1]
            rotated = torch.matmul(self.q_s_t, torch.matmul(g.reshape(c, n * m, i), self.q_a).reshape(c, n, m, i))
            totals.add_(rotated.square_().sum(dim=1))
        for out, total in zip(self.outs, totals):
            out.add_(total)


def _seed_draws(device: torch.device, seed: int) -> None:
    """torch.manual_seed(seed) for the generators a task's label draws use: the CPU's and, on CUDA, the model's
    device's. torch.manual_seed also queues a seed for every not-yet-initialised CUDA, XPU and MTIA device, each
    recording a formatted stack trace (0.086 against 0.006 ms per sampled batch on CPU), and reseeds every CUDA
    device, where fork_rng restores only the model's."""
    if device.type not in ("cpu", "cuda"):
        torch.manual_seed(seed)  # other accelerators: torch's own, as before
        return
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)  # that device's generator (queued if CUDA is not initialised yet)


def _batched_product_pays(x: torch.Tensor) -> bool:
    """Whether `CovarianceSum.add_tokens` sums x [B, T, D] by a batched product: CPU rows with positions innermost
    (flattening them copies) and D ≤ 64 or T ≥ 4·D. Measured against the copy and the covariance op (2-core Zen 4,
    B = 128): 1.07-3.7x at D = 16..64 for T = 64..1024, 1.48x at T = 1024, D = 256; 0.25-0.81x for D ≥ 256 at
    T ≤ 256 (the batched product computes both triangles and every example's [D, D])."""
    if x.dim() != 3 or x.device.type != "cpu" or x.shape[1] < 2 or x.stride(1) != 1 or x.stride(2) == 1:
        return False
    t, d = x.shape[1], x.shape[2]
    return d <= 64 or t >= 4 * d


def _uncompiled(model: nn.Module, names: list[str] | None) -> tuple[nn.Module, list[str] | None]:
    """(the module a torch.compile'd model wraps, the task's tracked names without the wrapper's "_orig_mod."):
    forward hooks inside a compiled graph see tensors that autograd does not connect to the loss (measured: scores
    40 % off), so the passes run the original module (eagerly). Any other model and names as they are."""
    inner = getattr(model, "_orig_mod", None)
    if not (isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule"):
        return model, names
    log.warning("source_fast: the model is torch.compile'd; its passes run the original module "
                "(model._orig_mod), whose forward hooks see the tensors autograd differentiates")
    if isinstance(names, (list, tuple)):
        names = [n.removeprefix(io.COMPILED_PREFIX) if isinstance(n, str) else n for n in names]
    return inner, names


class SourceAnalyzer:
    """Attribution scores from a training run.

    Args:
        model: the architecture (any nn.Module); checkpoints are loaded into it. Its state is restored
            after every call.
        task: Kronfluence-style Task (see `source_fast.Task`).
        run: the `TrainingRun` (checkpoints, schedule, segments).
        output_dir: where factors and scores are stored (safetensors, atomic writes). None: memory only.
        method: "source" (default), "fast_source" (segment-averaged parameters), "influence" (EK-FAC
            influence function at the final model), "tracin" (Σ_c lr-mass × ⟨∇f(θ_c), ∇L(θ_c)⟩) or
            "gradient_dot" (⟨∇f(θ_T), ∇L(θ_T)⟩); all divided by N.
        damping: source/fast_source: optional extra damping δ ≥ 0 (default 0, the paper's).
            influence: a float > 0 (absolute), "heuristic" (0.1 × mean Λ per layer, default) or
            "source" (1 / Σ_k η_k, the damping SOURCE implies for one segment). Adam runs: δ of the
            accumulation inverse (default heuristic).
        fisher: "sampled" (labels from the model: true Fisher, default) or "empirical" (true labels).
        batch_size: examples per batch in every pass.
        operator: "continuous" (exp forms, default) or "discrete" (exact unrolling of each segment's
            steps at its mean learning rate; for checks).
        seed: seeds label sampling, per (checkpoint, batch).
        check_finite: raise on NaN/Inf in factors, gradients and scores (default True).
        overwrite: recompute stored factors computed under another configuration instead of raising.
        backend / deterministic: passed to every op (see `source_fast.ops`).
        collate_fn: DataLoader collate function for your dataset.
        progress: show progress bars.
        score_block: training examples per stored score block (rounded up to whole batches; default
            about 4096). The unit of resumption for pairwise and self scores.
        score_dtype: dtype of the scoring contraction ⟨V_q, G_n⟩ (pairwise_scores, top_k, and the influence
            method's self_scores), the dominant cost at scale: None (the compute dtype, default),
            torch.float32, or torch.bfloat16 / torch.float16 (query directions and training rows rounded to it,
            fp32 accumulation: tensor cores on GPUs; on CPU the rounded values go through the fp32 kernels, so
            it only adds casts). Factors, eigendecompositions and the walk keep the compute dtype. Stored
            scores record it: a rerun with another score_dtype recomputes (overwrite=True) instead of
            resuming.
        query_rank: score each query's direction per layer and scored state by its best rank-R approximation
            (truncated SVD, as Kronfluence's query_gradient_low_rank), contracted as Σ_t (Uᵀg_t)·(Wᵀa_t)
            (`ops.score_lowrank`: Q·N·T·R·(O + I) multiply-adds instead of Q·N·O·I, never forming V_q or G_n).
            None (default): exact. Layers with min(O, I) ≤ R stay exact. Applies to pairwise_scores, top_k and
            per_token_scores; self_scores stay exact. Stored scores record it.
    """

    def __init__(self, model: nn.Module, task: Any, run: TrainingRun, output_dir: str | Path | None = None, *,
                 method: str = "source", damping: float | str | None = None, fisher: str = "sampled",
                 batch_size: int = 64, operator: str = "continuous", seed: int = 0, check_finite: bool = True,
                 overwrite: bool = False, backend: str | None = None, deterministic: bool | None = None,
                 collate_fn: Callable | None = None, progress: bool = True, score_block: int | None = None,
                 score_dtype: torch.dtype | None = None, query_rank: int | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_task(task)
        model, names = _uncompiled(model, tracked_module_names(task))
        if not isinstance(run, TrainingRun):
            raise TypeError(f"run must be a source_fast.TrainingRun, got {type(run).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if fisher not in ("sampled", "empirical"):
            raise ValueError(f"fisher must be 'sampled' or 'empirical', got {fisher!r}")
        if operator not in ("continuous", "discrete"):
            raise ValueError(f"operator must be 'continuous' or 'discrete', got {operator!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if score_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError("score_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                             f"got {score_dtype!r}")
        if query_rank is not None and (isinstance(query_rank, bool) or not isinstance(query_rank, int)
                                       or query_rank < 1):
            raise ValueError(f"query_rank must be an integer >= 1 or None, got {query_rank!r}")
        self.damping = self._check_damping(method, damping)
        self.score_dtype, self.query_rank = score_dtype, query_rank
        self.model, self.task, self.run = model, task, run
        self.method, self.fisher, self.operator = method, fisher, operator
        self.batch_size, self.seed, self.check_finite = batch_size, int(seed), check_finite
        self.overwrite, self.backend, self.deterministic = overwrite, backend, deterministic
        self.collate_fn, self.progress = collate_fn, progress
        if score_block is not None and (isinstance(score_block, bool) or not isinstance(score_block, int)
                                        or score_block < 1):
            raise ValueError(f"score_block must be an integer >= 1 or None, got {score_block!r}")
        # Whole batches per block, so a resumed run makes exactly the same batches (bitwise results).
        target = score_block if score_block is not None else 4096
        self.score_block = batch_size * max(1, -(-target // batch_size))
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.layers: list[TrackedLayer] = find_tracked_layers(model, names)
        self._copied_outputs: set[int] = set()  # modules whose output the forward changes in place (Capture)
        self._adam_cache: tuple | None = None  # (the blocks it was computed for, `_adam_terms`)
        # What a saved checkpoint may leave out and the model restores (io.match_to_model): PEFT's adapter names in
        # its keys and, in a model with both trained and frozen parameters (a PEFT adapter on a frozen base), the
        # frozen parameters and the buffers, which did not train. (A model frozen as a whole tells nothing.)
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        partial = bool(frozen) and any(p.requires_grad for p in model.parameters())
        self._checkpoint_gaps = {
            "constant": frozen | {n for n, _ in model.named_buffers(remove_duplicate=False)} if partial else set(),
            "adapter_names": tuple(getattr(model, "peft_config", None) or ())}
        self._check_checkpoint_keys()
        self._check_parameter_names()
        if method in ("source", "fast_source", "influence"):
            self._check_factor_memory()
        self.blocks: list[dict[str, EKFACBlock]] | None = None
        self._n_fit: int | None = None  # N of the fitted training set: every score's 1/N uses it
        self._state_cache: dict[str, dict] = {}
        self._query_tokens = 1  # tokens per query row (set by _query_grads): a cost-model hint
        self._costlier_low_rank: set[str] = set()  # layers logged as scored slower with query_rank than without
        self._query_g_density: dict[str, float] = {}  # nonzero fraction of query output gradients, per layer
        self._query_a_density: dict[str, float] = {}  # ... and of their (unrotated) activations

    # ------------------------------------------------------------------------------ validation
    @staticmethod
    def _check_damping(method, damping):
        if method == "influence":
            if damping is None:
                return "heuristic"
            if isinstance(damping, str):
                if damping not in ("heuristic", "source"):
                    raise ValueError(f"damping must be a float > 0, 'heuristic' or 'source', got {damping!r}")
                return damping
            if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0 \
                    or damping != damping or damping == float("inf"):
                raise ValueError(f"damping for method='influence' must be a finite float > 0 (a plain inverse of a "
                                 f"PSD matrix with zero eigenvalues is undefined), 'heuristic' or 'source'; got "
                                 f"{damping!r}")
            return float(damping)
        if damping is None:
            return None
        if isinstance(damping, str) and damping == "heuristic":
            return damping
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0 \
                or damping == float("inf"):
            raise ValueError(f"damping must be a finite float >= 0 or None, got {damping!r}")
        return float(damping)

    def _check_factor_memory(self):
        """Before any pass: a tracked layer whose EK-FAC cannot fit (e.g. a language model's output layer, O =
        the vocabulary) raises, naming it; a very large eigendecomposition is logged. The bound is a floor:
        one segment's factors of every layer in the compute dtype plus the largest layer's float64
        eigendecomposition (input, eigenvectors and workspace, ≈ 3 n² doubles)."""
        itemsize = torch.finfo(self.compute_dtype).bits // 8
        factors = sum((layer.in_features ** 2 + layer.out_features ** 2 + layer.in_features * layer.out_features)
                      * itemsize for layer in self.layers)
        widest = max(self.layers, key=lambda layer: max(layer.in_features, layer.out_features))
        n = max(widest.in_features, widest.out_features)
        need = factors + 3 * n * n * 8
        available = _available_bytes(self.device)
        if available is not None and need > available:
            gib = 2 ** 30
            raise ValueError(
                f"tracked module {widest.name!r} ([{widest.out_features}, {widest.in_features}]) needs a "
                f"{n} × {n} float64 eigendecomposition: the EK-FAC factors need at least {need / gib:.1f} GiB, "
                f"but {available / gib:.1f} GiB are available on {self.device}. Leave the largest layers out of the "
                "task's tracked modules (get_influence_tracked_modules(), e.g. sf.CausalLMTask(tracked_modules=[...]) "
                "without the output layer)")
        if n > _LARGE_EIGH:
            log.warning("source_fast: tracked module %r needs a %d × %d eigendecomposition per segment (≈ %.1f "
                        "TFLOP in float64); leave it out of the tracked modules if that is too slow",
                        widest.name, n, n, 9 * n ** 3 / 1e12)

    def _check_checkpoint_keys(self):
        for i, ckpt in enumerate(self.run.checkpoints):
            if isinstance(ckpt, Mapping):
                self._matched(ckpt, i)

    def _matched(self, state: Mapping, which) -> dict:
        """A checkpoint's state under the model's keys (`io.match_to_model`), or a ValueError naming checkpoint
        `which` and what its keys lack."""
        model_state = self.model.state_dict()
        state = io.match_to_model(state, model_state, **self._checkpoint_gaps)
        self._compare_keys(which, set(state.keys()), set(model_state.keys()), state)
        return state

    @staticmethod
    def _compare_keys(index, got, expected, state=None):
        if got == expected:
            return
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        hint = ""
        nested = sorted(k for k in unexpected if state is not None and isinstance(state.get(k), Mapping))
        if nested:  # {"model": state_dict, "optimizer": ...}
            hint = (f"; it holds mappings under {nested[:4]}: a training checkpoint, not a state_dict (pass its "
                    f"model's state_dict, e.g. torch.load(path)[{nested[0]!r}])")
        else:
            for prefix in ("module.", "_orig_mod.", "model."):  # DataParallel/DDP, torch.compile, a wrapper
                if unexpected and {k.removeprefix(prefix) for k in unexpected if k.startswith(prefix)} >= set(missing):
                    hint = (f"; its keys carry the prefix {prefix!r} (a wrapped model's state_dict): strip it, "
                            f"{{k.removeprefix({prefix!r}): v for k, v in state.items()}}")
                    break
        index = f"checkpoints[{index}]" if isinstance(index, int) else f"checkpoint {index!r}"
        raise ValueError(f"{index} does not match the model's state_dict: missing keys "
                         f"{missing[:8]}{'…' if len(missing) > 8 else ''}, unexpected keys "
                         f"{unexpected[:8]}{'…' if len(unexpected) > 8 else ''}{hint}")

    def _check_dataset(self, dataset, name):
        if not isinstance(dataset, Dataset) and not hasattr(dataset, "__getitem__"):
            raise TypeError(f"{name} must be a map-style torch Dataset (with __len__ and __getitem__), got "
                            f"{type(dataset).__name__}")
        try:
            n = len(dataset)
        except TypeError:
            raise TypeError(f"{name} must have a length (map-style Dataset), got {type(dataset).__name__}") from None
        if n == 0:
            raise ValueError(f"{name} is empty (0 examples)")
        if name == "train_dataset" and self.run.example_stages is not None and len(self.run.example_stages) != n:
            raise ValueError(f"run.example_stages has {len(self.run.example_stages)} entries but train_dataset has "
                             f"{n} examples; they must match")
        return n

    # ---------------------------------------------------------------------------- model states
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if next(self.model.parameters()).dtype == torch.float64 else torch.float32

    @contextmanager
    def _session(self):
        """Eval mode, tracked weights requiring grad; model state and mode restored afterwards."""
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        was_training = self.model.training
        flags = [(p, p.requires_grad) for layer in self.layers for p in layer.module.parameters(recurse=False)]
        self.model.eval()
        for p, _ in flags:
            p.requires_grad_(True)
        try:
            yield
        finally:
            self.model.load_state_dict(saved)
            for p, flag in flags:
                p.requires_grad_(flag)
            self.model.train(was_training)
            self._state_cache.clear()

    def _load(self, unit: Unit):
        if unit.uid not in self._state_cache:
            which = int(unit.uid[4:]) if unit.uid.startswith("ckpt") else unit.uid  # "ckpt<i>": checkpoints[i]
            state = self._matched(unit.load(), which)
            if len(self._state_cache) >= 8:  # bound memory: states are reloaded when evicted
                self._state_cache.clear()
            self._state_cache[unit.uid] = state
        self.model.load_state_dict(self._state_cache[unit.uid])

    def _units(self) -> list[Unit]:
        """Model states whose gradients the method uses (the same for curvature and scoring)."""
        run = self.run
        final = len(run.checkpoints) - 1
        ckpt = lambda i, seg: Unit(f"ckpt{i}", lambda i=i: run.load_checkpoint(i), seg)  # noqa: E731
        if self.method in ("influence", "gradient_dot"):
            return [ckpt(final, 0)]
        if self.method == "fast_source":
            return [Unit(f"avg{s.index}", lambda s=s: run.averaged_state(s.checkpoints), s.index)
                    for s in run.segments]
        return [ckpt(i, s.index) for s in run.segments for i in s.checkpoints]

    def _segments(self):
        """(c, num_steps, stage) per segment used by the operators; one segment for influence."""
        if self.method == "influence":
            c = sum(s.c for s in self.run.segments)
            return [(c, self.run.total_steps, 0)]
        return [(s.c, s.num_steps, s.stage) for s in self.run.segments]

    # ---------------------------------------------------------------------------------- data
    def _loader(self, dataset):
        return batches(dataset, self.batch_size, self.collate_fn)

    def _to_device(self, batch):
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device)
        if isinstance(batch, Mapping):
            return type(batch)({k: self._to_device(v) for k, v in batch.items()}) if isinstance(batch, dict) \
                else {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(v) for v in batch)
        return batch

    def _rows(self, dataset, *, loss: str, desc: str, seed_key: int = 0, first_batch: int = 0,
              paired: bool = False, sources: dict | None = None, gradient_form: bool = False,
              covariance_form: bool = False, formed: str | None = None, keep_positions: bool = False
              ) -> Iterator[tuple]:
        """Yield (offset, batch_size, {layer: (a [B,T,I], g [B,T,O])}) over the dataset.

        loss: 'sampled' / 'empirical' (training loss with sampled / true labels) or 'measurement'.
        g is the gradient of the task's summed loss, i.e. per-example gradients of per-example terms.
        first_batch: start at that batch (the same batches and label seeds as a full pass).
        paired: also yield the true-label rows of the same forward pass, (offset, size, rows,
        true_rows) sharing the a tensors: for 'sampled' through the task's compute_train_loss_pair and
        a second backward over the kept graph; for 'empirical' they are the rows themselves.
        sources: a dict refilled before each yield with `Capture.sources()` of that batch (what a row cache
        keeps of a conv layer's rows: its module input), valid until the next batch.
        gradient_form: for passes that use the rows only through G_n (`Capture.rows`): a depthwise convolution's
        groups as their per-example gradients. formed (with gradient_form; for users that take `rows.Formed`):
        "groups" gives those groups as `Formed` (scoring: one GEMM per group instead of the kernel on identity
        token rows); "all" also forms the conv layers a row cache keeps as G_n, as it forms them
        (`rows.with_formed_gradients`), for the eigen-correction pass, whose factors are then bitwise the same
        whether a batch was kept or not (not for scoring: the kernels contract those layers' rows faster than a
        product forms G_n). covariance_form: for the covariance pass, their a as a `Rebuilt`. keep_positions: no
        padding cut (`Capture.rows`): row t of every layer is the batch's token position t.
        """
        offset = first_batch * self.batch_size
        end = len(dataset)
        if offset >= end:
            return
        if first_batch:
            dataset = Subset(dataset, range(offset, len(dataset)))

        def forward(batch, b):
            """(value, true_value or None) of the batch's forward: the same label draws every time it runs."""
            if loss == "measurement":
                return self.task.compute_measurement(batch, self.model), None
            if loss != "sampled":
                return self.task.compute_train_loss(batch, self.model, sample=False), None
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                _seed_draws(self.device, hash((self.seed, seed_key, b)) % (2**63))
                if paired:
                    return _loss_pair(self.task.compute_train_loss_pair(batch, self.model))
                return self.task.compute_train_loss(batch, self.model, sample=True), None

        with Capture(self.layers, copied=self._copied_outputs) as capture:
            for b, batch in enumerate(tqdm(self._loader(dataset), desc=desc, disable=not self.progress,
                                           leave=False), start=first_batch):
                batch = self._to_device(batch)
                mask = attention_mask(self.task, batch)
                while True:
                    value, true_value = forward(batch, b)
                    _check_scalar(value, "compute_measurement" if loss == "measurement" else "compute_train_loss")
                    try:
                        rows = capture.rows(value, mask, retain_graph=true_value is not None,
                                            gradient_form=gradient_form, covariance_form=covariance_form,
                                            keep_positions=keep_positions)
                        break
                    except OutputChangedInPlace:  # those modules now hand the model copies: the forward again
                        capture.clear()
                size = next(iter(rows.values()))[1].shape[0]  # g: a may be a Rebuilt (covariance_form)
                if size != min(self.batch_size, end - offset):
                    raise ValueError(
                        f"the tracked layers see {size} examples along dim 0 of their inputs, but batch {b} holds "
                        f"{min(self.batch_size, end - offset)} of the dataset's examples: source_fast reads dim 0 of "
                        f"a tracked module's input as the examples, one score each (a model that flattens tokens "
                        f"into dim 0, x.view(-1, d), before its Linears needs them fed [B, T, d]; a collate_fn must "
                        f"keep one batch row per dataset example)")
                if gradient_form and formed:  # layers as the G_n a row cache keeps of them (rows.Formed)
                    rows = with_formed_gradients(rows, capture.sources(), capture.gradient_form_layers(),
                                                 convs=formed == "all")
                if sources is not None:
                    sources.clear()
                    sources.update(capture.sources())
                if not paired:
                    yield offset, size, rows
                elif true_value is None:
                    yield offset, size, rows, rows
                else:
                    yield offset, size, rows, capture.paired_rows(true_value, rows)
                offset += size
                capture.clear()

    def _stage_subset(self, dataset, stage):
        if self.run.example_stages is None or stage is None:
            return dataset
        idx = torch.nonzero(self.run.example_stages == stage).flatten().tolist()
        return Subset(dataset, idx)

    def _stage_sizes(self, n_train):
        sizes = self.run.stage_sizes(n_train)
        for j, size in enumerate(sizes):
            if size == 0 and self.method != "influence":
                raise ValueError(f"stage {j} has no training examples in run.example_stages")
        return sizes

    # ------------------------------------------------------------------------------------ fit
    def _factor_config(self, n_train):
        return {
            "method": self.method, "fisher": self.fisher, "seed": self.seed, "n_train": n_train,
            "layers": {layer.name: [layer.out_features, layer.in_features] for layer in self.layers},
            "run": self.run.fingerprint(), "dtype": str(self.compute_dtype),
        }

    def _path(self, *parts):
        return None if self.output_dir is None else self.output_dir.joinpath(*parts)

    def _load_or_compute(self, path, config, keys, compute):
        if path is not None and path.exists():
            try:
                tensors, _ = io.load_tensors(path, config, keys)
                return tensors
            except io.StoreMismatchError:
                if not self.overwrite:
                    raise
            except io.CorruptStoreError as exc:
                log.warning("source_fast: recomputing %s (%s)", path, exc)
        tensors = compute()
        if path is not None:
            io.save_tensors(path, tensors, config)
        return tensors

    def fit(self, train_dataset) -> "SourceAnalyzer":
        """Fit the EK-FAC curvature of every segment (no-op for tracin / gradient_dot)."""
        n_train = self._check_dataset(train_dataset, "train_dataset")
        if self.method in ("tracin", "gradient_dot"):
            self._n_fit = n_train
            return self
        config = self._factor_config(n_train)
        stored = self._load_segment_blocks(config)
        if stored is not None:  # a finished fit under this configuration: nothing to recompute
            self.blocks, self._n_fit = stored, n_train
            return self
        units = self._units()
        with self._session():
            self.blocks = [self._fit_segment(train_dataset, seg, units, config)
                           for seg in range(len(self._segments()))]
        self._n_fit = n_train
        return self

    def _fit_segment(self, train_dataset, seg, units, config, kept_for_scoring: "RowCache | None" = None
                     ) -> dict[str, EKFACBlock]:
        """Segment `seg`'s EK-FAC blocks (stored as factors/segment_<seg>.safetensors).

        Per member checkpoint a covariance pass, then the segment's basis, then per member an
        eigen-correction pass. The two passes of a unit draw the same batches with the same label seeds,
        so rows kept from the first (within SOURCE_FAST_ROW_CACHE_MIB) replace the second's forward and
        backward. kept_for_scoring: also keep the covariance passes' true-label rows there (same
        budget), for scoring this segment without another pass (`_segment_major_pairwise`)."""
        dt = self.compute_dtype
        # Each segment's curvature comes from its stage's data; the influence function (one segment over
        # the whole run) uses every training example.
        stage = None if self.method == "influence" else self._segments()[seg][2]
        members = [(k, unit) for k, unit in enumerate(units) if unit.segment == seg]
        cache = RowCache(kept_for_scoring.budget if kept_for_scoring is not None else RowBudget(
            _config.row_cache_bytes()))
        covs = {unit.uid: self._fit_covariance(train_dataset, unit, k, len(units), config, stage, cache,
                                               kept_for_scoring) for k, unit in members}
        basis = {}
        for layer in self.layers:
            A = sum(covs[u.uid][f"{layer.name}.A"].double() for _, u in members) / len(members)
            S = sum(covs[u.uid][f"{layer.name}.S"].double() for _, u in members) / len(members)
            _, q_a = ekfac.eigen_basis(A, name=layer.name, segment=seg, check_finite=self.check_finite)
            _, q_s = ekfac.eigen_basis(S, name=layer.name, segment=seg, check_finite=self.check_finite)
            basis[layer.name] = (q_a.to(dt).to(self.device), q_s.to(dt).to(self.device))
        del covs
        lams = {unit.uid: self._fit_lambda(train_dataset, unit, k, len(units), config, stage, basis, cache)
                for k, unit in members}
        cache.clear()
        seg_blocks = {}
        for layer in self.layers:
            lam = sum(lams[u.uid][f"{layer.name}.lam"].to(self.device) for _, u in members) / len(members)
            lam = ekfac.clamp_lambda(lam, name=layer.name, segment=seg, check_finite=self.check_finite)
            q_a, q_s = basis[layer.name]
            # Contiguous, exactly as a later fit() loads them back: bitwise the same scores either way.
            seg_blocks[layer.name] = EKFACBlock(q_a.contiguous(), q_s.contiguous(), lam.to(dt).contiguous())
        if self.output_dir is not None:
            tensors = {f"{n}.{k}": getattr(b, k) for n, b in seg_blocks.items() for k in ("q_a", "q_s", "lam")}
            io.save_tensors(self._path("factors", f"segment_{seg}.safetensors"), tensors, config,
                            segment=seg, layers=[layer.name for layer in self.layers])
        return seg_blocks

    def _load_segment_blocks(self, config):
        """Every segment's stored EK-FAC blocks when all were written under `config`, else None (a
        missing, partial or corrupt set is recomputed from the per-checkpoint factors; a different
        configuration raises there unless overwrite=True)."""
        if self.output_dir is None:
            return None
        keys = [f"{layer.name}.{k}" for layer in self.layers for k in ("q_a", "q_s", "lam")]
        blocks = []
        for seg in range(len(self._segments())):
            path = self._path("factors", f"segment_{seg}.safetensors")
            if not path.exists():
                return None
            try:
                tensors, _ = io.load_tensors(path, config, keys)
            except (io.StoreMismatchError, io.CorruptStoreError):
                return None
            blocks.append({layer.name: EKFACBlock(*(tensors[f"{layer.name}.{k}"].to(self.compute_dtype).to(self.device)
                                                    for k in ("q_a", "q_s", "lam"))) for layer in self.layers})
        return blocks

    def _fit_covariance(self, train_dataset, unit, k, n_units, config, stage, cache, kept_for_scoring=None):
        """A unit's activation and gradient covariances (A, S), stored as packed upper triangles.
        kept_for_scoring: a cache for the pass's true-label rows (None: not kept)."""
        def compute():
            self._load(unit)
            data = self._stage_subset(train_dataset, stage)
            acc = {}
            n = 0
            sources = {}  # the caches keep a conv layer's module input, not its patch rows
            for _, size, rows, *paired in self._rows(data, loss=self.fisher, seed_key=k,
                                                     desc=f"covariance {unit.uid} ({k + 1}/{n_units})",
                                                     paired=kept_for_scoring is not None, sources=sources,
                                                     covariance_form=True):
                n += size
                # What the caches keep of these rows (conv layers' G_n or module inputs), made once they fit.
                formed = formed_layers(rows, sources)
                kept = functools.lru_cache(maxsize=1)(lambda rows=rows: kept_rows(rows, sources, formed))
                cached = cache.offer(unit.uid, size, kept, nbytes=kept_nbytes(rows, sources, formed))
                if paired:  # the a rows are shared: counted once while the fit's cache holds them
                    true_rows = paired[0]
                    if true_rows is rows:
                        kept_true, extra = kept, 0 if cached else kept_nbytes(rows, sources, formed)
                    else:
                        kept_true = functools.partial(kept_rows, true_rows, sources, formed)
                        extra = kept_nbytes(true_rows, sources, formed, shared_a=cached)
                    kept_for_scoring.offer(unit.uid, size, kept_true, nbytes=extra)
                self._add_covariances(acc, rows)
            out = {}
            for name, (a_sum, s_sum) in acc.items():
                out[f"{name}.A"], out[f"{name}.S"] = a_sum.total() / n, s_sum.total() / n
                if self.check_finite:
                    for key in ("A", "S"):
                        if not bool(torch.isfinite(out[f"{name}.{key}"]).all()):
                            raise FloatingPointError(
                                f"covariance {key} of layer {name!r} at {unit.uid} (segment {unit.segment}) "
                                "contains NaN/Inf: non-finite activations or gradients in the training data "
                                "or model; pass check_finite=False to propagate")
            return _pack_symmetric(out)
        # Stored as packed upper triangles (symmetric factors: half the bytes on disk).
        keys = [f"{layer.name}.{x}_triu" for layer in self.layers for x in "AS"]
        packed = self._load_or_compute(self._path("factors", f"covariance_{unit.uid}.safetensors"), config, keys,
                                       compute)
        return _unpack_symmetric(packed)

    def _add_covariances(self, acc: dict, rows: dict) -> None:
        """Add one batch's Σ a aᵀ and Σ g gᵀ per layer to acc {layer: (CovarianceSum A, CovarianceSum S)}. A layer
        whose a is a `Rebuilt` of one input channel (a depthwise group, `Capture.rows` covariance_form) takes its
        A from that channel, every such group of a module in one `modules.conv_patch_covariance` call, and its S
        in one batched product with the module's other groups."""
        families = one_channel_families(rows)
        in_families = {name for _, names, _ in families for name in names}
        for name, (a, g) in rows.items():
            if name not in acc:
                in_features = next(layer.in_features for layer in self.layers if layer.name == name)
                acc[name] = tuple(CovarianceSum(w, self.compute_dtype, g.device, backend=self.backend,
                                                deterministic=self.deterministic) for w in (in_features, g.shape[-1]))
            if name not in in_families:
                acc[name][0].add_tokens(a.rows() if isinstance(a, Rebuilt) else a)
                acc[name][1].add_tokens(g)
        for module, names, x in families:
            a_sums = modules.conv_patch_covariance(module, x)
            # the groups' S = Σ g gᵀ ([m, m] each, m the channel multiplier) together: a view of the module's output
            # gradient where the groups' g are its consecutive channels; with m = 1 a sum of squares (≈ 10x the
            # batched product, which first copies g into [groups, rows, m])
            g = stacked([rows[name][1] for name in names]).to(self.compute_dtype)  # [groups, B, P, m]
            if g.shape[-1] == 1:
                s_sums = g.square().sum(dim=(1, 2))[:, :, None]
            else:
                g = g.reshape(len(names), -1, g.shape[-1])
                s_sums = torch.bmm(g.transpose(1, 2), g)
            for name, a_sum, s_sum in zip(names, a_sums, s_sums):
                acc[name][0].add_sum(a_sum)
                acc[name][1].add_sum(s_sum)

    def _fit_lambda(self, train_dataset, unit, k, n_units, config, stage, basis, cache):
        """A unit's eigenvalue correction Λ in its segment's basis (cached rows first, then the rest)."""
        dt = self.compute_dtype

        def compute():
            acc = {layer.name: torch.zeros(layer.out_features, layer.in_features, dtype=dt, device=self.device)
                   for layer in self.layers}
            n = 0

            sums = {name: LambdaSum(*basis[name], acc[name], backend=self.backend, deterministic=self.deterministic)
                    for name in acc}
            families = [GroupsLambdaSum(names, basis, acc) for names in self._one_channel_modules()]

            def accumulate(rows):
                done = set()
                for family in families:  # a depthwise module's groups, kept or given as their G_n
                    if all(isinstance(rows[name][0], Formed) for name in family.names):
                        family.add([rows[name][0].grads for name in family.names])
                        done.update(family.names)
                for name, (a, g) in rows.items():
                    if name not in done:
                        sums[name].add(a, g)
            cached = 0
            for size, rows in cache.take(unit.uid, gradient_form=True):
                n += size
                cached += 1
                accumulate(rows)
            self._load(unit)
            data = self._stage_subset(train_dataset, stage)
            for _, size, rows in self._rows(data, loss=self.fisher, seed_key=k, first_batch=cached,
                                            desc=f"eigen-correction {unit.uid} ({k + 1}/{n_units})",
                                            gradient_form=True, formed="all"):
                n += size
                accumulate(rows)
            for lam_sum in sums.values():
                lam_sum.flush()
            if self.check_finite:
                for name, lam in acc.items():
                    if not bool(torch.isfinite(lam).all()):
                        raise FloatingPointError(
                            f"eigenvalue correction Λ of layer {name!r} at {unit.uid} (segment "
                            f"{unit.segment}) contains NaN/Inf; pass check_finite=False to propagate")
            return {f"{name}.lam": lam * (self.run.loss_scale / n) for name, lam in acc.items()}
        keys = [f"{layer.name}.lam" for layer in self.layers]
        return self._load_or_compute(self._path("factors", f"lambda_{unit.uid}.safetensors"), config, keys, compute)

    def _one_channel_modules(self) -> list[list[str]]:
        """The names of the tracked groups of each module whose groups read one input channel (a depthwise
        convolution with more than one group), in layer order."""
        by_module: dict[int, list[str]] = {}
        for layer in self.layers:
            if layer.reads_one_channel and layer.groups > 1:
                by_module.setdefault(id(layer.module), []).append(layer.name)
        return list(by_module.values())

    def _ensure_fit(self, train_dataset):
        """Fit on train_dataset unless fit() already ran; returns N and N_ℓ per stage of the fitted set
        (scoring a subset of the training set keeps the full set's 1/N)."""
        if self._n_fit is None:
            log.info("source_fast: fitting curvature first (fit() was not called for this training set)")
            self.fit(train_dataset)
        return self._n_fit, self._stage_sizes(self._n_fit)

    # ------------------------------------------------------------------------------ operators
    def _damping_for(self, lam: torch.Tensor, c: float) -> float:
        d = self.damping
        if d == "heuristic":
            return ekfac.heuristic_damping(lam)
        if d == "source":
            return 1.0 / c
        return 0.0 if d is None else float(d)

    def _walk(self, u: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Adam runs: v per segment (training order) in parameter space for query directions u."""
        adam, adam_damping, adam_decay = self._adam_terms()
        return query_walk(u, self.blocks, self._operators(), adam=adam, adam_damping=adam_damping,
                          adam_decay=adam_decay, backend=self.backend)

    def _operators(self):
        """(r, s) spectral functions per segment (SGD forms; weight decay enters through `_decayed` blocks); per
        layer, {name: (r, s)}, when layers train at their own rate (`TrainingRun.lr_scale`: c → ratio × c)."""
        damping = 0.0 if self.damping in (None, "heuristic") else float(self.damping)

        def pair(c, steps):
            return ekfac.source_operators(c, damping=damping, operator=self.operator, eta=c / max(steps, 1),
                                          steps=steps)

        if not self.run.has_lr_scale:
            return [pair(c, steps) for c, steps, _ in self._segments()]
        scales = self._lr_scales()
        return [{name: pair(scales[name] * c, steps) for name in scales} for c, steps, _ in self._segments()]

    def _lr_scales(self) -> dict[str, float]:
        """Per tracked layer, the ratio of its learning rate to the run's (its weight's `lr_scale`)."""
        return {layer.name: self.run.parameter_lr_scale(layer.param_names()["weight"]) for layer in self.layers}

    def _check_parameter_names(self) -> None:
        """A per-parameter weight decay or lr_scale must name the model's parameters (a misspelt or prefixed name
        would silently give its layer none)."""
        known = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        for what, names in (("weight_decay", self.run.weight_decay), ("lr_scale", self.run.lr_scale)):
            unknown = [n for n in names if n not in known] if isinstance(names, dict) else []
            if unknown:
                raise ValueError(f"run.{what} names {len(unknown)} parameters the model does not have, e.g. "
                                 f"{unknown[:3]}; the model's are named like {sorted(known)[:3]}")

    def _layer_weight_decay(self, layer: TrackedLayer) -> tuple[float, float | None]:
        """(its weight's weight decay, its bias's or None without a bias)."""
        names = layer.param_names()
        bias = self.run.parameter_weight_decay(names["bias"]) if "bias" in names else None
        return self.run.parameter_weight_decay(names["weight"]), bias

    def _weight_decay_matrix(self, layer: TrackedLayer, like: torch.Tensor) -> torch.Tensor:
        """The layer's per-parameter weight decay in its [O, I] layout (bias column last), as `like`."""
        weight, bias = self._layer_weight_decay(layer)
        out = torch.full_like(like, weight)
        if bias is not None:
            out[:, -1] = bias
        return out

    @staticmethod
    def _decay_shift(block: EKFACBlock, weight: float, bias: float | None) -> torch.Tensor | float:
        """The eigenbasis diagonal (`EKFACBlock.eigen_diagonal`) of a layer's decay, wd on the weight and another on
        the bias column, in closed form: the columns of Q_S∘Q_S and rows of Q_A∘Q_A sum to 1, so it is
        wd + (wd_bias − wd)·Q_A[bias row, j]² ([1, I]; wd itself when the two agree: exact)."""
        if bias is None or bias == weight:
            return weight
        return weight + (bias - weight) * block.q_a[-1:, :].to(block.lam.dtype) ** 2

    def _decayed(self, blocks: dict[str, EKFACBlock]) -> dict[str, EKFACBlock]:
        """A segment's blocks for the SGD walk: Λ + the weight decay's diagonal in each eigenbasis (r and s of
        H̄ + diag(wd)). A layer decayed uniformly shifts Λ by wd exactly; one whose bias is decayed otherwise gets
        the projected diagonal (`_decay_shift`), EK-FAC's own approximation."""
        if not self.run.has_weight_decay:
            return blocks
        out = dict(blocks)
        for layer in self.layers:
            if layer.name in blocks:
                out[layer.name] = blocks[layer.name].shifted(
                    self._decay_shift(blocks[layer.name], *self._layer_weight_decay(layer)))
        return out

    def _adam_terms(self):
        """Per segment and layer: p̄, the accumulation inverse's δ, and (without weight decay: None) the weight
        decay's (rate in the exponent, shift of the inverse's Λ): (p̄ ⊙ wd, wd's eigen-diagonal) for Adam (L2 in
        the gradient), (wd, the eigen-diagonal of wd / p̄) for AdamW (decoupled). Computed once per fitted curvature
        (self-influence walks every batch)."""
        if not self.run.is_adam:
            return None, None, None
        if self._adam_cache is None or self._adam_cache[0] is not self.blocks:
            self._adam_cache = (self.blocks, self._compute_adam_terms())
        return self._adam_cache[1]

    def _compute_adam_terms(self):
        pbars, dampings, decays = [], [], []
        for seg in self.run.segments:
            per_layer, damp, decay = {}, {}, {}
            for layer in self.layers:
                names = layer.param_names()
                mats = []
                for i in seg.checkpoints:
                    moments = self.run.adam_second_moments[i]
                    missing = [n for n in names.values() if n not in moments]
                    if missing:
                        raise ValueError(f"adam_second_moments[{i}] lacks entries for {missing}")
                    mats.append(1.0 / (layer.to_matrix(moments[names["weight"]],
                                                        moments.get(names.get("bias", ""), None)).double().sqrt()
                                       + self.run.adam_eps))
                p_bar = sum(mats) / len(mats)
                per_layer[layer.name] = p_bar.to(self.compute_dtype).to(self.device)
                block = self.blocks[seg.index][layer.name]
                damp[layer.name] = ekfac.heuristic_damping(block.lam) if self.damping in (None, "heuristic") \
                    else float(self.damping)
                if self.run.has_weight_decay:
                    wd = self._weight_decay_matrix(layer, p_bar)
                    if self.run.optimizer == "adamw":  # decoupled: rate wd, inverse of H̄ + diag(wd / p̄)
                        rate = wd
                        shift = block.eigen_diagonal((wd / p_bar).to(block.q_a.device)).to(block.lam.dtype)
                    else:  # L2 in the gradient: rate p̄ ⊙ wd, inverse of H̄ + diag(wd)
                        rate = p_bar * wd
                        shift = torch.as_tensor(self._decay_shift(block, *self._layer_weight_decay(layer)),
                                                dtype=block.lam.dtype, device=block.lam.device).expand_as(block.lam)
                    decay[layer.name] = (rate.to(self.compute_dtype).to(self.device), shift)
            pbars.append(per_layer)
            dampings.append(damp)
            decays.append(decay)
        return pbars, dampings, decays if self.run.has_weight_decay else None

    # ----------------------------------------------------------------------------- gradients
    def _query_grads(self, query_dataset, desc, basis: dict[str, EKFACBlock] | None = None, *,
                     factors: bool = False) -> dict[str, torch.Tensor | RankOneDirections]:
        """∇f per query, per layer [Q, O, I], at the currently loaded model state; with `basis`,
        rotated into it (Q_Sᵀ ∇f Q_A, from the rotated rows: rank one per query with one token).
        factors=True: a layer whose queries all have one token is returned as its rank-one factors
        (`RankOneDirections`, rotated rows only) instead of the [Q, O, I] tensor."""
        rows_per_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {layer.name: [] for layer in self.layers}
        nonzero = dict.fromkeys(rows_per_layer, 0)
        nonzero_a = dict.fromkeys(rows_per_layer, 0)
        entries = dict.fromkeys(rows_per_layer, 0)
        entries_a = dict.fromkeys(rows_per_layer, 0)
        for _, _, rows in self._rows(query_dataset, loss="measurement", desc=desc, gradient_form=True):
            self._query_tokens = max(a.shape[1] for a, _ in rows.values())
            for name, (a, g) in rows.items():
                nonzero[name] += int(torch.count_nonzero(g))
                entries[name] += g.numel()
                nonzero_a[name] += int(torch.count_nonzero(a))
                entries_a[name] += a.numel()
                a, g = a.to(self.compute_dtype), g.to(self.compute_dtype)
                # Checked on the token rows (T·(O+I) per query, not O·I): a product of finite rows is finite.
                if self.check_finite and not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(g).all())):
                    raise FloatingPointError(f"query gradients of layer {name!r} contain NaN/Inf; pass "
                                             "check_finite=False to propagate")
                if basis is not None:
                    a, g = _rotate_rows(a, g, basis[name])
                rows_per_layer[name].append((a, g))  # T·(O+I) per query: small next to O·I
        self._query_g_density = {name: nonzero[name] / max(entries[name], 1) for name in nonzero}
        self._query_a_density = {name: nonzero_a[name] / max(entries_a[name], 1) for name in nonzero_a}
        grads: dict[str, torch.Tensor | RankOneDirections] = {}
        for name, parts in rows_per_layer.items():
            if factors and all(a.shape[1] == 1 for a, _ in parts):
                grads[name] = RankOneDirections(torch.cat([g[:, 0] for _, g in parts]),
                                                torch.cat([a[:, 0] for a, _ in parts]))
                continue
            # Written batch by batch into one [Q, O, I] tensor (no list of parts and a concatenated copy:
            # these are the largest tensors of a scoring call).
            _, g0 = parts[0]
            out = torch.empty(sum(a.shape[0] for a, _ in parts), g0.shape[2], parts[0][0].shape[2],
                              dtype=self.compute_dtype, device=self.device)
            offset = 0
            for a, g in parts:
                _per_example_grads(a, g, out=out[offset:offset + a.shape[0]])
                offset += a.shape[0]
            grads[name] = out
            parts.clear()
        return grads

    # -------------------------------------------------------------------------------- scoring
    def pairwise_scores(self, query_dataset, train_dataset) -> torch.Tensor:
        """Scores τ(z_q, z_m) as a CPU tensor ``[n_query, n_train]`` (fp32; float64 for a float64 model).

        Training examples are processed in blocks of ``score_block`` examples; within a block every
        scored model state makes one pass, for all queries at once. With an output_dir, each finished
        block is flushed to ``scores/pairwise_<method>.npy`` before it is marked done, and a rerun with
        the same configuration resumes from the finished blocks. SOURCE on SGD runs instead scores one
        segment at a time over all examples (one segment's directions held; resumable per segment through
        ``scores/pairwise_<method>.partial.safetensors``) unless holding the running [n_query, n_train] sum
        would cost more (`_segment_major_reason`, logged at DEBUG level).

        Called before fit() on a SOURCE analyzer (SGD, no per-stage example sets) whose task defines
        ``compute_train_loss_pair`` (or with fisher="empirical"), it fits and scores in one pass per
        checkpoint instead of two (`_segment_major_pairwise`; resumable per segment). Why it did not is
        logged at INFO level."""
        n_query = self._check_dataset(query_dataset, "query_dataset")
        n_train = self._check_dataset(train_dataset, "train_dataset")
        n_fit = self._n_fit if self._n_fit is not None else n_train  # an unfitted analyzer fits on train_dataset
        config = {**self._factor_config(n_fit), "n_query": n_query, "n_scored": n_train, "damping": self.damping,
                  "operator": self.operator}
        config.update(self._scoring_config())
        store = self._store(f"pairwise_{self.method}", (n_query, n_train), config)
        if self._n_fit is None:  # one pass per checkpoint when fit() has not run (see _segment_major_pairwise)
            reason = self._one_pass_reason(n_train, store)
            if reason is None:
                return self._segment_major_pairwise(query_dataset, train_dataset, n_query, n_train, store, config,
                                                    fit=True)
            log.info("source_fast: fit and scoring make separate passes: %s", reason)
        n_fit, stage_sizes = self._ensure_fit(train_dataset)
        reason = self._segment_major_reason(n_query, n_train, store)
        if reason is None:
            return self._segment_major_pairwise(query_dataset, train_dataset, n_query, n_train, store, config,
                                                fit=False)
        log.debug("source_fast: pairwise scores block by block: %s", reason)
        pending = range(self._num_blocks(n_train)) if store is None else store.pending()
        for b, block in self._pairwise_blocks(query_dataset, train_dataset, pending, n_fit, stage_sizes):
            self._emit(store, b, block)
        return self._result(store)

    def _one_pass_reason(self, n_train: int, store) -> str | None:
        """Why pairwise_scores cannot take its training gradients from the fit's passes (None: it can)."""
        if self._n_fit is not None:
            return "fit() already ran (its passes are over)"
        if self.method not in ("source", "fast_source"):
            return f"method {self.method!r} scores other model states than it fits"
        if self.run.is_adam:
            return "the Adam walk leaves the eigenbases"
        if self.run.example_stages is not None:
            return "segments fit on their own stages' examples"
        if self.fisher == "sampled" and not has_loss_pair(self.task):
            return "the task defines no compute_train_loss_pair (both training losses from one forward)"
        if _config.row_cache_bytes() == 0:
            return "SOURCE_FAST_ROW_CACHE_MIB=0"
        if store is not None and len(store.pending()) != self._num_blocks(n_train) \
                and not self._partial_path().exists():
            return "resuming score blocks stored by a run with separate passes"
        return None

    def _partial_path(self):
        return self._path("scores", f"pairwise_{self.method}.partial.safetensors")

    def _segment_major_reason(self, n_query: int, n_train: int, store) -> str | None:
        """Why pairwise_scores after fit() scores block by block instead of segment by segment (None: it does not)."""
        if self.method not in ("source", "fast_source"):
            return f"method {self.method!r} has no walk over segments"
        if self.run.is_adam:
            return "the Adam walk leaves the eigenbases"
        element = self.compute_dtype.itemsize
        nbytes = n_query * n_train * element
        if nbytes > SEGMENT_MAJOR_MAX_SCORE_BYTES:
            return (f"the running score sum ({nbytes / 2**20:.1f} MiB) would exceed "
                    f"{SEGMENT_MAJOR_MAX_SCORE_BYTES >> 20} MiB on {self.device}")
        # Segment by segment holds the running sum (beside the returned matrix) instead of L − 1 more directions.
        saved = (len(self.blocks) - 1) * n_query * element * sum(b.q_s.shape[0] * b.q_a.shape[0]
                                                                 for b in self.blocks[0].values())
        if not self._sums_in_result(store) and nbytes >= saved:
            return (f"the running score sum ({nbytes / 2**20:.1f} MiB) would outweigh the directions of the other "
                    f"segments ({saved / 2**20:.1f} MiB)")
        if store is not None and len(store.pending()) != self._num_blocks(n_train) \
                and not self._partial_path().exists():
            return "resuming score blocks stored block by block"
        return None

    def _sums_in_result(self, store) -> bool:
        """Whether segment-by-segment scoring sums into the returned matrix itself (no store, scores on the CPU)."""
        return store is None and self.device.type == "cpu"

    def _segment_major_pairwise(self, query_dataset, train_dataset, n_query: int, n_train: int, store,
                                score_config: dict, *, fit: bool) -> torch.Tensor:
        """SOURCE's pairwise scores one segment at a time, last to first: the query walk goes one step
        (`SegmentByStepWalk`), the segment's W_ℓ scores every training example into a running sum and is
        released (its buffers recycled for W_ℓ₋₁), so one W is held instead of L (on the MLP benchmark
        0.9 GB of 2.1, and the first touch of those pages). Same scores as the block-by-block schedule
        up to the order in which segments are summed.

        fit=True (pairwise_scores before fit(), `_one_pass_reason`): each segment is fitted right before
        it is scored, and scored from the true-label rows kept by its covariance passes (the same forward as
        the sampled-label rows: `Task.compute_train_loss_pair`): one training pass per checkpoint. A segment
        whose rows exceed SOURCE_FAST_ROW_CACHE_MIB (or whose factors were stored by an interrupted run) is
        scored by its own pass. fit=False: the fitted blocks, a scoring pass per checkpoint.

        With an output_dir, the running sum over finished segments is stored after each segment
        (scores/pairwise_<method>.partial.safetensors), so an interrupted run resumes without
        recomputing them."""
        units, segments = self._units(), self._segments()
        operators = self._operators()
        partial_path = self._partial_path()
        if self._sums_in_result(store):  # (no output_dir: nothing stored to resume from)
            scores, done = self._pending_result.zero_(), set()
        else:
            scores, done = self._load_partial(partial_path, score_config, (n_query, n_train))
        if fit:
            config = self._factor_config(n_train)
            stage_sizes = self._stage_sizes(n_train)
            blocks: list[dict[str, EKFACBlock] | None] = [None] * len(segments)
            if len(done) == len(segments):  # killed while writing the score blocks: the sum is complete
                blocks = self._load_segment_blocks(config) or blocks
        else:
            stage_sizes = self._stage_sizes(self._n_fit)
            blocks = list(self.blocks)
        sparse_ok = self._sparse_kernel_usable()
        finished = len(done) == len(segments) and all(b is not None for b in blocks)  # nothing to fit or score
        with self._session():
            walk = None
            for seg in reversed(range(len(segments)) if not finished else ()):
                members = [u for u in units if u.segment == seg]
                kept = None
                if fit:
                    limit = _config.row_cache_bytes()
                    kept = None if seg in done else RowCache(RowBudget(limit, per_unit=limit // len(members)))
                    blocks[seg] = self._fit_segment(train_dataset, seg, units, config, kept)
                if walk is None:
                    self._load(self._final_unit())
                    u_rot = self._query_grads(query_dataset, "query gradients", basis=blocks[seg])
                    walk = SegmentByStepWalk(u_rot, self.compute_dtype)
                    del u_rot
                output_side = self._output_side_layers(walk.current, len(members), n_train, sparse_ok)
                w = walk.step(seg, self._decayed(blocks[seg]), operators[seg], queries_innermost=output_side)
                if seg in done:
                    walk.recycle(w)
                    continue
                stage = segments[seg][2]
                weight = 1.0 / len(members) / stage_sizes[stage] * self.run.loss_scale  # as _score_plan
                group = self._prepared(self._cheaper_rotation((members, w, weight, stage, blocks[seg]), n_train))
                del w
                items = self._segment_rows(members, kept, group[4], train_dataset, seg)
                self._score_group_into(scores, 0, group, items, n_train)
                walk.recycle(group[1])
                del group, items
                if kept is not None:
                    kept.clear()
                done.add(seg)
                if partial_path is not None:
                    io.save_tensors(partial_path, {"scores": scores}, score_config, segments_done=sorted(done))
        if fit:
            self.blocks, self._n_fit = blocks, n_train
        if self.check_finite and not bool(torch.isfinite(scores).all()):
            raise FloatingPointError("pairwise scores are non-finite: non-finite training gradients? pass "
                                     "check_finite=False to propagate")
        if scores is not self._pending_result:
            for b in (range(self._num_blocks(n_train)) if store is None else store.pending()):
                cols_b = self._block_columns(b, n_train)
                self._emit(store, b, scores[:, cols_b[0]:cols_b[-1] + 1])
        result = self._result(store)
        if partial_path is not None and partial_path.exists():
            partial_path.unlink()
        return result

    def _load_partial(self, path, config, shape):
        """(running score sum, finished segments) of an interrupted one-pass run, else zeros and none."""
        if path is not None and path.exists():
            try:
                tensors, meta = io.load_tensors(path, config, ["scores"])
                if tuple(tensors["scores"].shape) == shape:
                    return (tensors["scores"].to(self.compute_dtype).to(self.device),
                            set(meta["info"].get("segments_done", [])))
            except (io.StoreMismatchError, io.CorruptStoreError) as exc:
                log.warning("source_fast: ignoring %s (%s)", path, exc)
        return torch.zeros(shape, dtype=self.compute_dtype, device=self.device), set()

    def _segment_rows(self, members, kept, basis, train_dataset, seg):
        """Scoring items of one segment, in `_stacked_rows`' order: the batches kept by every member's
        covariance pass (a common prefix), then a pass of its own over the rest (none when all were kept;
        all of them when the budget kept nothing, the factors were loaded, or kept is None: after fit())."""
        n = len(train_dataset)
        batches = kept.common_prefix([u.uid for u in members]) if kept is not None else 0
        start = min(n, batches * self.batch_size)
        if start < n and kept is not None:
            log.info("source_fast: segment %d: %d of %d training examples' rows kept (SOURCE_FAST_ROW_CACHE_MIB); "
                     "the rest scored by a pass of its own", seg, start, n)
        rest = Subset(train_dataset, range(start, n))

        def own_pass(units):
            if start < n:
                for offset, size, rows in self._stacked_rows(units, rest, basis, f"segment {seg}"):
                    yield start + offset, size, rows

        if len(members) == 1 or _config.stack_bytes() == 0:  # members one after another, as _stacked_rows
            for unit in members:
                yield from self._kept_rows([unit], kept, basis, batches)
                yield from own_pass([unit])
        else:
            yield from self._kept_rows(members, kept, basis, batches)
            yield from own_pass(members)

    def _kept_rows(self, members, kept, basis, batches):
        """`_stacked_rows` from the first `batches` batches kept by the covariance passes (released as used)."""
        if batches == 0:  # kept may be None (no rows were kept: scoring after fit())
            return
        offset = 0
        for parts in itertools.islice(zip(*(kept.take(unit.uid, gradient_form=True) for unit in members)), batches):
            yield offset, parts[0][0], member_lists([self._in_basis(rows, basis) for _, rows in parts])
            offset += parts[0][0]

    def _in_basis(self, rows, basis):
        """Training rows rotated into a segment's basis for scoring (layers missing from `basis` are scored
        against a direction in the original basis)."""
        if not basis:
            return rows
        dt = self.compute_dtype
        return {n: (a, g) if n not in basis else (Formed(_rotate_formed(a.grads.to(dt), basis[n])), None)
                if isinstance(a, Formed) else _rotate_rows(a.to(dt), g.to(dt), basis[n]) for n, (a, g) in rows.items()}

    def _scoring_config(self) -> dict:
        """The scoring options a stored score depends on, only those set (stores written before an option existed
        still resume)."""
        config = {}
        if self.score_dtype is not None:
            config["score_dtype"] = str(self.score_dtype)
        if self.query_rank is not None:
            config["query_rank"] = self.query_rank
        return config

    def _score_operands(self, x: torch.Tensor) -> torch.Tensor:
        """An operand of the scoring contraction in `score_dtype`. On CPU, 16-bit values are rounded and kept in
        the compute dtype: the same products (a product of two bf16 or fp16 values is exact in fp32) through the
        compiled fp32 kernels, since no CPU backend contracts 16-bit operands faster."""
        dt = self.score_dtype or self.compute_dtype
        if dt != self.compute_dtype and dt != torch.float32 and x.device.type == "cpu":
            return x.to(dt).to(self.compute_dtype)
        return x.to(dt)

    def _aligns_rows(self, x: torch.Tensor) -> bool:
        """Whether scoring operands are zero-padded to rows of ROW_ALIGN elements: on CUDA, where the Triton
        kernels need such rows (kernels/_common.padded) and would otherwise copy the query directions, the
        largest operand, on every call (a layer's inputs are d_in + 1 wide with the bias column)."""
        return x.device.type == "cuda" and self.backend in (None, "triton")

    def _prepared(self, group):
        """The group with its directions as the scoring contraction takes them: in `score_dtype`, and on CUDA
        zero-padded to aligned rows (`_aligns_rows`). Done once per group, not per block or chunk of rows."""
        members, v, weight, stage, basis = group
        v = {name: d.cast(self._score_operands) if isinstance(d, LowRankDirections) else self._score_operands(d)
             for name, d in v.items()}
        if any(self._aligns_rows(x) for x in v.values()):  # zeros add nothing to the scores
            v = {name: x if isinstance(x, LowRankDirections) else _row_aligned(x, 2) for name, x in v.items()}
        return members, v, weight, stage, basis

    def _score_group_into(self, block, first_col, group, items, n_train) -> None:
        """block[:, j] += weight · Σ_layers ⟨v, G_j⟩ for the training rows `items` of one group's members (a group
        from `_prepared`); block's column 0 is training example `first_col`."""
        _, v, weight, stage, _ = group
        in_stage = self._stage_mask(n_train, stage)
        cast = self._score_operands
        align = any(self._aligns_rows(x) for x in v.values())  # then each chunk's rows (much smaller) per call
        flat: dict[str, torch.Tensor] = {}  # directions [Q, O·I] of layers given as G_n (a copy if laid out otherwise)

        def scores(name, a, g):
            if isinstance(a, Formed):  # ⟨V_q, G_n⟩ for every (q, n): one GEMM (per-example gradients, CPU)
                if name not in flat:
                    flat[name] = as_dense(v[name]).reshape(v[name].shape[0], -1)
                return _linalg.matmul(flat[name], cast(a.grads.reshape(a.shape[0], -1)).T).to(self.compute_dtype)
            if isinstance(v[name], LowRankDirections):
                return ops.score_lowrank(v[name].u, v[name].w, cast(a), cast(g), backend=self.backend,
                                         deterministic=self.deterministic).to(self.compute_dtype)
            if align:
                a, g = _row_aligned(a, 1), _row_aligned(g, 1)
            return ops.score_pairwise(v[name], cast(a), cast(g), backend=self.backend,
                                      deterministic=self.deterministic).to(self.compute_dtype)

        def layer_scores(name, rows, size):
            if not isinstance(rows, Pieces):
                return scores(name, *rows)
            out = torch.zeros(len(block), size, dtype=self.compute_dtype, device=self.device)
            for col, a, g in rows:
                out[:, col:col + a.shape[0]] += scores(name, a, g)
            return out

        # Copies cost more than extra contractions for a conv layer's many positions on CPU; on GPU (unmeasured
        # there) every layer is stacked as before.
        stacks = None if self.device.type != "cpu" else (
            lambda name, tokens, examples, pieces: stacking_pays(*v[name].shape, tokens, examples, pieces))
        for offset, size, rows in merge_rows(items, _config.stack_bytes(), stacks):
            part = sum(layer_scores(name, layer_rows, size) for name, layer_rows in rows.items())
            if in_stage is not None:
                part = part * in_stage[first_col + offset:first_col + offset + size].to(part.dtype)
            block[:, offset:offset + size] += weight * part

    def top_k(self, query_dataset, train_dataset, k: int, *, largest: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming top-k training examples per query: (scores, indices), each ``[n_query, k]``.

        The score matrix is never held whole: blocks of ``score_block`` training examples are scored
        and merged into a running top-k, so memory is O(n_query · (k + score_block)) for any N.
        ``largest=False`` gives the strongest opponents (most negative τ). Ties keep the lower index."""
        self._check_dataset(query_dataset, "query_dataset")
        n_train = self._check_dataset(train_dataset, "train_dataset")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_train:
            raise ValueError(f"k must be an integer in [1, n_train={n_train}], got {k!r}")
        n_fit, stage_sizes = self._ensure_fit(train_dataset)
        values = indices = None
        for b, block in self._pairwise_blocks(query_dataset, train_dataset, range(self._num_blocks(n_train)),
                                              n_fit, stage_sizes):
            values, indices = ops.topk_update(values, indices, block.cpu(), b * self.score_block, k, largest)
        return values, indices

    def per_token_scores(self, query_dataset, train_dataset) -> torch.Tensor:
        """Each training token position's share of the scores: a CPU tensor ``[n_query, n_train, T]`` whose sum over
        the last dim is `pairwise_scores` (fp32; float64 for a float64 model).

        Position t of example m contributes Σ_states weight · Σ_layers g_{m,t}ᵀ V_q a_{m,t} (the op
        `score_per_token`; the same directions V_q and weights as pairwise_scores, for every method). T is the
        longest row count of any training batch (a batch's shorter examples and padded positions score 0). Every
        tracked layer must see the same positions (a transformer's Linear layers do; conv layers see their output
        positions): track the blocks of a language model, or one layer. Makes its own scoring pass per checkpoint
        after fit; with an output_dir each finished block of ``score_block`` examples is written to
        ``scores/per_token_<method>/`` and a rerun resumes."""
        from .per_token import per_token_scores

        return per_token_scores(self, query_dataset, train_dataset)

    def _pairwise_blocks(self, query_dataset, train_dataset, pending, n_fit, stage_sizes):
        """Yield (block index, scores [n_query, block]) for the pending blocks of training examples."""
        n_query, n_train = len(query_dataset), len(train_dataset)
        units = self._units()
        final_unit = self._final_unit()
        with self._session():
            if pending:
                plan = self._score_plan(query_dataset, units, final_unit, stage_sizes, n_fit, n_train)
                rotated: dict[int, torch.Tensor] = {}  # a direction shared by groups: rotated once
                groups = [self._prepared(self._cheaper_rotation(group, n_train, rotated))
                          for group in _group_plan(plan)]
                del rotated
                del plan  # directions the rotation replaced are freed now, not after scoring
            for b in pending:
                cols = self._block_columns(b, n_train)
                block = torch.zeros(n_query, len(cols), dtype=self.compute_dtype, device=self.device)
                for group in groups:
                    items = self._stacked_rows(group[0], Subset(train_dataset, cols), group[4], f"block {b + 1}")
                    self._score_group_into(block, cols[0], group, items, n_train)
                if self.check_finite and not bool(torch.isfinite(block).all()):
                    raise FloatingPointError(f"scores of training examples {cols[0]}..{cols[-1]} are non-finite: "
                                             "non-finite training gradients? pass check_finite=False to propagate")
                yield b, block

    def _cheaper_rotation(self, group, n_train, rotated=None):
        """A group scored in an eigenbasis contracts, per layer, one of three equal forms (`_rotation_plan`):

        - "rows": rotate every training token row (a Q_A, g Q_S: members·N·T·(I² + O²) flops);
        - "direction": rotate the direction back once (V = Q_S W Q_Aᵀ: Q·O·I·(O + I)), e.g. 12× fewer
          flops for 50 queries on 1000 35-token documents;
        - "output": rotate the direction back on its output side only (V' = Q_S W: Q·O²·I) and the rows'
          activations only, so the output gradients keep their exact zeros (ReLU-gated layers: about
          half) and the CPU's sparse kernel skips them (Q·I·nnz(g) instead of Q·N·O·I).
        "direction" is also chosen where the activations have exact zeros too (a ReLU layer's inputs): no row is
        rotated and the sparse-a-and-g kernel skips both (≈ Q·nnz(a)·nnz(g)). Its V is then laid out
        queries-innermost once here, as the sparse kernels read it.
        T and the zero fractions come from the query rows (known before the training pass).
        With query_rank, every layer's direction is truncated in the parameters' basis instead (`_low_rank`)."""
        if self.query_rank is not None:
            return self._low_rank(group)
        members, v, weight, stage, basis = group
        if basis is None:
            return members, {name: as_dense(x) for name, x in v.items()}, weight, stage, basis
        v, basis = dict(v), dict(basis)
        sparse_ok = self._sparse_kernel_usable()
        for layer in self.layers:
            name = layer.name
            plan = self._layer_rotation(name, v[name].shape, len(members), n_train, sparse_ok)
            if plan != "output" and isinstance(v[name], torch.Tensor) and _extension.is_queries_innermost(v[name]):
                v[name] = v[name].contiguous()  # laid out for a plan this one overrides (not expected)
            if plan == "direction":
                block = basis.pop(name)
                if sparse_ok and self._expects_sparse_kernel(name, v[name].shape, len(members), n_train):
                    # Q_S W Q_Aᵀ formed in the layout the sparse kernels read (once, not a copy per scoring call)
                    left = left_product_queries_innermost(block.q_s, v[name])
                    v[name] = right_product_queries_innermost(left, block.q_a.T)
                else:
                    v[name] = _parameter_basis(v[name], block)
            elif plan == "output":
                block = basis[name]
                basis[name] = _InputSideOnly(block)
                key = id(v[name])  # alive in the plan until all groups are built: ids are not reused
                if rotated is not None and key in rotated:  # (in place: never rotate a direction twice)
                    v[name] = rotated[key]
                else:
                    v[name] = left_product_queries_innermost(block.q_s, v[name])
                    if rotated is not None:
                        rotated[key] = v[name]
            else:
                v[name] = as_dense(v[name])
        return members, v, weight, stage, basis

    def _low_rank(self, group):
        """The group with each layer's direction truncated to rank query_rank per query (`directions.truncated`) and
        its factors rotated to the parameters' basis (U = Q_S U_W, W = Q_A W_W: the truncation of V = Q_S W Q_Aᵀ, as
        the bases are orthogonal): the training rows are scored unrotated."""
        members, v, weight, stage, basis = group
        out = {}
        for name, x in v.items():
            _, o, i = x.shape
            if self._query_tokens * self.query_rank * (o + i) >= o * i and name not in self._costlier_low_rank:
                self._costlier_low_rank.add(name)
                log.info("source_fast: query_rank=%d costs more than exact scoring for layer %r ([%d, %d]) with "
                         "%d-token queries: T·R·(O + I) ≥ O·I multiply-adds per pair (it pays for wide layers with few "
                         "tokens per example)", self.query_rank, name, o, i, self._query_tokens)
            low = truncated(as_dense(x).contiguous(), self.query_rank)  # (a queries-innermost layout too)
            if basis is None:
                out[name] = low
            elif isinstance(low, LowRankDirections):  # orthogonal bases: rotate the factors, not V (R ≪ O, I)
                block = basis[name]
                out[name] = LowRankDirections(_linalg.matmul(block.q_s.to(low.dtype), low.u),
                                              _linalg.matmul(block.q_a.to(low.dtype), low.w))
            else:
                out[name] = _parameter_basis(low, basis[name])
        return members, out, weight, stage, None

    def _layer_rotation(self, name, shape, members, n_train, sparse_ok) -> str:
        """`_rotation_plan` for one layer's directions (shape [Q, O, I]) with the query rows' T and zeros."""
        return _rotation_plan(*shape, members, n_train, self._query_tokens, self._query_g_density.get(name, 1.0),
                              sparse_ok, self._query_a_density.get(name, 1.0))

    def _expects_sparse_kernel(self, name, shape, members, n_train) -> bool:
        """Whether the scoring calls of a layer (directions [Q, O, I]) on unrotated rows will take one of the CPU
        sparse kernels, by the query rows' zeros (the calls decide on the training rows' own)."""
        q, o, _ = shape
        return _extension.sparse_g_applies(q, members * self._query_tokens, n_train * o,
                                           self._query_g_density.get(name, 1.0))

    def _output_side_layers(self, directions, members, n_train, sparse_ok) -> set[str]:
        """Layers whose directions ([Q, O, I] per layer) a segment of `members` checkpoints scores by the
        "output" rotation, so the walk writes their W in the queries-innermost layout."""
        if self.query_rank is not None:  # truncated in the parameters' basis instead
            return set()
        return {name for name, x in directions.items()
                if self._layer_rotation(name, x.shape, members, n_train, sparse_ok) == "output"}

    def _sparse_kernel_usable(self) -> bool:
        """Whether score_pairwise would reach the CPU sparse-g kernel (fp32 on the CPU, compiled)."""
        if self.device.type != "cpu" or self.compute_dtype != torch.float32:
            return False
        backend = self.backend or _config.backend_override()
        if backend not in (None, "cpu"):
            return False
        from . import _dispatch

        return _dispatch.BACKENDS["cpu"].availability() is None and ("cpu", "score_pairwise") not in _dispatch._disabled

    def _stacked_rows(self, members, dataset, basis, desc):
        """Yield (offset, size, rows) for scoring `dataset` against one direction shared by `members`
        (the checkpoints of one segment), rows rotated into `basis` when given. rows maps each layer to
        ([a per member], [g per member]); `merge_rows` stacks them along tokens, so ⟨W, Σ_k G_n^(k)⟩ is one
        contraction (the materialised kernel forms Σ_k G_n^(k) in cache) instead of one per checkpoint.

        The members' rows are held for a run of whole batches at a time, as many as fit
        SOURCE_FAST_STACK_MIB (at least one batch; at 0 the members are scored one after another)."""
        def member_rows(unit, subset):
            self._load(unit)
            for offset, size, rows in self._rows(subset, loss="empirical", desc=f"scoring {unit.uid} {desc}",
                                                 gradient_form=True, formed="groups"):
                yield offset, size, self._in_basis(rows, basis)

        budget = _config.stack_bytes()
        if len(members) == 1 or budget == 0:
            for unit in members:
                for offset, size, rows in member_rows(unit, dataset):
                    yield offset, size, member_lists([rows])
            return
        start, total = 0, len(dataset)
        while start < total:
            # The first member's batches until the held rows of all members would exceed the budget.
            first, held, used = member_rows(members[0], Subset(dataset, range(start, total))), [], 0
            for item in first:
                held.append(item)
                used += rows_nbytes(item[2])
                if used * len(members) >= budget:
                    break
            first.close()
            stop = start + sum(size for _, size, _ in held)
            part = Subset(dataset, range(start, stop))  # whole batches: the other members' batches align
            stacks = [held] + [list(member_rows(unit, part)) for unit in members[1:]]
            for parts in zip(*stacks):
                yield start + parts[0][0], parts[0][1], member_lists([p[2] for p in parts])
            start = stop

    # Scores of one block are a sum over (model state, direction, weight, stage) terms.
    def _score_plan(self, query_dataset, units, final_unit, stage_sizes, n_train, n_scored):
        """(model state, direction per layer, weight, stage, basis per layer or None) per scored state.

        With a basis, directions are W = f(Λ) ⊙ (Q_Sᵀ ∇f Q_A) in that segment's eigenbasis and the
        training rows are rotated (a Q_A, g Q_S) before scoring: ⟨v, G⟩ = ⟨W, Q_Sᵀ G Q_A⟩."""
        plan = []
        walked = bases = None
        if self.method in ("source", "fast_source", "influence"):
            self._load(final_unit)
            if self.method == "influence":
                c = self._segments()[0][0]
                blocks = self.blocks[0]
                u_rot = self._query_grads(query_dataset, "query gradients", basis=blocks, factors=True)
                weights = {n: spectral.evaluate(spectral.inverse(self._damping_for(blocks[n].lam, c)), blocks[n].lam)
                           for n in u_rot}
                # In place where dense: u_rot is ours and used once.
                walked = [{n: x.weighted(weights[n]) if isinstance(x, RankOneDirections)
                           else x.mul_(weights[n].to(x.dtype)) for n, x in u_rot.items()}]
                bases = self.blocks
            elif self.run.is_adam:  # the Adam walk leaves the eigenbasis
                walked = self._walk(self._query_grads(query_dataset, "query gradients"))
            else:
                u_rot = self._query_grads(query_dataset, "query gradients", basis=self.blocks[-1])
                # Layers that `_cheaper_rotation` will rotate on the output side get W in that layout.
                sparse_ok = self._sparse_kernel_usable()
                output_side = {(seg, name) for seg in range(len(self.blocks))
                               for name in self._output_side_layers(u_rot, sum(1 for u in units if u.segment == seg),
                                                                    n_scored, sparse_ok)}
                walked = rotated_walk(u_rot, [self._decayed(b) for b in self.blocks], self._operators(), consume=True,
                                      queries_innermost=output_side)
                bases = self.blocks
        for unit in units:
            c, _, stage = self._segments()[unit.segment]
            members = sum(1 for u in units if u.segment == unit.segment)
            basis = None
            if self.method == "tracin":
                self._load(unit)
                v = self._query_grads(query_dataset, f"query gradients {unit.uid}")
                if self.run.has_lr_scale:  # each layer's lr mass: its ratio × c
                    scales = self._lr_scales()
                    v = {n: x * scales[n] for n, x in v.items()}
                weight = c / members / stage_sizes[stage]
            elif self.method == "gradient_dot":
                self._load(final_unit)
                v = self._query_grads(query_dataset, "query gradients")
                weight = 1.0 / n_train
            else:
                v = walked[unit.segment]
                basis = bases[unit.segment] if bases is not None else None
                weight = 1.0 / members / (stage_sizes[stage] if self.method != "influence" else n_train)
            plan.append((unit, v, weight * self.run.loss_scale, stage, basis))
        return plan

    def _final_unit(self) -> Unit:
        last = len(self.run.checkpoints) - 1
        return Unit(f"ckpt{last}", lambda: self.run.load_checkpoint(last), -1)

    def _num_blocks(self, n_train):
        return (n_train + self.score_block - 1) // self.score_block

    def _block_columns(self, b, n_train):
        return list(range(b * self.score_block, min((b + 1) * self.score_block, n_train)))

    def _store(self, name, shape, config):
        self._pending_result = torch.empty(shape, dtype=self.compute_dtype)
        if self.output_dir is None:
            return None
        dtype = "float64" if self.compute_dtype == torch.float64 else "float32"
        return io.ScoreStore(self._path("scores"), name, shape, dtype, self.score_block, config,
                             overwrite=self.overwrite)

    def _emit(self, store, b, block):
        if store is None:
            cols = slice(b * self.score_block, b * self.score_block + block.shape[-1])
            self._pending_result[..., cols] = block.cpu()
        else:
            store.write(b, block.cpu().numpy())

    def _result(self, store):
        if store is None:
            return self._pending_result
        return torch.from_numpy(store.scores[...].copy())

    def _stage_mask(self, n_train, stage):
        if self.run.example_stages is None or self.method in ("influence", "gradient_dot"):
            return None
        return (self.run.example_stages == stage).to(self.device)

    def self_scores(self, train_dataset) -> torch.Tensor:
        """Self-influence τ(z_m, z_m) with ∇f = the example's own training-loss gradient, ``[n_train]``.

        Equal to the diagonal of pairwise_scores(train, train) when the measurement is the training
        loss. Stored and resumable in blocks like `pairwise_scores`."""
        n_train = self._check_dataset(train_dataset, "train_dataset")
        n_fit, stage_sizes = self._ensure_fit(train_dataset)
        config = {**self._factor_config(n_fit), "n_scored": n_train, "damping": self.damping,
                  "operator": self.operator}
        if self.score_dtype is not None and self.method == "influence":  # the only self-score it applies to
            config["score_dtype"] = str(self.score_dtype)
        store = self._store(f"self_{self.method}", (n_train,), config)
        plan = None  # spectral weights and basis changes of the walk, shared by every batch
        if self.method in ("source", "fast_source") and not self.run.is_adam:
            plan = WalkPlan([self._decayed(b) for b in self.blocks], self._operators(), self.compute_dtype)
        workspace: dict[str, torch.Tensor] = {}  # the walk's buffers, reused by every batch of this call
        with self._session():
            for b in (range(self._num_blocks(n_train)) if store is None else store.pending()):
                cols = self._block_columns(b, n_train)
                block = torch.zeros(len(cols), dtype=self.compute_dtype, device=self.device)
                if self.method == "influence":
                    self._influence_self(Subset(train_dataset, cols), block, n_fit)
                else:
                    for start in range(0, len(cols), self.batch_size):
                        idx = cols[start:start + self.batch_size]
                        block[start:start + len(idx)] = self._walked_self(Subset(train_dataset, idx), idx,
                                                                          n_fit, stage_sizes, plan, workspace)
                if self.check_finite and not bool(torch.isfinite(block).all()):
                    raise FloatingPointError(f"self-influence of training examples {cols[0]}..{cols[-1]} is "
                                             "non-finite; pass check_finite=False to propagate")
                self._emit(store, b, block)
        return self._result(store)

    def _influence_self(self, chunk, out, n_train):
        """⟨G_n, (H̄+δ)⁻¹ G_n⟩ in the eigenbasis: the fused score_self op (rank one: a GEMM, no G_n)."""
        self._load(self._units()[0])
        c = self._segments()[0][0]
        weights = {name: 1.0 / (b.lam.clamp_min(0) + self._damping_for(b.lam, c)) for name, b in self.blocks[0].items()}
        for offset, size, rows in self._rows(chunk, loss="empirical", desc="self-influence", gradient_form=True):
            for name, (a, g) in rows.items():
                b = self.blocks[0][name]
                out[offset:offset + size] += ops.score_self(self._score_operands(a), self._score_operands(g), b.q_s,
                                                            b.q_a, weights[name], backend=self.backend,
                                                            deterministic=self.deterministic).to(out.dtype)
        out *= self.run.loss_scale / n_train

    def _walked_self(self, chunk, idx, n_train, stage_sizes, plan, workspace):
        """One batch: token rows at every model state, then the walk with Q = batch.

        SGD runs walk in the eigenbases: ũ_ℓ = Q_Sᵀ u Q_A, the score of segment ℓ is
        Σ r(Λ_ℓ) ⊙ ũ_ℓ ⊙ (Q_Sᵀ ḡ_ℓ Q_A), and ũ moves to the next basis with the cross-basis products
        (Q_S^{ℓ−1}ᵀ Q_S^ℓ)[s(Λ_ℓ) ⊙ ũ_ℓ](Q_A^ℓᵀ Q_A^{ℓ−1}). With one token per example the final
        gradient rotates as a rank-one factor (O² + I² per example, not O²I + OI²) and each ḡ_ℓ is
        scored token-wise against W_ℓ without being formed, so only the L − 1 cross-basis products
        are full two-sided products (walk-then-score in parameter space needs 3L)."""
        units = self._units()
        segments = self._segments()
        final_unit = self._final_unit()
        stages = self.run.example_stages
        rows = {}
        for unit in units:
            self._load(unit)
            rows[unit.uid] = self._example_rows(chunk)
        if final_unit.uid in rows:  # the final model is also a scored checkpoint (source, influence)
            rows["final"] = rows[final_unit.uid]
        else:
            self._load(final_unit)
            rows["final"] = self._example_rows(chunk)
        out = torch.zeros(len(idx), dtype=self.compute_dtype, device=self.device)
        if self.method in ("tracin", "gradient_dot"):
            scales = self._lr_scales() if self.method == "tracin" else {}  # each layer's lr mass: its ratio × c
            for unit in (units if self.method == "tracin" else [final_unit]):
                seg = max(unit.segment, 0)
                c, _, stage = segments[seg]
                members = sum(1 for x in units if x.segment == seg)
                w = (c / members / stage_sizes[stage]) if self.method == "tracin" else 1.0 / n_train
                val = sum(scales.get(n, 1.0) * _per_example_grads(a, g).square().sum((1, 2))
                          for n, (a, g) in rows[unit.uid if unit.segment >= 0 else "final"].items())
                in_stage = self._chunk_stage(stages, idx, stage) if self.method == "tracin" else 1.0
                out += w * self.run.loss_scale * val * in_stage
            return out
        if self.run.is_adam:  # the walk leaves the eigenbasis (elementwise p̄ ⊙ diag H)
            u = {name: _per_example_grads(a, g) for name, (a, g) in rows["final"].items()}
            vs = self._walk(u)
            for seg, (c, _, stage) in enumerate(segments):
                members = [x for x in units if x.segment == seg]
                val = sum((vs[seg][n] * sum(_per_example_grads(*rows[x.uid][n]) for x in members)).sum((1, 2))
                          for n in u) / len(members)
                out += (self.run.loss_scale / stage_sizes[stage]) * val * self._chunk_stage(stages, idx, stage)
            return out
        last = len(segments) - 1
        # `workspace`: buffers kept across batches (the walk's directions are the largest tensors here).
        u_rot = {name: _rotate(a, g, self.blocks[last][name],
                               out=workspace_buffer(workspace, f"u:{name}", (a.shape[0], g.shape[2], a.shape[2]),
                                                    dtype=a.dtype, device=a.device))
                 for name, (a, g) in rows["final"].items()}

        def score(seg, name, w):  # W_ℓ of one layer: scored at once, its buffer is reused
            members = [x for x in units if x.segment == seg]
            stage = segments[seg][2]
            # The members' rows taken together (stacked along tokens): one pass over W_ℓ for the whole segment.
            val = _rotated_dot(w, [rows[x.uid][name] for x in members], self.blocks[seg][name]) / len(members)
            out.add_((self.run.loss_scale / stage_sizes[stage]) * val * self._chunk_stage(stages, idx, stage))

        rotated_walk_visit(u_rot, plan, score, workspace=workspace)
        return out

    def _chunk_stage(self, stages, idx, stage):
        if stages is None:
            return 1.0
        return (stages[idx] == stage).to(self.compute_dtype).to(self.device)

    def _example_rows(self, dataset):
        """Token rows {layer: (a [n,T,I], g [n,T,O])} of the training loss (true labels), no progress bar."""
        progress, self.progress = self.progress, False
        try:
            parts = {layer.name: ([], []) for layer in self.layers}
            for _, _, rows in self._rows(dataset, loss="empirical", desc="", gradient_form=True):
                for name, (a, g) in rows.items():
                    parts[name][0].append(a.to(self.compute_dtype))
                    parts[name][1].append(g.to(self.compute_dtype))
            return {name: (torch.cat(a), torch.cat(g)) for name, (a, g) in parts.items()}
        finally:
            self.progress = progress


def _loss_pair(pair) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"compute_train_loss_pair must return (sampled_loss, true_loss), got {type(pair).__name__}"
                        f"{'' if not isinstance(pair, (tuple, list)) else f' of length {len(pair)}'}")
    for value in pair:
        _check_scalar(value, "compute_train_loss_pair")
    return pair[0], pair[1]


def _check_scalar(value, method: str) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise TypeError(f"the task must return a scalar tensor (summed over the batch) from {method}, "
                        f"got {type(value).__name__}{tuple(getattr(value, 'shape', ()))}")


# Eigendecompositions above this size are logged before any pass (≈ 9 n³ flops each, per segment).
_LARGE_EIGH = 16384


def _available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device`: CUDA's free memory, or the host's MemAvailable (Linux);
    None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _pack_symmetric(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"x.A": [D, D]} -> {"x.A_triu": [D(D+1)/2]} (row-major upper triangle)."""
    return {f"{key}_triu": _upper_rows(m) for key, m in tensors.items()}


def _upper_rows(m: torch.Tensor) -> torch.Tensor:
    # On CPU row slices: no 2 x D(D+1)/2 int64 index tensors (2.9x faster at D = 2049); on a GPU one gather
    # (a slice per row would be D kernel launches).
    if m.device.type == "cpu":
        return torch.cat([m[r, r:] for r in range(m.shape[0])])
    rows, cols = torch.triu_indices(m.shape[0], m.shape[0], device=m.device)
    return m[rows, cols].contiguous()


def _unpack_symmetric(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of _pack_symmetric."""
    out = {}
    for key, packed in tensors.items():
        d = int(round(((8 * packed.numel() + 1) ** 0.5 - 1) / 2))
        upper = torch.zeros(d, d, dtype=packed.dtype, device=packed.device)
        if packed.device.type == "cpu":  # row slices (1.7x at D = 2049), as in _upper_rows
            start = 0
            for r in range(d):
                upper[r, r:] = packed[start:start + d - r]
                start += d - r
        else:
            rows, cols = torch.triu_indices(d, d, device=packed.device)
            upper[rows, cols] = packed
        m = upper + upper.T
        m.diagonal().copy_(upper.diagonal())
        out[key[:-len("_triu")]] = m
    return out


def _rotation_plan(q: int, o: int, i: int, members: int, n: int, t: int, g_density: float,
                   sparse_ok: bool, a_density: float = 1.0) -> str:
    """Cost model of `_cheaper_rotation`: 'rows', 'direction' or 'output' (see there)."""
    rows = members * n * t * (i * i + o * o)
    direction = q * o * i * (o + i)
    if direction < rows:
        return "direction"
    # Output side: where the sparse kernel runs. Stacked members (a segment's checkpoints, T' = members·t
    # tokens) are scored by one row of G_n per (n, o) with any nonzero g: the query's zero fractions
    # stand in for theirs (ReLU patterns barely move within a segment: 48-53 % nonzero per checkpoint,
    # 51-53 % for the union of two, on the MLP benchmark).
    if sparse_ok and _extension.sparse_g_applies(q, members * t, n * o, g_density):
        sparse_g = g_density * q * n * o * i  # the sparse-g kernel's contraction
        output = q * o * o * i + members * n * t * i * i + sparse_g
        if _extension.sparse_ag_applies(i, a_density) \
                and direction + _extension.sparse_ag_relative_time(i, a_density) * sparse_g < output:
            return "direction"  # rows unrotated: a's zeros are skipped as well
        if output < q * n * o * i:
            return "output"
    return "rows"


class _InputSideOnly:
    """A basis entry whose training rows rotate their activations only (a Q_A; g stays as it is)."""

    def __init__(self, block: EKFACBlock):
        self.block = block


ROW_ALIGN = 16  # elements; the Triton launchers' alignment (kernels/_common.ALIGN)


def _row_aligned(x: torch.Tensor, dims: int) -> torch.Tensor:
    """x with its last `dims` sizes zero-padded to multiples of ROW_ALIGN (x itself when they already are)."""
    pad = []
    for size in reversed(x.shape[-dims:]):
        pad += [0, -size % ROW_ALIGN]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def _parameter_basis(w, block: EKFACBlock | None) -> torch.Tensor:
    """A direction as a dense [Q, O, I] tensor in the parameters' basis, queries outermost: Q_S W Q_Aᵀ for W held in
    block's eigenbasis (block None: already in the parameters' basis)."""
    dense = as_dense(w).contiguous()  # (a queries-innermost layout too)
    if block is None:
        return dense
    return _linalg.matmul(block.q_s.to(dense.dtype), _linalg.matmul(dense, block.q_a.T.to(dense.dtype)))


def _rotate_formed(grads: torch.Tensor, entry) -> torch.Tensor:
    """Per-example gradients [n, O, I] in a basis entry's eigenbasis: Q_Sᵀ G_n Q_A (G_n Q_A for `_InputSideOnly`)."""
    if isinstance(entry, _InputSideOnly):
        return _linalg.matmul(grads, entry.block.q_a.to(grads.dtype))
    return rotate_in(grads, entry)


def _rotate_rows(a: torch.Tensor, g: torch.Tensor, entry) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(entry, _InputSideOnly):
        return _linalg.matmul(a, entry.block.q_a.to(a.dtype)), g
    return _linalg.matmul(a, entry.q_a.to(a.dtype)), _linalg.matmul(g, entry.q_s.to(g.dtype))


def _group_plan(plan):
    """Merge consecutive plan entries that score against the same direction with the same weight, stage
    and basis (the checkpoints of one segment): [(units, v, weight, stage, basis)]."""
    groups = []
    for unit, v, weight, stage, basis in plan:
        last = groups[-1] if groups else None
        if last is not None and last[1] is v and last[2] == weight and last[3] == stage and last[4] is basis:
            last[0].append(unit)
        else:
            groups.append(([unit], v, weight, stage, basis))
    return groups


def _per_example_grads(a: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """G_n = Σ_t g_{n,t} a_{n,t}ᵀ -> [n, O, I] (one batch only), into `out` when given."""
    if a.shape[1] == 1:  # an outer product: bmm with K = 1 is several times slower than broadcasting
        return torch.mul(g[:, 0, :, None], a[:, 0, None, :], out=out)
    return torch.bmm(g.transpose(1, 2), a, out=out)


def _rotated_dot(w: torch.Tensor, members: list[tuple[torch.Tensor, torch.Tensor]], block: EKFACBlock) -> torch.Tensor:
    """Per example ⟨W_n, Q_Sᵀ G_n Q_A⟩ -> [n], G_n = Σ over the members' rows (a, g) of Σ_t g aᵀ: token-wise,
    Σ_t (Q_Sᵀ g_{n,t})ᵀ W_n (Q_Aᵀ a_{n,t}) without forming G_n, or from G_n formed and rotated where that needs
    fewer multiply-adds (`_torch_ops.rotation_order`: a conv layer's many positions)."""
    t, (o, i) = sum(a.shape[1] for a, _ in members), w.shape[1:]
    if _torch_ops.rotation_order(t, o, i) == "materialize":
        return (w * rotate_in(sum(_per_example_grads(a, g) for a, g in members), block)).sum((1, 2))
    a = torch.cat([a for a, _ in members], 1) if len(members) > 1 else members[0][0]
    g = torch.cat([g for _, g in members], 1) if len(members) > 1 else members[0][1]
    gs, as_ = _linalg.matmul(g, block.q_s.to(g.dtype)), _linalg.matmul(a, block.q_a.to(a.dtype))
    return (torch.bmm(w, as_.transpose(1, 2)) * gs.transpose(1, 2)).sum((1, 2))


def _rotate(a: torch.Tensor, g: torch.Tensor, block: EKFACBlock, out: torch.Tensor | None = None) -> torch.Tensor:
    """Q_Sᵀ G_n Q_A for one batch -> [n, O, I] (into `out` when given); rank one per example when T = 1; from G_n
    formed first where that needs fewer multiply-adds (`_torch_ops.rotation_order`)."""
    if _torch_ops.rotation_order(a.shape[1], g.shape[2], a.shape[2]) == "materialize":
        return rotate_in(_per_example_grads(a, g), block, out=out)
    gs, as_ = _linalg.matmul(g, block.q_s.to(g.dtype)), _linalg.matmul(a, block.q_a.to(a.dtype))
    if a.shape[1] == 1:
        return torch.mul(gs[:, 0, :, None], as_[:, 0, None, :], out=out)
    return torch.bmm(gs.transpose(1, 2), as_, out=out)
