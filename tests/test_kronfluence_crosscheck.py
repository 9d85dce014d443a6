"""Cross-check of source_fast's EK-FAC influence against Kronfluence 1.0.1 (the reference implementation).

Both libraries get the *same* `kronfluence.Task` instance, the same weights, the same data, the
empirical Fisher and the same damping (an absolute float, or the 0.1 × mean(Λ) heuristic that both
use by default). Relation checked (and found empirically):

    source_fast.pairwise_scores  =  +(1/N) · Kronfluence pairwise scores
    source_fast.self_scores      =  +(1/N) · Kronfluence self scores

i.e. the same sign (a positive score means the training example helps the query), and only the 1/N
of SOURCE's removal-effect convention in addition. Covariances are normalised differently
(Kronfluence divides A and S by the number of *tokens*, source_fast by the number of *examples*),
which changes no eigenvector; Λ is a mean over *examples* in both, hence the token case below.

Architectures: an MLP, a token MLP, an MLP with a Linear called twice per forward and a small CNN (conv
positions as tokens; in float32 the compiled patch rows). Skipped cleanly when Kronfluence is not installed (see requirements-kronfluence.txt); an installed
Kronfluence that fails to import (e.g. a missing light dependency) fails the test instead.
"""
from __future__ import annotations

import copy
import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

if importlib.util.find_spec("kronfluence") is None:
    pytest.skip("kronfluence is not installed (pip install --no-deps -r requirements-kronfluence.txt)",
                allow_module_level=True)
# Installed but not importable (a missing light dependency) is an error, not a skip.
import kronfluence  # noqa: E402
import kronfluence.analyzer as kf_analyzer  # noqa: E402
import kronfluence.arguments as kf_arguments  # noqa: E402

scipy_stats = pytest.importorskip("scipy.stats")

import source_fast as sf  # noqa: E402
from source_fast.reference.dense_source import dense_source_scores  # noqa: E402

N_TRAIN, N_QUERY = 100, 10
LR, MOMENTUM, STEPS = 0.05, 0.9, 30


class ClassificationTask(kronfluence.Task):
    """A plain Kronfluence task: summed cross-entropy, sampled labels for the true Fisher."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(F.softmax(logits.detach().float(), -1), 1).squeeze(-1)
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")


class TokenMLP(nn.Module):
    """Its first Linear sees T = 5 tokens per example (covariance per token vs per example)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(2, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):  # x [B, 5*2] -> [B, 5, 2]
        h = torch.tanh(self.embed(x.reshape(x.shape[0], 5, 2)))
        return self.head(h.mean(1))


