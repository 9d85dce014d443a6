"""The whole pipeline against the dense float64 oracle, and the §5 invariances at pipeline level."""
import logging

import pytest
import torch
from scipy.stats import spearmanr
from torch.utils.data import Subset

import source_fast as sf
from source_fast import _config
from source_fast.reference.dense_source import dense_source_scores

from _backends import recording_lib_calls
from _models import (ClassificationTask, ResidualBatchNormCNN, classification_data, mlp, one_channel_conv_run,
                     small_mlp_run, tiny_cnn1d_run, tiny_cnn_run, train_run)


def _setup(model, data, **train_kw):
    ckpts, steps, lrs = train_run(model, data, **train_kw)
    return ckpts, steps, lrs


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _rank_checks(scores, oracle, k=10):
    for q in range(scores.shape[0]):
        rho = spearmanr(scores[q].double().numpy(), oracle[q].numpy()).statistic
        assert rho >= 0.999, f"query {q}: Spearman {rho:.5f} < 0.999"
        top = set(torch.topk(scores[q].double(), k).indices.tolist())
        top_ref = set(torch.topk(oracle[q], k).indices.tolist())
        assert len(top & top_ref) / k >= 0.9, f"query {q}: top-{k} overlap {len(top & top_ref)}/{k}"


@pytest.fixture(scope="module")
def mlp_run():
    data = classification_data(n=24)
    model = mlp()
    ckpts, steps, lrs = _setup(model, data, steps=30, every=5, lr=0.3, lr_schedule=lambda k: 0.3 * (1 - k / 40))
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    return model, data, run


@pytest.mark.parametrize("rotate", ["cost-model", "rows", "direction", "output"])
@pytest.mark.parametrize("method", ["source", "influence"])
def test_mlp_matches_dense_oracle_float64(mlp_run, monkeypatch, method, rotate):
    """Scoring in a segment's eigenbasis rotates every training row, the direction back, or the direction's
    output side and the rows' activations (the cost model's choice per layer, or each forced): all equal
    the oracle."""
    if rotate != "cost-model":
        from source_fast import analyzer as analyzer_module

        monkeypatch.setattr(analyzer_module, "_rotation_plan", lambda *args: rotate)
    model, data, run = mlp_run
    queries = Subset(data, range(5))
    kw = {"damping": 0.01} if method == "influence" else {}
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, method=method, fisher="empirical", batch_size=7,
                                 progress=False, **kw)
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data, method=method, **kw)
    assert scores.dtype == torch.float64
    assert _rel(scores, oracle) <= 1e-6


@pytest.mark.parametrize("rotate", ["cost-model", "output"])
@pytest.mark.parametrize("schedule", ["one-pass", "segment-by-segment", "block-by-block"])
def test_source_scoring_schedules_match_dense_oracle_float64(mlp_run, monkeypatch, caplog, schedule, rotate):
    """pairwise_scores before fit() (each segment fitted, then scored), after fit() (one segment at a time
    over all examples, one W_ℓ held) and block by block (every W_ℓ held; top_k's schedule, and
    pairwise_scores' when the running score sum would be too large): all equal the oracle."""
    from source_fast import analyzer as analyzer_module

    _force_rotation(monkeypatch, rotate)
    if schedule == "block-by-block":
        monkeypatch.setattr(analyzer_module, "SEGMENT_MAJOR_MAX_SCORE_BYTES", 0)
    model, data, run = mlp_run
    queries = Subset(data, range(5))
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=7, score_block=14,
                                 progress=False)
    if schedule != "one-pass":
        analyzer.fit(data)
    with caplog.at_level(logging.DEBUG, logger="source_fast"):
        scores = analyzer.pairwise_scores(queries, data)
    assert ("pairwise scores block by block: the running score sum" in caplog.text) == (schedule == "block-by-block")
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data)
    assert _rel(scores, oracle) <= 1e-6


