"""Counterfactual evaluation of attribution scores: LDS, retraining harness, subset removal.

Sign convention
---------------
A score ``tau[q, i]`` is a *removal effect*: the predicted change of the query measurement
``f(z_q, theta)`` when training example ``z_i`` is removed, ``f(theta without z_i) - f(theta)``.
``tau > 0`` means removing ``z_i`` raises ``f``; for ``f = loss`` that makes ``z_i`` a helpful
("proponent") example. Scores from any method can be evaluated here as long as they follow this
convention; a method with the opposite sign gets an LDS of about ``-LDS``, which the tests use to
pin the convention down.

Linear datamodeling score (``SOURCE_MATH.md`` section 6)
--------------------------------------------------------
Draw ``M`` subsets ``S_j`` holding ``alpha * N`` training examples each (``draw_subset_masks``),
retrain on every subset with several seeds and average the query measurements
(``run_counterfactual``). Additivity predicts ``g_j = -sum_{z in S_j} tau(z_q, z)`` (equal, up to
a constant that Spearman ignores, to the summed removal effects of the examples left out). The LDS
of a query is the Spearman correlation over ``j`` between measurements and predictions; ``lds``
averages it over queries and bootstraps a confidence interval. Any positive global rescaling of
``tau`` leaves the LDS unchanged, so methods that differ only in a constant factor score the same.

Retraining protocols
--------------------
What "retrain on ``S_j``" means is the caller's ``train_fn``; two protocols matter and an honest
evaluation reports both:

* **same epochs** (the usual LDS ground truth): each half-size subset is trained for as many epochs
  as the full run, so it gets half the steps and half the learning-rate mass;
* **same steps** (what SOURCE's derivation describes: removing examples from the attributed run
  itself): each subset is trained for as many steps, with the same learning-rate schedule, as the
  full run.

With brief training the two ground truths rank methods differently.

Subset removal test
-------------------
``subset_removal_test`` removes the top-``k`` proponents of correctly predicted queries, retrains,
and reports how often the prediction flips; a better attribution flips more predictions with
fewer removals.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io as io_module
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from tqdm.auto import tqdm

from .io import atomic_write_bytes, atomic_write_json

__all__ = ["draw_subset_masks", "lds", "run_counterfactual", "subset_removal_test"]

_MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT_VERSION = 1
# Bootstrap resamples are drawn in chunks of at most this many indices, so memory stays bounded
# for large query sets (1000 resamples x 10^5 queries would otherwise be 800 MB of int64).
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------
# Input conversion and validation
# ----------------------------------------------------------------------------------------------


def _to_numpy(value, name: str) -> np.ndarray:
    """Return ``value`` (numpy array, torch tensor or array-like) as a numpy array."""
    # torch is only consulted when the caller has already imported it: an object cannot be a
    # torch tensor otherwise, and this keeps the module free of a heavy import.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            # numpy has no bfloat16; float32 holds every bfloat16 value exactly.
            tensor = tensor.float()
        return tensor.numpy()
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"`{name}` must be a numpy array or torch tensor, got {type(value).__name__}"
        ) from exc


def _as_float_matrix(value, name: str, layout: str) -> np.ndarray:
    """Validate a finite 2-D floating array ``layout`` (e.g. "[n_query, n_train]"); return float64."""
    array = _to_numpy(value, name)
    if array.dtype.kind != "f" or array.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"`{name}` must have dtype float16, float32 or float64, got {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D {layout}, got {array.ndim}-D with shape {tuple(array.shape)}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))
        first = tuple(bad[0].tolist())
        raise ValueError(
            f"`{name}` must be finite, got {len(bad)} non-finite entries (first at index {first})"
        )
    return array


def _as_masks(value, name: str = "subset_masks") -> np.ndarray:
    """Validate subset masks ``[M, n_train]`` (bool, or integers that are all 0/1); return bool."""
    array = _to_numpy(value, name)
    if array.ndim != 2:
        raise ValueError(
            f"`{name}` must be 2-D [M, n_train], got {array.ndim}-D with shape {tuple(array.shape)}"
        )
    if array.dtype == np.bool_:
        return array
    if array.dtype.kind not in "iu":
        raise TypeError(f"`{name}` must be boolean (or 0/1 integers), got dtype {array.dtype}")
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"`{name}` must contain only 0 and 1, got values {np.unique(array)[:10].tolist()}")
    return array.astype(bool)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# LDS
# ----------------------------------------------------------------------------------------------


def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b``, both ``[M, Q]``.

    Ties get average ranks. A column that is constant in either input has no defined correlation
    and gets NaN. Returns float64 ``[Q]``.
    """
    rank_a = rankdata(a, method="average", axis=0)
    rank_b = rankdata(b, method="average", axis=0)
    rank_a -= rank_a.mean(axis=0)
    rank_b -= rank_b.mean(axis=0)
    # A constant column has M equal half-integer ranks, whose mean is exact, so its centred ranks
    # are exactly 0 and the correlation is 0 / 0 = NaN.
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rank_a * rank_b).sum(axis=0) / np.sqrt((rank_a**2).sum(axis=0) * (rank_b**2).sum(axis=0))