class TinyCNN(nn.Module):
    """A padded, strided 3×3 convolution (its 9 output positions are tokens) and a linear head, on 1×6×6 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.head = nn.Linear(27, 4)

    def forward(self, x):  # x [B, 36] -> [B, 1, 6, 6]
        return self.head(torch.tanh(self.conv(x.reshape(x.shape[0], 1, 6, 6))).flatten(1))


def _mlp():
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


class SharedMLP(nn.Module):
    """A Linear applied twice per forward (shared weights): Kronfluence with has_shared_parameters=True."""

    def __init__(self):
        super().__init__()
        self.embed, self.shared, self.head = nn.Linear(10, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.embed(x)))))))


def _problem(arch, dtype):
    """Data (teacher labels), a model trained a few full-batch SGD steps, 3 checkpoints."""
    gen = torch.Generator().manual_seed(1234)
    features = 36 if arch == "cnn" else 10
    x = torch.randn(N_TRAIN + N_QUERY, features, generator=gen, dtype=torch.float64)
    teacher = torch.randn(features, 4, generator=gen, dtype=torch.float64)
    y = (x @ teacher + 0.5 * torch.randn(N_TRAIN + N_QUERY, 4, generator=gen, dtype=torch.float64)).argmax(-1)
    x = x.to(dtype)
    torch.manual_seed(0)
    model = {"mlp": _mlp, "tokens": TokenMLP, "cnn": TinyCNN, "shared": SharedMLP}[arch]().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    checkpoints, steps = [], []
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        F.cross_entropy(model(x[:N_TRAIN]), y[:N_TRAIN]).backward()
        opt.step()
        if step % 10 == 0:
            checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            steps.append(step)
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    query = TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    return model, checkpoints, steps, train, query


def _source_fast(model, task, checkpoints, steps, train, query, damping):
    run = sf.TrainingRun(checkpoints, steps, lr=LR, momentum=MOMENTUM, num_segments=1)
    analyzer = sf.SourceAnalyzer(model, task, run, method="influence", fisher="empirical",
                                 damping=damping, batch_size=32, progress=False)
    analyzer.fit(train)
    return analyzer.pairwise_scores(query, train), analyzer.self_scores(train)


def _kronfluence(model, task, train, query, damping, dtype, out_dir, shared=False):
    # prepare_model swaps nn.Linear for TrackedModule wrappers in place: give it its own copy.
    kmodel = kf_analyzer.prepare_model(copy.deepcopy(model), task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cuda.amp.GradScaler deprecation inside Kronfluence
        analyzer = kf_analyzer.Analyzer("crosscheck", kmodel, task, cpu=True, disable_tqdm=True,
                                        output_dir=str(out_dir))
        factor_args = kf_arguments.FactorArguments(
            strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=dtype,
            gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype, lambda_dtype=dtype,
            eigendecomposition_dtype=torch.float64, has_shared_parameters=shared)
        analyzer.fit_all_factors("factors", train, per_device_batch_size=32, factor_args=factor_args,
                                 overwrite_output_dir=True)
        score_args = kf_arguments.ScoreArguments(
            damping_factor=damping, per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype)
        analyzer.compute_pairwise_scores("pairwise", "factors", query, train, per_device_query_batch_size=N_QUERY,
                                         per_device_train_batch_size=32, score_args=score_args,
                                         overwrite_output_dir=True)
        analyzer.compute_self_scores("self", "factors", train, per_device_train_batch_size=32,
                                     score_args=score_args, overwrite_output_dir=True)
        pairwise = analyzer.load_pairwise_scores("pairwise")["all_modules"]
        self_scores = analyzer.load_self_scores("self")["all_modules"]
    return pairwise.double(), self_scores.double()


def _check_relation(ours, theirs, *, rel_tol, label):
    """ours ≈ slope · theirs with slope = +1/N exactly (least squares), and Spearman ≥ 0.999."""
    ours, theirs = ours.double().reshape(-1), theirs.double().reshape(-1)
    slope = float(ours @ theirs / (theirs @ theirs))
    expected = 1.0 / N_TRAIN
    assert slope > 0, f"{label}: sign differs from Kronfluence (slope {slope:.6g}); expected +1/N"
    assert abs(slope - expected) <= rel_tol * expected, \
        f"{label}: slope ours/theirs = {slope:.10g}, expected +1/N = {expected:.10g}"
    residual = float((ours - expected * theirs).norm() / (expected * theirs).norm())
    assert residual <= rel_tol, f"{label}: relative error vs theirs/N = {residual:.3g} > {rel_tol:g}"


@pytest.mark.parametrize("arch,dtype,damping,rel_tol", [
    ("mlp", torch.float64, 1e-3, 1e-9),
    ("mlp", torch.float64, "heuristic", 1e-9),
    ("tokens", torch.float64, 1e-3, 1e-9),
    ("cnn", torch.float64, 1e-3, 1e-9),  # conv positions as tokens
    ("cnn", torch.float32, 1e-3, 2e-3),  # and the compiled fp32 patch rows (csrc/conv_patch_rows)
    ("mlp", torch.float32, 1e-3, 2e-3),
    ("shared", torch.float64, 1e-3, 1e-9),  # a module called twice: every call's tokens, gradients summed
])
def test_influence_matches_kronfluence(arch, dtype, damping, rel_tol, tmp_path):
    task = ClassificationTask()  # one instance, used by both libraries
    model, checkpoints, steps, train, query = _problem(arch, dtype)
    ours, ours_self = _source_fast(model, task, checkpoints, steps, train, query, damping)
    theirs, theirs_self = _kronfluence(model, task, train, query,
                                       None if damping == "heuristic" else damping, dtype, tmp_path,
                                       shared=arch == "shared")
    assert ours.shape == theirs.shape == (N_QUERY, N_TRAIN)
    assert ours_self.shape == theirs_self.shape == (N_TRAIN,)
    if arch == "shared":
        # Kronfluence 1.0.1's pairwise scores take a shared module's training gradient from its last call only (its
        # pairwise tracker assigns each call's scores and clears the other calls' hooks; measured: they equal, to
        # 6e-16, scores built that way from its own factors, and differ from the summed-gradient ones by 57 %). Its
        # factors and self-influence sum the calls, as source_fast does: compare those, and the pairwise scores with
        # the dense oracle (per-example gradients from autograd on the parameters).
        run = sf.TrainingRun(checkpoints, steps, lr=LR, momentum=MOMENTUM, num_segments=1)
        model.load_state_dict(checkpoints[-1])
        oracle = dense_source_scores(model, task, run, query, train, method="influence", damping=damping)
        assert float((ours - oracle).abs().max() / oracle.abs().max()) <= rel_tol
        theirs = oracle * N_TRAIN
    for q in range(N_QUERY):
        rho = scipy_stats.spearmanr(ours[q].numpy(), theirs[q].numpy())[0]
        assert rho >= 0.999, f"query {q}: Spearman {rho:.5f} < 0.999 between source_fast and Kronfluence"
        _check_relation(ours[q], theirs[q], rel_tol=rel_tol, label=f"pairwise query {q}")
    rho = scipy_stats.spearmanr(ours_self.numpy(), theirs_self.numpy())[0]
    assert rho >= 0.999, f"self-influence: Spearman {rho:.5f} < 0.999"
    _check_relation(ours_self, theirs_self, rel_tol=rel_tol, label="self-influence")
    # Self-influence of an EK-FAC inverse with damping > 0 is a positive quadratic form.
    assert bool((ours_self > 0).all())
    assert np.isfinite(ours.numpy()).all()


class EmbedOnlyTask(ClassificationTask):
    """Tracks TokenMLP's token layer only: per-token scores need one position count across tracked layers."""

    def get_influence_tracked_modules(self):
        return ["embed"]