def test_segment_by_segment_only_where_its_running_sum_is_the_smaller_hold(mlp_run):
    """Scoring segment by segment holds a [Q, N] running sum instead of L − 1 segments' directions: chosen when
    that sum is the returned matrix itself (no store, CPU) or smaller than those directions."""
    model, data, run = mlp_run
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=7, progress=False)
    analyzer.fit(data)
    per_query = 8 * sum(b.q_s.shape[0] * b.q_a.shape[0] for b in analyzer.blocks[0].values())  # float64 bytes
    directions = (len(analyzer.blocks) - 1) * per_query  # per query
    n_small, n_large = directions // 8 - 1, directions // 8 + 1  # running sum just below / above them

    class FreshStore:  # a score store with every block still to compute
        def __init__(self, n):
            self.n = n

        def pending(self):
            return list(range(analyzer._num_blocks(self.n)))

    assert analyzer._segment_major_reason(5, n_small, None) is None
    assert analyzer._segment_major_reason(5, n_large, None) is None  # the sum is the result: nothing held extra
    assert analyzer._segment_major_reason(5, n_small, FreshStore(n_small)) is None
    assert "would outweigh the directions" in analyzer._segment_major_reason(5, n_large, FreshStore(n_large))


@pytest.mark.parametrize("stack", ["whole-block", "few-batches", "off"])
def test_segment_checkpoints_scored_stacked_or_one_at_a_time(mlp_run, monkeypatch, stack):
    """A segment's checkpoints are scored as one contraction (rows stacked along tokens) for as many whole
    batches as SOURCE_FAST_STACK_MIB holds, or one after another at 0: all equal the oracle."""
    model, data, run = mlp_run
    queries = Subset(data, range(4))
    if stack == "few-batches":  # a few KiB: the block is scored in runs of one or two batches
        monkeypatch.setattr(sf._config, "stack_bytes", lambda: 3000)
    else:
        monkeypatch.setenv("SOURCE_FAST_STACK_MIB", "1024" if stack == "whole-block" else "0")
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=7, progress=False)
    tokens, score_pairwise = set(), sf.ops.score_pairwise

    def recording(v, a, g, **kw):
        tokens.add(a.shape[1])
        return score_pairwise(v, a, g, **kw)

    monkeypatch.setattr(sf.ops, "score_pairwise", recording)
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data)
    assert _rel(scores, oracle) <= 1e-6
    # 6 checkpoints in 3 segments, one token per example: 2 tokens per row when stacked
    assert tokens == ({1} if stack == "off" else {2})


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("method", ["source", "influence"])
@pytest.mark.parametrize("stacked", [True, False])
def test_cnn_rows_scored_stacked_or_piece_by_piece(monkeypatch, method, stacked):
    """A layer's rows are stacked (members along tokens, batches along examples) or, where `rows.stacking_pays`
    says the copy costs more (a conv layer's many positions), scored one batch and member at a time and added:
    both equal the oracle, and the calls see the stacked or the single-member token counts."""
    model, data, ckpts, steps, lrs = tiny_cnn1d_run()  # conv layers of 2 and 3 input channels: patch rows
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=1)  # SOURCE: one segment of 3 checkpoints
    queries = Subset(data, range(3))
    monkeypatch.setattr("source_fast.analyzer.stacking_pays", lambda *args: stacked)
    monkeypatch.setenv("SOURCE_FAST_STACK_MIB", "1024")
    kwargs = {"damping": 1e-3} if method == "influence" else {}
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=5, progress=False,
                                 method=method, **kwargs)
    calls, score_pairwise = [], sf.ops.score_pairwise

    def recording(v, a, g, **kw):
        calls.append(tuple(a.shape[:2]))
        return score_pairwise(v, a, g, **kw)

    monkeypatch.setattr(sf.ops, "score_pairwise", recording)
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data, method=method, **kwargs)
    assert _rel(scores, oracle) <= 1e-6
    members = 3 if method == "source" else 1
    if stacked:  # the 16 examples (4 batches of at most 5) merged into one call per layer, members along tokens
        assert sorted(calls) == [(16, members), (16, 3 * members), (16, 8 * members)]  # fc, conv2, conv tokens
    else:  # one call per layer, batch and member
        assert len(calls) == 3 * 4 * members
        assert {t for _, t in calls} == {1, 3, 8} and {n for n, _ in calls} == {1, 5}


