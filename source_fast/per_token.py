"""Per-token scores: which token positions of a training example carry its score.

τ(z_q, z_m) = Σ_states weight · Σ_layers ⟨V_q, G_m⟩ with G_m = Σ_t g_{m,t} a_{m,t}ᵀ (each state's direction V_q
and weight as `SourceAnalyzer.pairwise_scores` plans them), so each position t contributes
τ(z_q, z_m, t) = Σ_states weight · Σ_layers g_{m,t}ᵀ V_q a_{m,t} (the op `score_per_token`), and the contributions
sum to the pairwise score. As in Kronfluence's per-token scores, t indexes the positions of the tracked layers'
rows (a causal LM's input tokens; the gradient at position t carries every later token's loss through attention),
so every tracked layer must see the same positions. Directions are rotated back to the parameters' basis once per
segment; the training rows are scored as the layers see them (no padding cut: a padded position scores 0).
"""
from __future__ import annotations

import torch
from torch.utils.data import Subset

from . import io, ops
from ._extension import token_rows
from .directions import LowRankDirections


def per_token_scores(analyzer, query_dataset, train_dataset) -> torch.Tensor:
    """`SourceAnalyzer.per_token_scores` (see there)."""
    from .analyzer import _group_plan, _parameter_basis  # the analyzer imports this module

    n_query = analyzer._check_dataset(query_dataset, "query_dataset")
    n_train = analyzer._check_dataset(train_dataset, "train_dataset")
    tokens = _check_positions(analyzer, train_dataset)
    _check_output_memory(analyzer, n_query, n_train, tokens)
    n_fit, stage_sizes = analyzer._ensure_fit(train_dataset)
    config = {**analyzer._factor_config(n_fit), "n_query": n_query, "n_scored": n_train, "damping": analyzer.damping,
              "operator": analyzer.operator, "per_token": True, "score_block": analyzer.score_block,
              **analyzer._scoring_config()}
    num_blocks = analyzer._num_blocks(n_train)
    store = None if analyzer.output_dir is None else io.BlockFileStore(
        analyzer._path("scores"), f"per_token_{analyzer.method}", num_blocks, config, overwrite=analyzer.overwrite)
    done = {b: scores for b in range(num_blocks) if store is not None and (scores := store.read(b)) is not None}
    pending = [b for b in range(num_blocks) if b not in done]
    if pending:
        with analyzer._session():
            plan = analyzer._score_plan(query_dataset, analyzer._units(), analyzer._final_unit(), stage_sizes, n_fit,
                                        n_train)
            groups = []
            for group in _group_plan(plan):
                if analyzer.query_rank is not None:  # the same truncation as pairwise_scores', so they still agree
                    members, v, weight, stage, _ = analyzer._low_rank(group)
                else:
                    members, v, weight, stage, basis = group
                    v = {name: _parameter_basis(x, None if basis is None else basis[name]) for name, x in v.items()}
                groups.append((members, {name: x.cast(analyzer._score_operands) if isinstance(x, LowRankDirections)
                                         else analyzer._score_operands(x) for name, x in v.items()}, weight, stage))
            del plan
            for b in pending:
                done[b] = _block(analyzer, b, groups, train_dataset, n_query, n_train)
                if store is not None:
                    store.write(b, done[b])
    tokens = max(scores.shape[2] for scores in done.values())
    out = torch.zeros(n_query, n_train, tokens, dtype=analyzer.compute_dtype)
    for b, scores in done.items():
        cols = analyzer._block_columns(b, n_train)
        out[:, cols[0]:cols[-1] + 1, :scores.shape[2]] = scores
    return out


