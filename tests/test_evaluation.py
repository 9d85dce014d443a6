"""Tests for source_fast.evaluation: LDS, subset masks, retraining cache, subset removal."""

import json

import numpy as np
import pytest
import scipy.stats
import torch

from source_fast.evaluation import draw_subset_masks, lds, run_counterfactual, subset_removal_test


@pytest.fixture(autouse=True)
def _single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _additive_problem(n_query, n_train, num_subsets, noise, seed=0):
    """Scores and measurements that follow the additive model exactly, up to Gaussian noise."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((n_query, n_train))
    masks = draw_subset_masks(n_train, num_subsets, seed=seed + 1)
    measurements = 3.0 - masks @ scores.T + noise * rng.standard_normal((num_subsets, n_query))
    return scores, masks, measurements


# ----------------------------------------------------------------------------------------------
# draw_subset_masks
# ----------------------------------------------------------------------------------------------


def test_draw_subset_masks_sizes_and_seeding():
    masks = draw_subset_masks(n_train=11, num_subsets=50, alpha=0.3, seed=4)
    assert masks.dtype == np.bool_ and masks.shape == (50, 11)
    np.testing.assert_array_equal(masks.sum(axis=1), np.full(50, round(0.3 * 11)))
    np.testing.assert_array_equal(masks, draw_subset_masks(11, 50, alpha=0.3, seed=4))
    assert not np.array_equal(masks, draw_subset_masks(11, 50, alpha=0.3, seed=5))
    # Independent draws: with C(11, 3) = 165 possible subsets, 50 rows are not all one subset.
    assert len({row.tobytes() for row in masks}) > 10
    # Every example is left out somewhere, otherwise its score could not matter.
    assert masks.any(axis=0).all() and (~masks).any(axis=0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_train=10, num_subsets=5, alpha=0.0), "alpha"),
        (dict(n_train=10, num_subsets=5, alpha=1.0), "alpha"),
        (dict(n_train=0, num_subsets=5), "n_train"),
        (dict(n_train=10, num_subsets=0), "num_subsets"),
    ],
)
def test_draw_subset_masks_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        draw_subset_masks(**kwargs)


# ----------------------------------------------------------------------------------------------
# lds: values
# ----------------------------------------------------------------------------------------------


def test_lds_of_exact_additive_effects_is_one_and_negated_is_minus_one():
    scores, masks, measurements = _additive_problem(n_query=20, n_train=200, num_subsets=100, noise=1e-6)
    result = lds(scores, masks, measurements)
    assert result["mean"] > 0.99
    assert result["per_query"].shape == (20,) and result["per_query"].dtype == np.float64
    assert (result["n_subsets"], result["n_query"], result["n_valid"]) == (100, 20, 20)
    # The opposite sign convention must score about -1: this pins g_j = -sum_{z in S_j} tau.
    assert lds(-scores, masks, measurements)["mean"] < -0.99


def test_lds_of_random_scores_is_near_zero():
    scores, masks, measurements = _additive_problem(n_query=200, n_train=100, num_subsets=100, noise=1e-6)
    random_scores = np.random.default_rng(99).standard_normal(scores.shape)
    result = lds(random_scores, masks, measurements)
    # Per query the correlation has std ~ 1/sqrt(M) = 0.1; the mean over 200 queries ~ 0.007.
    assert abs(result["mean"]) < 0.15
    assert result["n_valid"] == 200


def test_lds_of_exact_leave_one_out_ridge_regression_is_high():
    # Ridge regression with n >> d: removing half of the data scales X^T X by about one half, a
    # near-uniform change of curvature that preserves the ranking of the additive predictions.
    # Here the scores are the exact leave-one-out changes of the query predictions.
    n_train, dim, n_query, ridge = 200, 5, 30, 1.0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_train, dim))
    y = x @ rng.standard_normal(dim) + rng.standard_normal(n_train)
    x_query = rng.standard_normal((n_query, dim))

    def fit(keep):
        return np.linalg.solve(x[keep].T @ x[keep] + ridge * np.eye(dim), x[keep].T @ y[keep])

    theta = fit(np.ones(n_train, dtype=bool))
    a_inv = np.linalg.inv(x.T @ x + ridge * np.eye(dim))
    residual = x @ theta - y
    leverage = np.einsum("ij,jk,ik->i", x, a_inv, x)
    scores = (x_query @ a_inv @ x.T) * (residual / (1.0 - leverage))
    # The closed form is the exact removal effect: check it against a real refit.
    without_7 = np.ones(n_train, dtype=bool)
    without_7[7] = False
    np.testing.assert_allclose(x_query @ (fit(without_7) - theta), scores[:, 7], rtol=1e-9, atol=1e-12)

    masks = draw_subset_masks(n_train, num_subsets=100, seed=1)
    measurements = np.stack([x_query @ fit(keep) for keep in masks])
    result = lds(scores, masks, measurements)
    assert result["mean"] > 0.9
    assert lds(-scores, masks, measurements)["mean"] < -0.9


def test_lds_is_invariant_to_positive_rescaling():
    # Heavy noise keeps the LDS away from 1, where invariance would be trivial.
    scores, masks, measurements = _additive_problem(n_query=15, n_train=60, num_subsets=40, noise=5.0)
    reference = lds(scores, masks, measurements)
    assert 0.1 < reference["mean"] < 0.9
    for factor in (1e-3, 7.5, 1e4):
        scaled = lds(factor * scores, masks, measurements)
        np.testing.assert_allclose(scaled["per_query"], reference["per_query"], rtol=0, atol=1e-12)
        assert scaled["ci"] == pytest.approx(reference["ci"], abs=1e-12)


def test_lds_per_query_rescaling_matters_only_through_sign():
    scores, masks, measurements = _additive_problem(n_query=6, n_train=60, num_subsets=40, noise=5.0)
    row_factors = np.array([1.0, 2.0, 0.5, -1.0, 3.0, -4.0])[:, None]
    reference = lds(scores, masks, measurements)["per_query"]
    flipped = lds(row_factors * scores, masks, measurements)["per_query"]
    np.testing.assert_allclose(flipped, np.sign(row_factors[:, 0]) * reference, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_lds_numpy_and_torch_inputs_agree(dtype):
    scores, masks, measurements = _additive_problem(n_query=10, n_train=40, num_subsets=30, noise=3.0)
    scores = scores.astype(dtype)
    measurements = measurements.astype(dtype)
    reference = lds(scores, masks, measurements)
    torch_dtype = getattr(torch, dtype)
    variants = [
        (torch.from_numpy(scores), torch.from_numpy(masks), torch.from_numpy(measurements)),
        (scores, masks.astype(np.int64), measurements),
        (torch.tensor(scores, dtype=torch_dtype), torch.tensor(masks, dtype=torch.int32), measurements),
    ]
    for variant in variants:
        result = lds(*variant)
        np.testing.assert_array_equal(result["per_query"], reference["per_query"])
        assert result["mean"] == reference["mean"] and result["ci"] == reference["ci"]


def test_lds_spearman_matches_scipy_with_ties_and_constant_columns():
    rng = np.random.default_rng(3)
    n_query, n_train, num_subsets = 12, 6, 25
    # Small integer ranges force many ties in both predictions and measurements.
    scores = rng.integers(-1, 2, size=(n_query, n_train)).astype(np.float64)
    scores[0] = 0.0  # constant predictions
    masks = rng.random((num_subsets, n_train)) < 0.5
    measurements = rng.integers(0, 3, size=(num_subsets, n_query)).astype(np.float64)
    measurements[:, 1] = 2.0  # constant measurements
    result = lds(scores, masks, measurements)

    predictions = -(masks @ scores.T)
    expected = np.full(n_query, np.nan)
    for q in range(n_query):
        if np.ptp(predictions[:, q]) > 0 and np.ptp(measurements[:, q]) > 0:
            expected[q] = scipy.stats.spearmanr(measurements[:, q], predictions[:, q]).statistic
    assert np.isnan(expected[:2]).all() and np.isfinite(expected).sum() >= 8
    np.testing.assert_allclose(result["per_query"], expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert result["n_valid"] == np.isfinite(expected).sum()
    assert result["mean"] == pytest.approx(np.nanmean(expected), abs=1e-12)


def test_lds_confidence_interval_contains_mean_and_is_seeded():
    scores, masks, measurements = _additive_problem(n_query=40, n_train=60, num_subsets=30, noise=5.0)
    result = lds(scores, masks, measurements, seed=11)
    low, high = result["ci"]
    assert low < result["mean"] < high
    assert lds(scores, masks, measurements, seed=11)["ci"] == (low, high)
    assert lds(scores, masks, measurements, seed=12)["ci"] != (low, high)
    narrow_low, narrow_high = lds(scores, masks, measurements, seed=11, ci=0.5)["ci"]
    assert low < narrow_low < narrow_high < high
    # The percentile interval should be about mean +- 1.96 standard errors of the per-query LDS.
    per_query = result["per_query"]
    standard_error = per_query.std(ddof=1) / np.sqrt(len(per_query))
    assert (high - low) == pytest.approx(2 * 1.96 * standard_error, rel=0.2)


def test_lds_with_no_valid_query_warns_and_returns_nan():
    scores = np.zeros((3, 8))
    masks = draw_subset_masks(8, 5)
    measurements = np.random.default_rng(0).standard_normal((5, 3))
    with pytest.warns(RuntimeWarning, match="no query"):
        result = lds(scores, masks, measurements)
    assert np.isnan(result["mean"]) and result["n_valid"] == 0 and np.isnan(result["ci"]).all()


# ----------------------------------------------------------------------------------------------
# lds: validation
# ----------------------------------------------------------------------------------------------

_Q, _N, _M = 4, 10, 6
_SCORES = np.ones((_Q, _N))
_MASKS = np.ones((_M, _N), dtype=bool)
_MEASUREMENTS = np.zeros((_M, _Q))
_NAN_SCORES = _SCORES.copy()
_NAN_SCORES[1, 2] = np.nan
_INF_MEASUREMENTS = _MEASUREMENTS.copy()
_INF_MEASUREMENTS[0, 0] = np.inf


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        pytest.param(
            (_SCORES[0], _MASKS, _MEASUREMENTS), {}, ValueError, r"`scores` must be 2-D", id="scores-1d"
        ),
        pytest.param(
            (_SCORES, _MASKS[None], _MEASUREMENTS),
            {},
            ValueError,
            r"`subset_masks` must be 2-D",
            id="masks-3d",
        ),
        pytest.param(
            (_SCORES, _MASKS[:, :-1], _MEASUREMENTS),
            {},
            ValueError,
            r"`subset_masks`.*n_train = 10.*got shape \(6, 9\)",
            id="n_train-mismatch",
        ),
        pytest.param(
            (_SCORES, _MASKS, _MEASUREMENTS[:-1]),
            {},
            ValueError,
            r"`measurements`.*\(6, 4\).*got shape \(5, 4\)",
            id="M-mismatch",
        ),
        pytest.param(
            (_SCORES, _MASKS, _MEASUREMENTS[:, :-1]),
            {},
            ValueError,
            r"`measurements`.*\(6, 4\).*got shape \(6, 3\)",
            id="n_query-mismatch",
        ),
        pytest.param(
            (_SCORES, _MASKS[:2], _MEASUREMENTS[:2]),
            {},
            ValueError,
            r"`subset_masks`.*at least 3.*M = 2",
            id="M<3",
        ),
        pytest.param(
            (_NAN_SCORES, _MASKS, _MEASUREMENTS), {}, ValueError, r"`scores` must be finite", id="nan"
        ),
        pytest.param(
            (_SCORES, _MASKS, _INF_MEASUREMENTS), {}, ValueError, r"`measurements` must be finite", id="inf"
        ),
        pytest.param(
            (_SCORES.astype(np.int64), _MASKS, _MEASUREMENTS),
            {},
            TypeError,
            r"`scores` must have dtype",
            id="int",
        ),
        pytest.param(
            (_SCORES, _MASKS.astype(np.float32), _MEASUREMENTS),
            {},
            TypeError,
            r"`subset_masks` must be boolean",
            id="float-masks",
        ),
        pytest.param(
            (_SCORES, 2 * _MASKS.astype(np.int64), _MEASUREMENTS),
            {},
            ValueError,
            r"`subset_masks` must contain only 0 and 1",
            id="non-binary-masks",
        ),
        pytest.param((_SCORES, _MASKS, _MEASUREMENTS), {"ci": 1.5}, ValueError, r"`ci`", id="ci"),
        pytest.param(
            (_SCORES, _MASKS, _MEASUREMENTS), {"n_bootstrap": 0}, ValueError, r"`n_bootstrap`", id="boot"
        ),
    ],
)
def test_lds_rejects_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        lds(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# run_counterfactual
# ----------------------------------------------------------------------------------------------

_CF_N_TRAIN, _CF_N_QUERY = 12, 4
_CF_WEIGHTS = np.random.default_rng(7).standard_normal((_CF_N_QUERY, _CF_N_TRAIN))


def linear_train_fn(mask, seed):
    """Cheap deterministic 'retraining': additive in the kept examples, plus a per-seed offset."""
    return _CF_WEIGHTS @ mask.astype(np.float64) + 0.1 * seed


class CountingTrainFn:
    """``linear_train_fn`` that records its calls and can simulate a crash on its n-th call."""

    def __init__(self, crash_on_call=None):
        self.calls = 0
        self.crash_on_call = crash_on_call

    def __call__(self, mask, seed):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise RuntimeError("simulated crash")
        return linear_train_fn(mask, seed)


def _expected_measurements(masks, num_seeds):
    return masks @ _CF_WEIGHTS.T + 0.1 * np.mean(np.arange(num_seeds))


def test_run_counterfactual_caches_and_reuses_results(tmp_path):
    masks = draw_subset_masks(_CF_N_TRAIN, 5, seed=2)
    train_fn = CountingTrainFn()
    first = run_counterfactual(train_fn, masks, num_seeds=3, cache_dir=tmp_path, progress=False)
    assert train_fn.calls == 15
    assert first.shape == (5, _CF_N_QUERY) and first.dtype == np.float64
    np.testing.assert_allclose(first, _expected_measurements(masks, 3), rtol=1e-12)

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    recorded = tuple(manifest[key] for key in ("num_subsets", "n_train", "num_seeds", "n_query"))
    assert recorded == (5, 12, 3, 4)
    assert len(list(tmp_path.glob("*.npy"))) == 15
    assert not list(tmp_path.glob("*.tmp")), "temporary files must be renamed or removed"

    rerun_fn = CountingTrainFn()
    second = run_counterfactual(rerun_fn, masks, num_seeds=3, cache_dir=tmp_path, progress=False)
    assert rerun_fn.calls == 0
    np.testing.assert_array_equal(second, first)


def test_run_counterfactual_recomputes_invalid_cache_files(tmp_path):
    masks = draw_subset_masks(_CF_N_TRAIN, 4, seed=2)
    first = run_counterfactual(linear_train_fn, masks, num_seeds=2, cache_dir=tmp_path, progress=False)
    (tmp_path / "subset000000_seed0000.npy").write_bytes(b"not an npy file")
    np.save(tmp_path / "subset000001_seed0001.npy", np.full(_CF_N_QUERY, np.nan))
    np.save(tmp_path / "subset000003_seed0000.npy", np.zeros(_CF_N_QUERY + 1))
    train_fn = CountingTrainFn()
    with pytest.warns(RuntimeWarning, match="invalid") as record:
        second = run_counterfactual(train_fn, masks, num_seeds=2, cache_dir=tmp_path, progress=False)
    assert train_fn.calls == 3 and len(record) == 3
    np.testing.assert_array_equal(second, first)


def test_run_counterfactual_resumes_after_a_crash(tmp_path):
    masks = draw_subset_masks(_CF_N_TRAIN, 4, seed=2)
    crashing = CountingTrainFn(crash_on_call=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_counterfactual(crashing, masks, num_seeds=2, cache_dir=tmp_path, progress=False)
    resumed_fn = CountingTrainFn()
    resumed = run_counterfactual(resumed_fn, masks, num_seeds=2, cache_dir=tmp_path, progress=False)
    assert resumed_fn.calls == 8 - 5
    np.testing.assert_allclose(resumed, _expected_measurements(masks, 2), rtol=1e-12)


@pytest.mark.parametrize(
    "change, match",
    [
        ("masks", "masks_sha256"),
        ("num_seeds", "num_seeds"),
        ("num_subsets", "num_subsets"),
    ],
)
def test_run_counterfactual_refuses_a_different_run(tmp_path, change, match):
    masks = draw_subset_masks(_CF_N_TRAIN, 4, seed=2)
    run_counterfactual(linear_train_fn, masks, num_seeds=2, cache_dir=tmp_path, progress=False)
    other_masks, num_seeds = masks, 2
    if change == "masks":
        other_masks = draw_subset_masks(_CF_N_TRAIN, 4, seed=3)
    elif change == "num_seeds":
        num_seeds = 3
    else:
        other_masks = masks[:3]
    with pytest.raises(ValueError, match=match):
        run_counterfactual(
            linear_train_fn, other_masks, num_seeds=num_seeds, cache_dir=tmp_path, progress=False
        )


def test_run_counterfactual_process_pool_matches_serial(tmp_path):
    masks = draw_subset_masks(_CF_N_TRAIN, 6, seed=2)
    serial = run_counterfactual(
        linear_train_fn, masks, num_seeds=2, cache_dir=tmp_path / "serial", progress=False
    )
    parallel = run_counterfactual(
        linear_train_fn, masks, num_seeds=2, cache_dir=tmp_path / "parallel", num_workers=2, progress=False
    )
    np.testing.assert_array_equal(parallel, serial)
    # The pool's results were cached like serial ones.
    rerun_fn = CountingTrainFn()
    run_counterfactual(rerun_fn, masks, num_seeds=2, cache_dir=tmp_path / "parallel", progress=False)
    assert rerun_fn.calls == 0


def _wrong_length_train_fn(mask, seed):
    return np.zeros(_CF_N_QUERY + seed)


def test_run_counterfactual_rejects_inconsistent_train_fn_results(tmp_path):
    masks = draw_subset_masks(_CF_N_TRAIN, 3, seed=2)
    with pytest.raises(ValueError, match=r"`train_fn` must return shape \(4,\).*seed 1"):
        run_counterfactual(_wrong_length_train_fn, masks, num_seeds=2, cache_dir=tmp_path, progress=False)


# ----------------------------------------------------------------------------------------------
# subset_removal_test
# ----------------------------------------------------------------------------------------------

# Toy classifier: the correct-class margin of query q after training on S is sum_{z in S} c[q, z].
# With f = loss = -margin, the removal effect of z is exactly c[q, z], so the proponents are the
# largest c. Query 0 flips once its top 2 are gone, query 2 needs 3 (a margin of 0 counts as a
# flip), query 3 has a single proponent whose removal flips it. Row 1 is not tested; it would
# never flip and is there to check that rows are looked up by index.
_CONTRIBUTIONS = np.array(
    [
        [3, 3, 1, 1, -1, -1, -1, -1, 0, 0],
        [9, 9, 9, 9, 9, 9, 9, 9, 9, 9],
        [1, 1, 1, 1, 1, 1, -1, -1, -1, 0],
        [-1, 4, -1, 0, 0, 0, 0, 0, 0, 0],
    ],
    dtype=np.float64,
)
_SELECTED = [0, 2, 3]


def _toy_margins(keep_mask, seed):
    margins = _CONTRIBUTIONS[_SELECTED] @ keep_mask.astype(np.float64)
    # Seed 1 makes query 0 more robust: two removals no longer flip it.
    margins[0] += 2.5 * seed
    return margins


def _toy_labels(keep_mask, seed):
    true_labels = np.array([2, 0, 1])
    return np.where(_toy_margins(keep_mask, seed) > 0, true_labels, 3)


def test_subset_removal_counts_flips_with_margins():
    scores = 2.0 * _CONTRIBUTIONS  # only the ranking matters
    result = subset_removal_test(scores, _SELECTED, [1, 2, 3, 10], _toy_margins, progress=False)
    np.testing.assert_array_equal(result["k_values"], [1, 2, 3, 10])
    np.testing.assert_allclose(result["flip_fraction"], [1 / 3, 2 / 3, 1.0, 1.0])
    np.testing.assert_array_equal(result["num_removed"], [[1, 1, 1], [2, 2, 1], [3, 3, 1], [4, 6, 1]])
    # Removing opponents (the negated ranking) only raises the margins: nothing flips.
    opposite = subset_removal_test(-scores, _SELECTED, [1, 2, 3], _toy_margins, progress=False)
    np.testing.assert_array_equal(opposite["flip_fraction"], [0.0, 0.0, 0.0])


def test_subset_removal_with_labels_and_seeds():
    result = subset_removal_test(
        _CONTRIBUTIONS, _SELECTED, [2, 3], _toy_labels, labels=[2, 0, 1], num_seeds=2, progress=False
    )
    # k=2: query 0 flips for seed 0 only (margin -2, then +0.5); query 2 keeps margin 1; query 3 flips.
    np.testing.assert_allclose(result["flip_rate"], [[0.5, 0.0, 1.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(result["flip_fraction"], [0.5, 1.0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(query_indices=[0, 4]), "query_indices"),
        (dict(query_indices=[0, 0]), "query_indices"),
        (dict(k_values=[0]), "k_values"),
        (dict(k_values=[11]), "k_values"),
        (dict(labels=[1, 2]), "labels"),
    ],
)
def test_subset_removal_rejects_bad_arguments(kwargs, match):
    arguments = dict(scores=_CONTRIBUTIONS, query_indices=_SELECTED, k_values=[1], retrain_fn=_toy_margins)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        subset_removal_test(**arguments, progress=False)