def _relu_mlp_float32_scores(monkeypatch, method, model, n):
    """Scores of a ReLU MLP trained in float64 and scored in float32 (40 queries, `n` training examples;
    influence: one checkpoint; SOURCE: 4 checkpoints, 2 per segment) with the float64 oracle's, the rotation
    plans taken and the compiled calls made: (analyzer, scores, oracle, plans, recorded)."""
    from source_fast import analyzer as analyzer_module

    plans = []
    plan = analyzer_module._rotation_plan
    monkeypatch.setattr(analyzer_module, "_rotation_plan", lambda *args: plans.append(plan(*args)) or plans[-1])
    data64 = classification_data(n=n, d_in=6)
    every, segments = (20, 1) if method == "influence" else (5, 2)
    ckpts, steps, lrs = _setup(model, data64, steps=20, every=every, lr=0.3)
    kw = {"damping": 0.01} if method == "influence" else {}
    run64 = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=segments)
    oracle = dense_source_scores(model, ClassificationTask(), run64, Subset(data64, range(40)), data64,
                                 method=method, **kw)
    ckpts32 = [{k: v.float() for k, v in c.items()} for c in ckpts]
    x, y = data64.tensors
    data32 = torch.utils.data.TensorDataset(x.float(), y)
    run32 = sf.TrainingRun(ckpts32, steps, lr=lrs, num_segments=segments)
    analyzer = sf.SourceAnalyzer(model.float(), ClassificationTask(), run32, method=method, fisher="empirical",
                                 batch_size=256, progress=False, **kw)
    with recording_lib_calls() as recorded:
        scores = analyzer.pairwise_scores(Subset(data32, range(40)), data32)
    return analyzer, scores, oracle, plans, recorded


@pytest.mark.parametrize("method", ["influence", "source"])
def test_relu_mlp_float32_sparse_output_gradients_match_oracle(monkeypatch, method):
    """A ReLU MLP in float32: the first layer takes the output-side rotation, whose exact zeros in g reach
    the CPU sparse-g kernel when it is built (influence: one token per row; SOURCE: a segment's two
    checkpoints stacked, one formed row of G_n per (n, o) with any nonzero g); ranks match the float64
    oracle either way."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).double()
    analyzer, scores, oracle, plans, recorded = _relu_mlp_float32_scores(monkeypatch, method, model, 256)
    sparse_tokens = [args[15] for name, args in recorded if name == "score_pairwise_sparse_g_cpu"]  # T
    assert 0.2 < analyzer._query_g_density["0"] < 0.8  # the ReLU zeroes part of the first layer's g
    if analyzer._sparse_kernel_usable():  # g unrotated (output side or whole direction rotated back)
        assert {"output", "direction"} & set(plans) and sparse_tokens, (plans, sparse_tokens)
        assert set(sparse_tokens) == ({1} if method == "influence" else {2})
    _rank_checks(scores, oracle)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_cnn_matches_dense_oracle_float64(padding_mode):
    model, data, ckpts, steps, lrs = tiny_cnn_run(padding_mode)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    queries = Subset(data, range(3))
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=5, progress=False)
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data)
    assert _rel(scores, oracle) <= 1e-6


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("method", ["source", "influence"])
def test_grouped_and_depthwise_convs_match_dense_oracle_float64(monkeypatch, method, layout):
    """A grouped (2 groups) and a depthwise convolution: one EK-FAC block per group ("grouped[0]", ...), against
    the dense oracle, which builds the same block-diagonal curvature from autograd's per-example gradients. With the
    model in channels-last (faster model passes on CPU) every activation and gradient the pipeline reads is
    channels-last: the groups' inputs and output gradients are joined as views of them (rows.joined, stacked)."""
    model, data, ckpts, steps, lrs = tiny_cnn_run(grouped=True)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        assert model.depthwise.weight.is_contiguous(memory_format=torch.channels_last)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    queries = Subset(data, range(3))
    kwargs = {"damping": 1e-3} if method == "influence" else {}
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=5, progress=False,
                                 method=method, **kwargs)
    assert [layer.name for layer in analyzer.layers] == ["conv", "grouped[0]", "grouped[1]"] + \
        [f"depthwise[{k}]" for k in range(4)] + ["fc"]
    formed, one_channel_group_grads = [], sf.modules.one_channel_group_grads

    def recording(module, x, gy):
        formed.append(module.groups)
        return one_channel_group_grads(module, x, gy)

    monkeypatch.setattr(sf.modules, "one_channel_group_grads", recording)
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data, method=method, **kwargs)
    assert _rel(scores, oracle) <= 1e-6
    # in gradient form: the depthwise layer's four groups (one input channel each) in one call per batch, and the
    # first conv (one input channel); not the grouped conv's two groups of two channels
    assert set(formed) == {1, 4}
    self_scores = analyzer.self_scores(data)
    diagonal = dense_source_scores(model, ClassificationTask(), run, data, data, method=method, **kwargs).diagonal()
    assert _rel(self_scores, diagonal) <= 1e-6