def _bootstrap_mean_ci(values: np.ndarray, n_bootstrap: int, ci: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of ``values.mean()``, resampling entries with replacement."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(n_bootstrap)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    for start in range(0, n_bootstrap, chunk):
        stop = min(start + chunk, n_bootstrap)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = 100.0 * (1.0 - ci) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def lds(
    scores,
    subset_masks,
    measurements,
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict:
    """Linear datamodeling score of removal-effect scores against retraining measurements.

    Args:
        scores: ``[n_query, n_train]`` removal effects ``tau(z_q, z_i)`` (``tau > 0``: removing
            ``z_i`` raises ``f(z_q)``). numpy array or torch tensor, float16/32/64 (bfloat16 tensors
            too), finite.
        subset_masks: ``[M, n_train]`` bool (or 0/1 integer); ``True`` = example kept in subset j.
        measurements: ``[M, n_query]`` true ``f(z_q, theta(S_j))``, averaged over training seeds.
            Same dtypes as ``scores``, finite.
        n_bootstrap: resamples of the queries for the confidence interval (>= 1).
        ci: confidence level of the interval, in (0, 1).
        seed: seed of the bootstrap generator; equal seeds give equal intervals.

    Returns:
        dict with
        ``"mean"`` (float): mean LDS over valid queries (NaN, with a warning, if none is valid);
        ``"per_query"`` (float64 ``[n_query]``): Spearman correlation over the M subsets between
        ``measurements[:, q]`` and ``g[:, q] = -sum_{i in S_j} scores[q, i]``; NaN for a query whose
        predictions or measurements are constant over the subsets;
        ``"ci"`` (``(low, high)``): percentile bootstrap interval of the mean over valid queries;
        ``"n_subsets"`` (M), ``"n_query"``, ``"n_valid"`` (queries with a finite LDS).

    Raises:
        TypeError: a wrong dtype.
        ValueError: a wrong ndim, mismatched sizes, M < 3, non-finite values, bad ``n_bootstrap``/``ci``.

    Example:
        >>> masks = draw_subset_masks(n_train=1000, num_subsets=100)
        >>> result = lds(scores, masks, measurements)  # doctest: +SKIP
        >>> result["mean"], result["ci"]  # doctest: +SKIP
    """
    scores = _as_float_matrix(scores, "scores", "[n_query, n_train]")
    masks = _as_masks(subset_masks)
    measurements = _as_float_matrix(measurements, "measurements", "[M, n_query]")
    n_query, n_train = scores.shape
    num_subsets = masks.shape[0]
    if n_query < 1 or n_train < 1:
        raise ValueError(f"`scores` must be non-empty [n_query, n_train], got shape {scores.shape}")
    if masks.shape[1] != n_train:
        raise ValueError(
            f"`subset_masks` must be [M, n_train] with n_train = {n_train} (from `scores`), "
            f"got shape {masks.shape}"
        )
    if num_subsets < 3:
        raise ValueError(
            f"`subset_masks` must hold at least 3 subsets (rows) for a rank correlation, "
            f"got M = {num_subsets}"
        )
    if measurements.shape != (num_subsets, n_query):
        raise ValueError(
            f"`measurements` must be [M, n_query] = ({num_subsets}, {n_query}) (M from `subset_masks`, "
            f"n_query from `scores`), got shape {measurements.shape}"
        )
    n_bootstrap = _check_positive_int(n_bootstrap, "n_bootstrap")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"`ci` must be in (0, 1), got {ci!r}")

    # Sum over kept examples; the sum over removed examples differs by a per-query constant.
    predictions = -(masks.astype(np.float64) @ scores.T)
    per_query = _spearman_columns(measurements, predictions)
    valid = per_query[np.isfinite(per_query)]
    if len(valid) == 0:
        warnings.warn(
            "lds: no query has a defined LDS (predictions or measurements are constant over the "
            "subsets for every query); returning NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        mean, interval = float("nan"), (float("nan"), float("nan"))
    else:
        mean = float(valid.mean())
        interval = _bootstrap_mean_ci(valid, n_bootstrap, ci, seed)
    return {
        "mean": mean,
        "per_query": per_query,
        "ci": interval,
        "n_subsets": num_subsets,
        "n_query": n_query,
        "n_valid": len(valid),
    }


def draw_subset_masks(n_train: int, num_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Draw ``num_subsets`` random subsets of ``round(alpha * n_train)`` training examples each.

    Subsets are drawn independently of each other, without replacement inside a subset, from
    ``numpy.random.default_rng(seed)``; equal arguments give equal masks.

    Returns:
        bool ``[num_subsets, n_train]``; ``True`` = example kept. Each row has exactly
        ``round(alpha * n_train)`` (Python rounding) ``True`` entries.
    """
    n_train = _check_positive_int(n_train, "n_train")
    num_subsets = _check_positive_int(num_subsets, "num_subsets")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}")
    subset_size = round(alpha * n_train)
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, n_train), dtype=bool)
    for row in masks:
        row[rng.choice(n_train, size=subset_size, replace=False)] = True
    return masks


# ----------------------------------------------------------------------------------------------
# Retraining harness with an atomic, resumable on-disk cache
# ----------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, payload: dict) -> None:
    atomic_write_json(path, payload)


def _write_npy_atomic(path: Path, array: np.ndarray) -> None:
    buffer = io_module.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def _masks_hash(masks: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(repr(masks.shape).encode())
    digest.update(np.packbits(masks, axis=1).tobytes())
    return digest.hexdigest()


def _result_path(cache_dir: Path, subset: int, seed: int) -> Path:
    return cache_dir / f"subset{subset:06d}_seed{seed:04d}.npy"


def _load_cached_result(path: Path, n_query: int) -> tuple[np.ndarray | None, str]:
    """Return ``(result, "")`` for a valid cached result, else ``(None, reason)``."""
    try:
        result = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        return None, f"unreadable ({exc})"
    if result.dtype != np.float64 or result.shape != (n_query,):
        return None, f"expected float64 shape ({n_query},), found {result.dtype} shape {result.shape}"
    if not np.isfinite(result).all():
        return None, "non-finite values"
    return result, ""


def _open_manifest(cache_dir: Path, identity: dict) -> int | None:
    """Create or check the cache manifest; return the recorded ``n_query`` (None if not known yet).

    ``identity`` (sizes and mask hash) must match an existing manifest exactly: results computed
    for other subsets or seeds must never be mixed into this run.
    """
    manifest_path = cache_dir / _MANIFEST_NAME
    if not manifest_path.exists():
        _write_json_atomic(manifest_path, {**identity, "n_query": None})
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"`cache_dir` manifest {manifest_path} is unreadable ({exc}); use a fresh cache_dir"
        ) from exc
    mismatches = [
        f"{key}: cached {manifest.get(key)!r}, requested {value!r}"
        for key, value in identity.items()
        if manifest.get(key) != value
    ]
    if mismatches:
        raise ValueError(
            f"`cache_dir` {cache_dir} holds results for a different run ({'; '.join(mismatches)}); "
            "use another cache_dir or delete this one"
        )
    return manifest.get("n_query")


def _init_worker() -> None:
    """Worker initializer: one intra-op thread per worker, so workers do not oversubscribe cores."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def _call_train_fn(train_fn: Callable, mask: np.ndarray, seed: int) -> np.ndarray:
    return np.asarray(_to_numpy(train_fn(mask, seed), "train_fn result"), dtype=np.float64)


def _check_result(result: np.ndarray, subset: int, seed: int, n_query: int | None) -> None:
    expected = "1-D [n_query]" if n_query is None else f"shape ({n_query},)"
    if result.ndim != 1 or (n_query is not None and result.shape != (n_query,)):
        raise ValueError(
            f"`train_fn` must return {expected}, got shape {result.shape} for subset {subset}, seed {seed}"
        )
    if not np.isfinite(result).all():
        raise ValueError(f"`train_fn` returned non-finite measurements for subset {subset}, seed {seed}")


def run_counterfactual(
    train_fn: Callable[[np.ndarray, int], np.ndarray],
    subset_masks,
    num_seeds: int,
    cache_dir,
    *,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Retrain on every subset with every seed and return the seed-averaged query measurements.

    Each job ``(subset j, seed s)`` calls ``train_fn(subset_masks[j], s)`` with ``s`` in
    ``range(num_seeds)``; the same seed values are used for every subset (common random numbers,
    which lowers the noise in differences between subsets). ``train_fn`` returns the measurements
    ``f(z_q, theta(S_j))`` of all queries, ``[n_query]``; which retraining protocol it follows
    (same epochs or same steps, see the module docstring) is its choice.

    Every result is saved as ``cache_dir/subset{j}_seed{s}.npy`` by an atomic write, next to a
    ``manifest.json`` holding ``num_subsets``, ``n_train``, ``num_seeds`` and a hash of the masks.
    A rerun with the same ``cache_dir`` loads valid results instead of recomputing them; a cached
    file that does not load, has the wrong shape or holds non-finite values is recomputed with a
    warning. Two runs must not share a ``cache_dir`` at the same time.

    Args:
        train_fn: ``train_fn(mask: bool [n_train], seed: int) -> [n_query]``. With
            ``num_workers > 0`` it must be picklable (a module-level function).
        subset_masks: ``[M, n_train]`` bool (or 0/1 integer); ``True`` = example kept.
        num_seeds: training seeds per subset (>= 1).
        cache_dir: directory for results and manifest; created if missing.
        num_workers: 0 runs jobs in this process; ``> 0`` runs them in a process pool of that
            size, each worker limited to one torch thread.
        progress: show a tqdm bar over jobs.

    Returns:
        float64 ``[M, n_query]``: measurements averaged over seeds, ready for ``lds``.

    Raises:
        ValueError: invalid arguments, a manifest that does not match this run, or a ``train_fn``
            result that is not finite ``[n_query]`` with one ``n_query`` for all jobs.
    """
    if not callable(train_fn):
        raise TypeError(f"`train_fn` must be callable, got {type(train_fn).__name__}")
    masks = _as_masks(subset_masks)
    num_subsets, n_train = masks.shape
    if num_subsets < 1 or n_train < 1:
        raise ValueError(f"`subset_masks` must be non-empty [M, n_train], got shape {masks.shape}")
    num_seeds = _check_positive_int(num_seeds, "num_seeds")
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise ValueError(f"`num_workers` must be a non-negative integer, got {num_workers!r}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)

    identity = {
        "format_version": _MANIFEST_FORMAT_VERSION,
        "num_subsets": num_subsets,
        "n_train": n_train,
        "num_seeds": num_seeds,
        "masks_sha256": _masks_hash(masks),
    }
    n_query = _open_manifest(cache_dir, identity)

    results: dict[tuple[int, int], np.ndarray] = {}
    pending: list[tuple[int, int]] = []
    for subset in range(num_subsets):
        for seed in range(num_seeds):
            path = _result_path(cache_dir, subset, seed)
            # n_query is recorded before the first result is written, so files found while it is
            # still unknown were not written by this harness and are recomputed too.
            if path.exists() and n_query is not None:
                cached, reason = _load_cached_result(path, n_query)
                if cached is not None:
                    results[subset, seed] = cached
                    continue
                warnings.warn(
                    f"run_counterfactual: cached result {path} is invalid ({reason}); recomputing",
                    RuntimeWarning,
                    stacklevel=2,
                )
            pending.append((subset, seed))

    def store(subset: int, seed: int, result: np.ndarray) -> None:
        nonlocal n_query
        _check_result(result, subset, seed, n_query)
        if n_query is None:
            n_query = len(result)
            _write_json_atomic(cache_dir / _MANIFEST_NAME, {**identity, "n_query": n_query})
        _write_npy_atomic(_result_path(cache_dir, subset, seed), result)
        results[subset, seed] = result

    total_jobs = num_subsets * num_seeds
    already_done = total_jobs - len(pending)
    with tqdm(total=total_jobs, initial=already_done, desc="retraining", disable=not progress) as bar:
        if num_workers == 0:
            for subset, seed in pending:
                store(subset, seed, _call_train_fn(train_fn, masks[subset], seed))
                bar.update()
        elif pending:
            pool = concurrent.futures.ProcessPoolExecutor(max_workers=num_workers, initializer=_init_worker)
            with pool:
                futures = {
                    pool.submit(_call_train_fn, train_fn, masks[subset], seed): (subset, seed)
                    for subset, seed in pending
                }
                try:
                    for future in concurrent.futures.as_completed(futures):
                        store(*futures[future], future.result())
                        bar.update()
                except BaseException:
                    # Finished results are already on disk; do not wait for queued jobs.
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise

    per_seed = np.stack(
        [np.stack([results[subset, seed] for seed in range(num_seeds)]) for subset in range(num_subsets)]
    )  # [M, num_seeds, n_query]
    return per_seed.mean(axis=1)


# ----------------------------------------------------------------------------------------------
# Subset removal test
# ----------------------------------------------------------------------------------------------


def subset_removal_test(
    scores,
    query_indices: Sequence[int],
    k_values: Sequence[int],
    retrain_fn: Callable[[np.ndarray, int], np.ndarray],
    *,
    labels=None,
    num_seeds: int = 1,
    progress: bool = True,
) -> dict:
    """Remove each query's top-k proponents, retrain, and count how often its prediction flips.

    For every selected query ``q`` and every ``k``, the training examples with the ``k`` largest
    *positive* scores ``scores[q, :]`` are removed (proponents: for ``f = loss``, ``tau > 0`` means
    the example lowers the query's loss). Examples with ``tau <= 0`` are never removed, so fewer
    than ``k`` are removed when the query has fewer than ``k`` proponents (see ``"num_removed"``).
    Ties are broken towards the lower training index. The model is then retrained on the rest with
    each seed and the query's prediction is checked.

    The queries should be ones the model trained on all data predicts correctly; then a flip means
    the removal made the prediction wrong. Cost: ``len(query_indices) * len(k_values) * num_seeds``
    calls of ``retrain_fn``.

    Args:
        scores: ``[n_query, n_train]`` removal effects, numpy or torch, float16/32/64, finite.
        query_indices: rows of ``scores`` to test, ``[n_selected]``, distinct.
        k_values: numbers of proponents to remove, each in ``[1, n_train]``.
        retrain_fn: ``retrain_fn(keep_mask: bool [n_train], seed: int) -> [n_selected]``: retrains
            without the removed examples and returns, for the queries in ``query_indices`` (same
            order), either predicted labels (when ``labels`` is given) or correct-class margins
            (``labels=None``: margin > 0 means correctly predicted).
        labels: ``[n_selected]`` correct labels of the selected queries; a prediction flips when it
            differs from the label. ``None``: predictions are margins and flip when ``<= 0``.
        num_seeds: retraining seeds per removal (``seed`` in ``range(num_seeds)``).
        progress: show a tqdm bar over retrainings.

    Returns:
        dict with
        ``"k_values"`` (int64 ``[n_k]``);
        ``"flip_fraction"`` (float64 ``[n_k]``): fraction of (query, seed) retrainings whose
        prediction flipped, for each k;
        ``"flip_rate"`` (float64 ``[n_k, n_selected]``): per query, fraction of seeds that flipped;
        ``"num_removed"`` (int64 ``[n_k, n_selected]``): examples actually removed.
    """
    scores = _as_float_matrix(scores, "scores", "[n_query, n_train]")
    n_query, n_train = scores.shape
    queries = np.asarray(query_indices)
    if queries.ndim != 1 or len(queries) == 0 or queries.dtype.kind not in "iu":
        raise ValueError(
            f"`query_indices` must be a non-empty 1-D sequence of integers, got {query_indices!r}"
        )
    if queries.min() < 0 or queries.max() >= n_query or len(np.unique(queries)) != len(queries):
        raise ValueError(
            f"`query_indices` must be distinct rows of `scores` in [0, {n_query}), got {queries.tolist()}"
        )
    ks = np.asarray(k_values)
    if ks.ndim != 1 or len(ks) == 0 or ks.dtype.kind not in "iu" or ks.min() < 1 or ks.max() > n_train:
        raise ValueError(
            f"`k_values` must be a non-empty 1-D sequence of integers in [1, {n_train}], got {k_values!r}"
        )
    if not callable(retrain_fn):
        raise TypeError(f"`retrain_fn` must be callable, got {type(retrain_fn).__name__}")
    if labels is not None:
        labels = _to_numpy(labels, "labels")
        if labels.shape != queries.shape:
            raise ValueError(f"`labels` must have shape [n_selected] = {queries.shape}, got {labels.shape}")
    num_seeds = _check_positive_int(num_seeds, "num_seeds")

    flip_rate = np.zeros((len(ks), len(queries)))
    num_removed = np.zeros((len(ks), len(queries)), dtype=np.int64)
    with tqdm(total=flip_rate.size * num_seeds, desc="subset removal", disable=not progress) as bar:
        for position, query in enumerate(queries):
            row = scores[query]
            # Stable sort on -tau: descending scores, ties broken towards the lower index.
            ranking = np.argsort(-row, kind="stable")
            num_proponents = int((row > 0).sum())
            for k_index, k in enumerate(ks):
                removed = ranking[: min(int(k), num_proponents)]
                keep_mask = np.ones(n_train, dtype=bool)
                keep_mask[removed] = False
                num_removed[k_index, position] = len(removed)
                flips = 0
                for seed in range(num_seeds):
                    predictions = np.asarray(_to_numpy(retrain_fn(keep_mask, seed), "retrain_fn result"))
                    if predictions.shape != queries.shape:
                        raise ValueError(
                            f"`retrain_fn` must return [n_selected] = {queries.shape}, "
                            f"got shape {predictions.shape}"
                        )
                    prediction = predictions[position]
                    if labels is None:
                        flips += bool(prediction <= 0)
                    else:
                        flips += bool(prediction != labels[position])
                    bar.update()
                flip_rate[k_index, position] = flips / num_seeds
    return {
        "k_values": ks.astype(np.int64),
        "flip_fraction": flip_rate.mean(axis=1),
        "flip_rate": flip_rate,
        "num_removed": num_removed,
    }