def _block(analyzer, b: int, groups, train_dataset, n_query: int, n_train: int) -> torch.Tensor:
    """Per-token scores [n_query, block size, T] of block b's training examples (T: the block's longest rows)."""
    cols = analyzer._block_columns(b, n_train)
    out = torch.zeros(n_query, len(cols), 0, dtype=analyzer.compute_dtype, device=analyzer.device)
    for members, v, weight, stage in groups:
        in_stage = analyzer._stage_mask(n_train, stage)
        for unit in members:
            analyzer._load(unit)
            for offset, size, rows in analyzer._rows(Subset(train_dataset, cols), loss="empirical",
                                                     desc=f"per-token scores {unit.uid} block {b + 1}",
                                                     keep_positions=True):
                tokens = _common_tokens(rows)
                if tokens > out.shape[2]:  # batches padded to their own longest example: the block grows to fit
                    out = torch.nn.functional.pad(out, (0, tokens - out.shape[2]))
                scores = out[:, offset:offset + size, :tokens]
                for name, (a, g) in rows.items():
                    a, g = analyzer._score_operands(a), analyzer._score_operands(g)
                    if isinstance(v[name], LowRankDirections):
                        part = _low_rank_per_token(v[name], a, g, backend=analyzer.backend,
                                                   deterministic=analyzer.deterministic)
                    else:
                        part = ops.score_per_token(v[name], a, g, backend=analyzer.backend,
                                                   deterministic=analyzer.deterministic)
                    if in_stage is not None:
                        part = part * in_stage[cols[0] + offset:cols[0] + offset + size].to(part.dtype)[None, :, None]
                    scores.add_(part.to(out.dtype), alpha=weight)
    if analyzer.check_finite and not bool(torch.isfinite(out).all()):
        raise FloatingPointError(f"per-token scores of training examples {cols[0]}..{cols[-1]} are non-finite: "
                                 "non-finite training gradients? pass check_finite=False to propagate")
    return out.cpu()


def _low_rank_per_token(v: LowRankDirections, a: torch.Tensor, g: torch.Tensor, *, backend=None,
                        deterministic=None) -> torch.Tensor:
    """Per-token scores [Q, N, T] of directions V_q = U_q W_qᵀ, Σ_r (g_{n,t}ᵀ U_q)_r (a_{n,t}ᵀ W_q)_r
    (Q·N·T·R·(O + I) multiply-adds instead of Q·N·T·O·I): `ops.score_lowrank` on the token rows, each (example,
    token) row an example of one token, as `score_per_token` runs `score_pairwise`'s kernels."""
    n, t, _ = a.shape
    scores = ops.score_lowrank(v.u, v.w, token_rows(a), token_rows(g), backend=backend, deterministic=deterministic)
    return scores.view(-1, n, t)


def _check_positions(analyzer, train_dataset) -> int:
    """The tracked layers' positions checked on the first batch at the final checkpoint, before any fit: their
    count there."""
    tokens = 0
    with analyzer._session():
        analyzer._load(analyzer._final_unit())
        first = Subset(train_dataset, range(min(analyzer.batch_size, len(train_dataset))))
        for _, _, rows in analyzer._rows(first, loss="empirical", desc="per-token positions", keep_positions=True):
            tokens = _common_tokens(rows)
    return tokens


def _check_output_memory(analyzer, n_query: int, n_train: int, tokens: int) -> None:
    """Raise before any pass when the result cannot fit in host memory: [n_query, n_train, T] with T at least the
    first batch's, held twice while the blocks are assembled."""
    from .analyzer import _available_bytes

    need = 2 * n_query * n_train * tokens * analyzer.compute_dtype.itemsize
    available = _available_bytes(torch.device("cpu"))
    if available is not None and need > available:
        raise ValueError(f"per_token_scores would hold [{n_query}, {n_train}, >= {tokens}] scores, at least "
                         f"{need / 2**30:.1f} GiB while they are assembled, but {available / 2**30:.1f} GiB of host "
                         f"memory are available: score fewer training examples at once, e.g. each query's strongest "
                         f"documents from top_k as a Subset of train_dataset (fit on all of it first)")


def _common_tokens(rows: dict) -> int:
    """The token positions every tracked layer's rows share, or a ValueError naming each layer's."""
    counts = {name: a.shape[1] for name, (a, _) in rows.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"per_token_scores needs every tracked layer to see the same token positions, but the layers "
                         f"see {counts} rows per example (conv layers see their output positions, a module called "
                         f"several times all its calls' tokens): pass tracked modules that share the positions, "
                         f"e.g. a transformer's blocks, or one layer")
    return next(iter(counts.values()))