@pytest.mark.parametrize("fit_first", [False, True])
def test_depthwise_multiplier_and_strided_one_channel_convs_match_dense_oracle_float64(fit_first):
    """Layers of one input channel in every form the pipeline gives them (gradient form with a channel multiplier of
    2, a strided depthwise conv with circular padding, a Conv1d of one channel; covariances from the layer input):
    SOURCE scores and self-influence equal the dense oracle's, with the one-pass schedule (kept rows expanded to the
    gradient form) and with fit() first (scoring passes of their own)."""
    model, data, ckpts, steps, lrs = one_channel_conv_run()
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=4, progress=False)
    if fit_first:
        analyzer.fit(data)
    queries = Subset(data, range(3))
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data)
    assert _rel(scores, oracle) <= 1e-6
    diagonal = dense_source_scores(model, ClassificationTask(), run, data, data).diagonal()
    assert _rel(analyzer.self_scores(data), diagonal) <= 1e-6


def test_a_layer_without_gradients_gets_a_positive_heuristic_damping():
    """A tracked layer whose output never reaches the loss has Λ = 0 (a depthwise group behind a dead ReLU is the
    usual case): the heuristic damping 0.1·mean(Λ) would be 0; it falls back to 1, and the layer adds nothing."""

    class WithDeadBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.dead = mlp(), torch.nn.Linear(4, 3).double()

        def forward(self, x):
            return self.body(x) + 0.0 * self.dead(x)

    data = classification_data(n=16)
    torch.manual_seed(0)
    model = WithDeadBranch()
    ckpts, steps, lrs = train_run(model, data, steps=6, every=3, lr=0.1)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=1)
    queries = Subset(data, range(3))

    def scores(names):
        class Tracked(ClassificationTask):
            def get_influence_tracked_modules(self):
                return names
        analyzer = sf.SourceAnalyzer(model, Tracked(), run, method="influence", batch_size=8, progress=False)
        return analyzer, analyzer.pairwise_scores(queries, data)

    analyzer, with_dead = scores(["body.0", "body.2", "dead"])
    assert not analyzer.blocks[0]["dead"].lam.any()
    _, without = scores(["body.0", "body.2"])
    assert torch.isfinite(with_dead).all()
    torch.testing.assert_close(with_dead, without, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_cnn1d_matches_dense_oracle_float64():
    """nn.Conv1d with "same" padding of an even kernel (one extra zero after) and a strided "valid" one."""
    model, data, ckpts, steps, lrs = tiny_cnn1d_run()
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    queries = Subset(data, range(3))
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=5, progress=False)
    assert [layer.kind for layer in analyzer.layers] == ["conv", "conv", "linear"]
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data)
    assert _rel(scores, oracle) <= 1e-6


@pytest.mark.parametrize("method", ["source", "influence"])
def test_residual_batchnorm_cnn_is_attributed_in_eval_mode_and_matches_the_oracle(method):
    """A ResNet's pattern (bias-free convs, BatchNorm, a residual add) trained in train mode on mini-batches: gradients
    are taken in eval mode (BatchNorm on each checkpoint's running statistics), the model's mode comes back, and the
    scores match the oracle's; the same checkpoints scored with train-mode BatchNorm would differ."""
    data = classification_data(n=16, image=True)
    torch.manual_seed(1)
    model = ResidualBatchNormCNN().double()
    ckpts, steps, lrs = train_run(model, data, steps=12, every=4, lr=0.2, batch=8)
    assert model.training and not torch.equal(ckpts[0]["bn1.running_var"], ckpts[-1]["bn1.running_var"])
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    queries = Subset(data, range(3))
    extra = {"damping": 0.05} if method == "influence" else {}
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=5, progress=False,
                                 method=method, **extra)
    assert [layer.name for layer in analyzer.layers] == ["stem", "conv", "fc"]  # BatchNorm's affine: not tracked
    scores = analyzer.pairwise_scores(queries, data)
    assert model.training
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data, method=method, **extra)
    assert model.training and _rel(scores, oracle) <= 1e-6
    train_mode = model.train
    model.eval = lambda: train_mode(True)  # the oracle with batch statistics (one example at a time)
    assert _rel(dense_source_scores(model, ClassificationTask(), run, queries, data, method=method, **extra),
                oracle) > 0.1