def test_per_token_and_low_rank_influence_match_kronfluence(tmp_path):
    """Kronfluence's `compute_per_token_scores` (TokenMLP's 5 tokens, its token layer tracked) and
    `query_gradient_low_rank` with `use_full_svd` (both layers at rank 2, below min(O, I) of each) against
    source_fast's per_token_scores and query_rank: the same +1/N relation as the pairwise scores."""
    model, checkpoints, steps, train, query = _problem("tokens", torch.float64)
    run = sf.TrainingRun(checkpoints, steps, lr=LR, momentum=MOMENTUM, num_segments=1)
    results = {}
    for label, task, score_kw, ours_kw in [
            ("per-token", EmbedOnlyTask(), {"compute_per_token_scores": True}, {}),
            ("low-rank", ClassificationTask(), {"query_gradient_low_rank": 2, "use_full_svd": True,
                                                "query_gradient_svd_dtype": torch.float64}, {"query_rank": 2})]:
        analyzer = sf.SourceAnalyzer(model, task, run, method="influence", fisher="empirical", damping=1e-3,
                                     batch_size=32, progress=False, **ours_kw)
        analyzer.fit(train)
        ours = analyzer.per_token_scores(query, train) if label == "per-token" else \
            analyzer.pairwise_scores(query, train)
        kmodel = kf_analyzer.prepare_model(copy.deepcopy(model), task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kf = kf_analyzer.Analyzer(label, kmodel, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
            dt = torch.float64
            kf.fit_all_factors("factors", train, per_device_batch_size=32, overwrite_output_dir=True,
                               factor_args=kf_arguments.FactorArguments(
                                   strategy="ekfac", use_empirical_fisher=True, activation_covariance_dtype=dt,
                                   gradient_covariance_dtype=dt, per_sample_gradient_dtype=dt, lambda_dtype=dt,
                                   eigendecomposition_dtype=dt))
            kf.compute_pairwise_scores("scores", "factors", query, train, per_device_query_batch_size=N_QUERY,
                                       per_device_train_batch_size=32, overwrite_output_dir=True,
                                       score_args=kf_arguments.ScoreArguments(
                                           damping_factor=1e-3, per_sample_gradient_dtype=dt, precondition_dtype=dt,
                                           score_dtype=dt, **score_kw))
            theirs = kf.load_pairwise_scores("scores")["all_modules"].double()
        assert ours.shape == theirs.shape, (label, ours.shape, theirs.shape)
        results[label] = (ours, theirs)
        for q in range(N_QUERY):
            _check_relation(ours[q], theirs[q], rel_tol=1e-9, label=f"{label} query {q}")
    per_token = results["per-token"][0]
    assert per_token.shape == (N_QUERY, N_TRAIN, 5) and not torch.allclose(per_token[..., 0], per_token[..., 1])
    exact = sf.SourceAnalyzer(model, ClassificationTask(), run, method="influence", fisher="empirical", damping=1e-3,
                              batch_size=32, progress=False).pairwise_scores(query, train)
    assert float((results["low-rank"][0] - exact).abs().max() / exact.abs().max()) > 1e-4  # rank 2 truncates
