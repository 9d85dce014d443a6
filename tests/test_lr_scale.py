"""Layers trained at their own learning rate (`TrainingRun.lr_scale`: a head at 10× its backbone's rate, layer-wise
rate decay): each layer's operators and TracIn weight take ratio × c. Checked against a run whose lr is scaled
instead (uniform ratio), against the dense oracle (per-layer ratios), and TracIn layer by layer."""
import pytest
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast.reference.dense_source import dense_source_scores

from _models import ClassificationTask, classification_data, mlp, train_run

ALL = ("0.weight", "0.bias", "2.weight", "2.bias")


@pytest.fixture(scope="module")
def run_parts():
    data = classification_data(n=20)
    model = mlp()
    ckpts, steps, lrs = train_run(model, data, steps=24, every=4, lr=0.3)
    return model, data, ckpts, steps, lrs


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _analyzer(model, run, method="source", names=None, **kw):
    task = ClassificationTask() if names is None else type("Task", (ClassificationTask,), {
        "get_influence_tracked_modules": lambda self: names})()
    return sf.SourceAnalyzer(model, task, run, method=method, fisher="empirical", batch_size=7, progress=False, **kw)


@pytest.mark.parametrize("method", ["source", "fast_source", "tracin"])
def test_a_uniform_ratio_is_a_scaled_learning_rate(run_parts, method):
    model, data, ckpts, steps, lrs = run_parts
    scaled = sf.TrainingRun(ckpts, steps, lr=[2 * x for x in lrs], num_segments=3)
    ratio = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3, lr_scale={n: 2.0 for n in ALL})
    queries = Subset(data, range(4))
    want = _analyzer(model, scaled, method).pairwise_scores(queries, data)
    assert _rel(_analyzer(model, ratio, method).pairwise_scores(queries, data), want) <= 1e-10
    assert _rel(_analyzer(model, ratio, method).self_scores(data), _analyzer(model, scaled, method).self_scores(data)) \
        <= 1e-10


def test_a_uniform_ratio_on_an_adam_run(run_parts):
    model, data, ckpts, steps, lrs = run_parts
    moments = [{k: torch.full_like(v, 1e-2) for k, v in c.items()} for c in ckpts]
    common = dict(num_segments=3, optimizer="adamw", adam_second_moments=moments, weight_decay=0.1)
    scaled = sf.TrainingRun(ckpts, steps, lr=[2e-2 * x for x in lrs], **common)
    ratio = sf.TrainingRun(ckpts, steps, lr=[1e-2 * x for x in lrs], lr_scale={n: 2.0 for n in ALL}, **common)
    queries = Subset(data, range(4))
    assert _rel(_analyzer(model, ratio).pairwise_scores(queries, data),
                _analyzer(model, scaled).pairwise_scores(queries, data)) <= 1e-10


def test_per_layer_ratios_match_the_dense_oracle(run_parts):
    model, data, ckpts, steps, lrs = run_parts
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3,
                         lr_scale={"0.weight": 0.25, "0.bias": 0.25, "2.weight": 3.0, "2.bias": 3.0})
    queries = Subset(data, range(4))
    scores = _analyzer(model, run).pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data)
    assert _rel(scores, oracle) <= 1e-6
    plain = dense_source_scores(model, ClassificationTask(), sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3),
                                queries, data)
    assert _rel(plain, oracle) > 0.05  # the ratios matter: the check above can fail


def test_tracin_weighs_each_layer_by_its_ratio(run_parts):
    model, data, ckpts, steps, lrs = run_parts
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3, lr_scale={"0.weight": 2.0, "0.bias": 2.0})
    plain = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    queries = Subset(data, range(4))
    by_layer = (2.0 * _analyzer(model, plain, "tracin", ["0"]).pairwise_scores(queries, data)
                + _analyzer(model, plain, "tracin", ["2"]).pairwise_scores(queries, data))
    assert _rel(_analyzer(model, run, "tracin").pairwise_scores(queries, data), by_layer) <= 1e-10


@pytest.mark.parametrize("bad, exc, match", [
    ([2.0], TypeError, "lr_scale must be a mapping from parameter name"),
    ({"0.weight": 0.0}, ValueError, r"lr_scale\['0.weight'\] must be a finite number > 0, got 0.0"),
    ({1: 2.0}, TypeError, "lr_scale: keys must be parameter names"),
])
def test_bad_lr_scale_is_named(run_parts, bad, exc, match):
    _, _, ckpts, steps, lrs = run_parts
    with pytest.raises(exc, match=match):
        sf.TrainingRun(ckpts, steps, lr=lrs, lr_scale=bad)


def test_lr_scale_naming_unknown_parameters_is_named(run_parts):
    model, _, ckpts, steps, lrs = run_parts
    run = sf.TrainingRun(ckpts, steps, lr=lrs, lr_scale={"head.weight": 10.0})
    with pytest.raises(ValueError, match=r"run.lr_scale names 1 parameters the model does not have"):
        _analyzer(model, run)


def test_curvature_report_gives_each_layer_its_mass(run_parts):
    from source_fast.diagnostics import curvature_report

    model, data, ckpts, steps, lrs = run_parts
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3, lr_scale={"2.weight": 4.0, "2.bias": 4.0})
    rows = curvature_report(_analyzer(model, run).fit(data))
    for row in rows:
        want = run.segments[row["segment"]].c * (4.0 if row["layer"] == "2" else 1.0)
        assert row["c"] == pytest.approx(want)