def test_mlp_float32_ranks_match_oracle():
    model, data64, ckpts, steps, lrs = small_mlp_run()
    run64 = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    queries64 = Subset(data64, range(6))
    oracle = dense_source_scores(model, ClassificationTask(), run64, queries64, data64)
    ckpts32 = [{k: v.float() for k, v in c.items()} for c in ckpts]
    x, y = data64.tensors
    data32 = torch.utils.data.TensorDataset(x.float(), y)
    run32 = sf.TrainingRun(ckpts32, steps, lr=lrs, num_segments=3)
    analyzer = sf.SourceAnalyzer(model.float(), ClassificationTask(), run32, fisher="empirical", batch_size=16,
                                 progress=False)
    scores = analyzer.pairwise_scores(Subset(data32, range(6)), data32)
    assert scores.dtype == torch.float32
    _rank_checks(scores, oracle)


def test_self_scores_equal_pairwise_diagonal_for_every_method(mlp_run):
    model, data, run = mlp_run
    for method in ("source", "fast_source", "influence", "tracin", "gradient_dot"):
        analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, method=method, batch_size=7, progress=False)
        pairwise = analyzer.pairwise_scores(data, data)
        self_scores = analyzer.self_scores(data)
        assert torch.allclose(self_scores, torch.diagonal(pairwise), rtol=1e-9, atol=1e-14), method


@pytest.mark.parametrize("gain", [pytest.param(None, id="cheaper-order"), pytest.param(float("inf"), id="rows-first")])
def test_cnn_self_scores_equal_pairwise_diagonal(monkeypatch, gain):
    """SOURCE self-influence on conv layers takes G_n first where that is cheaper (its walk's rotation and the
    segments' dots, `_torch_ops.rotation_order`), the pairwise path its own kernels: the diagonal agrees either way."""
    from source_fast import _torch_ops

    if gain is not None:
        monkeypatch.setattr(_torch_ops, "MATERIALIZE_FIRST_MIN_GAIN", gain)
    model, data, ckpts, steps, lrs = tiny_cnn_run(grouped=True)
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    assert _torch_ops.rotation_order(9, 4, 10) == ("rows" if gain else "materialize")  # the first conv: 9 positions
    for method in ("source", "influence"):
        analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, method=method, batch_size=5, progress=False)
        pairwise = analyzer.pairwise_scores(data, data)
        assert torch.allclose(analyzer.self_scores(data), torch.diagonal(pairwise), rtol=1e-9, atol=1e-14), method


def test_scaling_loss_by_k_and_lr_by_one_over_k_changes_nothing(mlp_run):
    model, data, run = mlp_run
    queries = Subset(data, range(4))
    k = 7.0
    scaled = sf.TrainingRun(run.checkpoints, run.steps, lr=list(run.lrs / k), num_segments=3, loss_scale=k)
    base = sf.SourceAnalyzer(model, ClassificationTask(), run, batch_size=8, progress=False)
    other = sf.SourceAnalyzer(model, ClassificationTask(), scaled, batch_size=8, progress=False)
    a, b = base.pairwise_scores(queries, data), other.pairwise_scores(queries, data)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-14)
    # ... while changing only the loss scale does change them (the check can fail).
    wrong = sf.TrainingRun(run.checkpoints, run.steps, lr=list(run.lrs), num_segments=3, loss_scale=k)
    c = sf.SourceAnalyzer(model, ClassificationTask(), wrong, batch_size=8, progress=False).pairwise_scores(queries,
                                                                                                            data)
    assert not torch.allclose(a * k, c, rtol=1e-3)


def test_duplicating_a_checkpoint_changes_no_score(mlp_run):
    model, data, run = mlp_run
    queries = Subset(data, range(3))
    c, s = run.checkpoints, run.steps
    # Two one-checkpoint segments vs. the same segments with the first checkpoint duplicated.
    plain = sf.TrainingRun([c[1], c[5]], [s[1], s[5]], lr=list(run.lrs), num_segments=[s[1]])
    dup = sf.TrainingRun([c[1], c[1], c[5]], [s[0], s[1], s[5]], lr=list(run.lrs), num_segments=[s[1]])
    # Empirical Fisher: with sampled labels each checkpoint draws its own labels (seeded per checkpoint).
    a = sf.SourceAnalyzer(model, ClassificationTask(), plain, fisher="empirical", batch_size=8, progress=False)
    b = sf.SourceAnalyzer(model, ClassificationTask(), dup, fisher="empirical", batch_size=8, progress=False)
    assert torch.allclose(a.pairwise_scores(queries, data), b.pairwise_scores(queries, data), rtol=1e-9, atol=1e-14)


def test_sampled_fisher_is_seeded(mlp_run):
    model, data, run = mlp_run
    queries = Subset(data, range(3))
    make = lambda seed: sf.SourceAnalyzer(model, ClassificationTask(), run, batch_size=8, seed=seed,  # noqa: E731
                                          progress=False).pairwise_scores(queries, data)
    first, again, other = make(0), make(0), make(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("method", ["source", "fast_source", "influence"])
def test_row_cache_between_fit_passes_changes_nothing(mlp_run, monkeypatch, method):
    """Rows kept from the covariance passes for the eigen-correction passes (all, a prefix of batches, or
    none) give bitwise the same factors: same batches, same label seeds. The partial cache must skip the
    cached batches' forward passes and recompute exactly the rest."""
    model, data, run = mlp_run

    def fit(budget):
        monkeypatch.setattr(_config, "row_cache_bytes", lambda: budget)
        forwards = []
        handle = model.register_forward_hook(lambda *_: forwards.append(1))
        try:
            analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, method=method, batch_size=7,
                                         damping=0.01 if method == "influence" else None, progress=False)
            analyzer.fit(data)
        finally:
            handle.remove()
        return analyzer.blocks, len(forwards)

    batches = -(-len(data) // 7)  # 24 examples: 3 of 7 and one of 3
    n_units, n_segments = {"source": (6, 3), "fast_source": (3, 3), "influence": (1, 1)}[method]
    reference, forwards_off = fit(0)
    assert forwards_off == 2 * n_units * batches
    # One full batch of rows: 7 examples x (a 4+1, g 5 | a 5+1, g 3) float64 = 1064 bytes. A 1500-byte
    # budget keeps the first batch of each segment's first unit and nothing else.
    for budget, expect in [(2**30, n_units * batches), (1500, 2 * n_units * batches - n_segments)]:
        blocks, forwards = fit(budget)
        assert forwards == expect, (budget, forwards, expect)
        for seg, ref in zip(blocks, reference):
            for name, block in seg.items():
                for key in ("q_a", "q_s", "lam"):
                    assert torch.equal(getattr(block, key), getattr(ref[name], key)), (budget, name, key)


def test_large_lr_mass_approaches_influence_function(mlp_run):
    model, data, run = mlp_run
    queries = Subset(data, range(4))
    one = sf.TrainingRun([run.checkpoints[-1]], [run.steps[-1]], lr=1e8, num_segments=1)
    source = sf.SourceAnalyzer(model, ClassificationTask(), one, fisher="empirical", batch_size=8, progress=False)
    influence = sf.SourceAnalyzer(model, ClassificationTask(), one, method="influence", damping=1e-12,
                                  fisher="empirical", batch_size=8, progress=False)
    a, b = source.pairwise_scores(queries, data), influence.pairwise_scores(queries, data)
    assert _rel(a, b) < 1e-4


def test_small_lr_mass_approaches_gradient_dot(mlp_run):
    model, data, run = mlp_run
    queries = Subset(data, range(4))
    one = sf.TrainingRun([run.checkpoints[-1]], [run.steps[-1]], lr=1e-9, num_segments=1)
    source = sf.SourceAnalyzer(model, ClassificationTask(), one, batch_size=8, progress=False)
    dot = sf.SourceAnalyzer(model, ClassificationTask(), one, method="gradient_dot", batch_size=8, progress=False)
    c = one.segments[0].c
    ratio = source.pairwise_scores(queries, data) / (c * dot.pairwise_scores(queries, data))
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)


def _force_rotation(monkeypatch, rotate):
    if rotate != "cost-model":
        from source_fast import analyzer as analyzer_module

        monkeypatch.setattr(analyzer_module, "_rotation_plan", lambda *args: rotate)


@pytest.mark.parametrize("rotate", ["cost-model", "output"])
@pytest.mark.parametrize("schedule", ["segment-by-segment", "block-by-block"])
def test_multi_stage_matches_oracle_and_masks_other_stages(monkeypatch, rotate, schedule):
    """("output": every direction written by the walk in the queries-innermost layout and rotated in place.
    Scored one segment at a time over all examples, or block by block: both apply the stage masks.)"""
    from source_fast import analyzer as analyzer_module

    _force_rotation(monkeypatch, rotate)
    if schedule == "block-by-block":
        monkeypatch.setattr(analyzer_module, "SEGMENT_MAJOR_MAX_SCORE_BYTES", 0)
    data = classification_data(n=20)
    model = mlp()
    ckpts, steps, lrs = _setup(model, data, steps=24, every=4, lr=0.3)
    stages = [0] * 12 + [1] * 8
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3, stage_boundaries=[12], example_stages=stages)
    assert [s.stage for s in run.segments] == [0, 0, 1] or [s.stage for s in run.segments] == [0, 1, 1]
    assert all(s.end <= 12 or s.start >= 12 for s in run.segments), "segments must not cross the stage boundary"
    queries = Subset(data, range(3))
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=6, progress=False)
    scores = analyzer.pairwise_scores(queries, data)
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data)
    assert _rel(scores, oracle) <= 1e-6
    # The oracle zeroes stage-2 segments' contributions for stage-1 examples and uses N_ℓ per stage,
    # independently of the pipeline; an unmasked pipeline would not match it (checked below).
    unmasked = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=[s.end for s in run.segments[:-1]])
    plain = sf.SourceAnalyzer(model, ClassificationTask(), unmasked, fisher="empirical", batch_size=6,
                              progress=False).pairwise_scores(queries, data)
    assert _rel(plain, oracle) > 1e-2


@pytest.mark.parametrize("rotate", ["cost-model", "output"])
def test_streaming_top_k_equals_topk_of_full_matrix(mlp_run, monkeypatch, rotate):
    """(Several training blocks: directions rotated in place once are reused by every block.) pairwise_scores
    sums the segments one at a time over all examples, top_k block by block: equal up to rounding."""
    _force_rotation(monkeypatch, rotate)
    model, data, run = mlp_run
    queries = Subset(data, range(4))
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, batch_size=3, score_block=5, progress=False)
    full = analyzer.pairwise_scores(queries, data)
    for largest in (True, False):
        values, indices = analyzer.top_k(queries, data, 6, largest=largest)
        want = torch.topk(full, 6, dim=1, largest=largest)
        assert torch.equal(indices, want.indices)
        assert torch.allclose(values, want.values, rtol=1e-12, atol=1e-15 * full.abs().max().item())
    with pytest.raises(ValueError, match="k must be an integer in"):
        analyzer.top_k(queries, data, 0)


def test_influence_on_a_staged_run_fits_curvature_on_all_examples():
    data = classification_data(n=20)
    model = mlp()
    ckpts, steps, lrs = train_run(model, data, steps=24, every=4, lr=0.3)
    staged = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2, stage_boundaries=[12],
                            example_stages=[0] * 12 + [1] * 8)
    plain = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=2)
    queries = Subset(data, range(3))
    a = sf.SourceAnalyzer(model, ClassificationTask(), staged, method="influence", damping=0.01, fisher="empirical",
                          progress=False).pairwise_scores(queries, data)
    b = sf.SourceAnalyzer(model, ClassificationTask(), plain, method="influence", damping=0.01, fisher="empirical",
                          progress=False).pairwise_scores(queries, data)
    assert torch.allclose(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["influence", "source"])
def test_relu_mlp_hidden_layer_sparse_activations_match_oracle(monkeypatch, method):
    """A ReLU MLP's hidden layer has exact zeros on both sides (its inputs are ReLU outputs, its output
    gradients ReLU-gated): the direction is rotated back whole, the rows stay unrotated and the CPU's
    sparse-a-and-g kernel skips both (influence: one token per row; SOURCE: a segment's two checkpoints
    stacked). Ranks match the float64 oracle."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 3)).double()
    analyzer, scores, oracle, plans, recorded = _relu_mlp_float32_scores(monkeypatch, method, model, 320)
    assert analyzer._query_a_density["2"] < 0.8 and analyzer._query_g_density["2"] < 0.8
    if analyzer._sparse_kernel_usable():
        assert "direction" in plans, plans
        tokens = {args[15] for name, args in recorded if name == "score_pairwise_sparse_ag_cpu"}
        assert tokens == ({1} if method == "influence" else {2}), (tokens, plans)
    _rank_checks(scores, oracle)


def test_rotation_plan_prefers_unrotated_rows_when_both_sides_have_zeros():
    """The cost model on the regression benchmark's hidden layer (200 queries, 5,000 examples, O = 128,
    I = 129, half of g zero): the output side while the activations are dense, the whole direction rotated
    back once they have enough exact zeros for the sparse-a-and-g kernel; neither sparse form without the
    compiled kernel."""
    from source_fast.analyzer import _rotation_plan

    shape = (200, 128, 129, 1, 5000, 1, 0.5)
    assert _rotation_plan(*shape, True, 1.0) == "output"
    assert _rotation_plan(*shape, True, 0.5) == "direction"
    assert _rotation_plan(*shape, False, 0.5) == "rows"


def test_frozen_modules_are_left_out_by_default_and_scores_match_the_oracle_of_the_trained_ones(caplog):
    """A fine-tune with a frozen first layer (a frozen backbone, LoRA's base layers): the frozen layer did not move,
    so by default it is not tracked, and the scores are the oracle's over the trained layers. A model frozen as a
    whole (set up for inference) keeps every layer."""
    from torch import nn

    data = classification_data(n=16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[0].requires_grad_(False)
    ckpts, steps, lrs = train_run(model, data, steps=9, every=3, lr=0.3)
    assert torch.equal(ckpts[0]["0.weight"], ckpts[-1]["0.weight"])  # it did not train
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3)
    with caplog.at_level("INFO", logger="source_fast"):
        analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=5,
                                     progress=False)
    assert [layer.name for layer in analyzer.layers] == ["2", "4"]
    assert "left out 1 frozen ones (0)" in caplog.text
    queries = Subset(data, range(3))
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data, module_names=["2", "4"])
    assert _rel(analyzer.pairwise_scores(queries, data), oracle) <= 1e-6
    model.requires_grad_(False)
    assert len(sf.SourceAnalyzer(model, ClassificationTask(), run, progress=False).layers) == 3


class _AutocastTask(ClassificationTask):
    """The classification losses under CPU autocast to bfloat16 (as a mixed-precision training script runs them)."""

    def compute_train_loss(self, batch, model, sample=False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().compute_train_loss(batch, model, sample)

    def compute_measurement(self, batch, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return super().compute_measurement(batch, model)


@pytest.mark.parametrize("fit_first", [False, True])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_autocast_losses_score_as_float32_within_bfloat16_precision(arch, fit_first):
    """Under autocast a module's input (the hook's a) stays float32 while its output gradient g is bfloat16: the rows
    take float32 (before: "a and g must share a dtype"). The scores differ from the float32 run's by bfloat16
    rounding of the model's own passes only. The CNN's first conv reads one channel (its rows rebuilt from its
    float32 input)."""
    if arch == "cnn":
        model, data, ckpts, steps, lrs = tiny_cnn_run()
    else:
        model, data = mlp(), classification_data(n=16)
        ckpts, steps, lrs = train_run(model, data, steps=6, every=3, lr=0.3)
    model = model.float()
    x, y = data.tensors
    data = torch.utils.data.TensorDataset(x.float(), y)
    run = sf.TrainingRun([{k: v.float() for k, v in c.items()} for c in ckpts], steps, lr=lrs, num_segments=2)
    queries = Subset(data, range(3))
    scores = {}
    for name, task in (("float32", ClassificationTask()), ("autocast", _AutocastTask())):
        analyzer = sf.SourceAnalyzer(model, task, run, fisher="empirical", batch_size=5, progress=False)
        if fit_first:
            analyzer.fit(data)
        scores[name] = analyzer.pairwise_scores(queries, data)
    assert scores["autocast"].dtype == torch.float32
    assert _rel(scores["autocast"].double(), scores["float32"].double()) <= 3e-2


def test_a_compiled_model_is_attributed_through_its_original_module(mlp_run, caplog):
    """torch.compile wraps the model: forward hooks inside its graph see tensors autograd does not connect to the
    loss (with inductor the scores came out 40 % off). The analyzer runs the wrapped module; checkpoints saved from
    the compiled model (keys "_orig_mod.…") and tracked names given that way are read as the module's."""
    model, data, run = mlp_run
    compiled = torch.compile(model, backend="eager")
    prefixed = sf.TrainingRun([{f"_orig_mod.{k}": v for k, v in run.load_checkpoint(i).items()}
                               for i in range(len(run.checkpoints))], run.steps, lr=list(run.lrs), num_segments=3)
    task = type("T", (ClassificationTask,), {"get_influence_tracked_modules": lambda self: ["_orig_mod.0",
                                                                                            "_orig_mod.2"]})()
    with caplog.at_level("WARNING", logger="source_fast"):
        analyzer = sf.SourceAnalyzer(compiled, task, prefixed, fisher="empirical", batch_size=7, progress=False)
    assert "torch.compile'd" in caplog.text and analyzer.model is model
    queries = Subset(data, range(3))
    want = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=7,
                             progress=False).pairwise_scores(queries, data)
    assert torch.equal(analyzer.pairwise_scores(queries, data), want)
