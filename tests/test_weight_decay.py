"""Weight decay (docs/DESIGN.md "Weight decay"): an L2 term wd·½‖θ‖² adds wd I to the curvature of the training
dynamics, so a segment's operators are r and s of H̄ + wd I. Checked where it is exact (one-step segments against
unrolling and retraining; heavy ball on a stationary quadratic), the pipeline against the dense oracle (which adds
each parameter's own decay to H̄), and the Adam/AdamW forms where the diagonal model makes them closed-form."""
import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import source_fast as sf
from source_fast import spectral
from source_fast.ekfac import EKFACBlock, source_operators
from source_fast.reference.dense_source import dense_source_scores
from source_fast.walk import query_walk

from _models import ClassificationTask, classification_data, mlp, train_run

F64 = torch.float64


# --------------------------------------------------------------------------- the spectral shift
def test_damping_shifts_every_spectral_function():
    sigma = torch.cat([torch.zeros(1, dtype=F64), torch.logspace(-6, 3, 50, dtype=F64)])
    wd = 0.37
    for shifted, plain in [(spectral.propagation(1.3, wd), spectral.propagation(1.3)),
                           (spectral.accumulation(1.3, wd), spectral.accumulation(1.3)),
                           (spectral.Spectral("discrete_s", eta=0.01, steps=40, damping=wd),
                            spectral.Spectral("discrete_s", eta=0.01, steps=40)),
                           (spectral.Spectral("discrete_r", eta=0.01, steps=40, damping=wd),
                            spectral.Spectral("discrete_r", eta=0.01, steps=40))]:
        assert torch.allclose(spectral.evaluate(shifted, sigma), spectral.evaluate(plain, sigma + wd), rtol=1e-13)
    # exp(−c(σ + wd)) = exp(−c wd) exp(−cσ): weight decay forgets earlier segments by a constant factor more.
    assert torch.allclose(spectral.evaluate(spectral.propagation(1.3, wd), sigma),
                          torch.exp(torch.tensor(-1.3 * wd, dtype=F64)) * spectral.evaluate(spectral.propagation(1.3),
                                                                                             sigma), rtol=1e-13)
    r, s = source_operators(2.0, damping=0.1, weight_decay=wd)
    assert (r.damping, s.damping) == pytest.approx((0.1 + wd, wd))


# ----------------------------------------------- §5.1 with weight decay: unrolling and retraining
def _least_squares(n=12, d=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)
    return x, y, torch.randn(d, generator=g, dtype=F64), torch.tensor(0.7, dtype=F64)


def _train(x, y, lrs, weights, wd, momentum=0.0, theta0=None):
    """Full-batch GD (heavy ball) on (1/N) Σ w_i ½(θ·x_i − y_i)² + wd ½‖θ‖², as torch.optim.SGD's weight_decay."""
    n = x.shape[0]
    theta = torch.zeros(x.shape[1], dtype=F64) if theta0 is None else theta0.clone()
    buf = torch.zeros_like(theta)
    for eta in lrs:
        buf = momentum * buf + (weights * (x @ theta - y)) @ x / n + wd * theta
        theta = theta - eta * buf
    return theta


def test_one_step_segments_with_weight_decay_reproduce_retraining():
    x, y, xq, yq = _least_squares()
    n, d = x.shape
    lrs, wd, m = [0.3, 0.25, 0.2, 0.2, 0.15, 0.1, 0.1, 0.05], 0.8, 5
    hessian = x.T @ x / n  # of the data term; the decay's wd I is the operators' shift
    evals, evecs = torch.linalg.eigh(hessian)
    block = EKFACBlock(evecs, torch.ones(1, 1, dtype=F64), evals[None, :])  # O = 1: the Kronecker form is exact
    thetas = [torch.zeros(d, dtype=F64)]
    for k in range(len(lrs)):
        thetas.append(_train(x, y, lrs[k:k + 1], torch.ones(n, dtype=F64), wd, theta0=thetas[-1]))
    query_grad = (thetas[-1] @ xq - yq) * xq
    grads_m = [(theta @ x[m] - y[m]) * x[m] for theta in thetas[:-1]]

    def tau(weight_decay):
        operators = [source_operators(0, operator="discrete", eta=eta, steps=1, weight_decay=weight_decay)
                     for eta in lrs]
        vs = query_walk({"w": query_grad[None, None, :]}, [{"w": block}] * len(lrs), operators)
        return (sum(v["w"][0, 0] @ g for v, g in zip(vs, grads_m)) / n).item()

    eps = 1e-5

    def f(e):
        w = torch.ones(n, dtype=F64)
        w[m] += e
        return 0.5 * (_train(x, y, lrs, w, wd) @ xq - yq) ** 2

    tau_fd = (-(f(eps) - f(-eps)) / (2 * eps)).item()
    assert tau(wd) == pytest.approx(tau_fd, rel=1e-7, abs=1e-12)
    assert abs(tau(0.0) - tau_fd) > 0.1 * abs(tau_fd)  # ignoring the decay is measurably wrong here


def test_heavy_ball_with_weight_decay_on_a_stationary_quadratic():
    """Start at the optimum of the regularised objective (∇L_m constant): the continuous operators with c/(1−β) on
    H + wd I match the exact response once K ≫ 1/(1−β)."""
    x, y, xq, yq = _least_squares(n=30, d=3, seed=4)
    n = x.shape[0]
    eta, beta, steps, m, wd = 0.002, 0.9, 150, 2, 0.5
    hessian = x.T @ x / n
    theta_star = torch.linalg.solve(hessian + wd * torch.eye(3, dtype=F64), x.T @ y / n)
    eps = 1e-6

    def f(e):
        w = torch.ones(n, dtype=F64)
        w[m] += e
        return 0.5 * (_train(x, y, [eta] * steps, w, wd, momentum=beta, theta0=theta_star) @ xq - yq) ** 2

    tau_exact = (-(f(eps) - f(-eps)) / (2 * eps)).item()
    evals, evecs = torch.linalg.eigh(hessian)
    block = {"w": EKFACBlock(evecs, torch.ones(1, 1, dtype=F64), evals[None, :])}
    q = ((theta_star @ xq - yq) * xq)[None, None, :]
    g_m = (theta_star @ x[m] - y[m]) * x[m]

    def source(weight_decay):
        c = eta * steps / (1 - beta)
        v = query_walk({"w": q}, [block], [source_operators(c, weight_decay=weight_decay)])[0]["w"][0, 0]
        return (v @ g_m / n).item()

    assert source(wd) == pytest.approx(tau_exact, rel=0.05)
    assert abs(source(0.0) - tau_exact) > 0.3 * abs(tau_exact)


# ------------------------------------------------------------------------- the pipeline vs the oracle
@pytest.fixture(scope="module")
def decayed_run():
    data = classification_data(n=24)
    model = mlp()
    ckpts, steps, lrs = train_run(model, data, steps=30, every=5, lr=0.3, weight_decay=0.3,
                                  lr_schedule=lambda k: 0.3 * (1 - k / 40))
    return model, data, ckpts, steps, lrs


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _scores(model, data, run, *, fit_first=False, self_scores=False):
    analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, fisher="empirical", batch_size=7, progress=False)
    if fit_first:
        analyzer.fit(data)
    if self_scores:
        return analyzer.self_scores(data)
    return analyzer.pairwise_scores(Subset(data, range(5)), data)


@pytest.mark.parametrize("schedule", ["one-pass", "segment-by-segment", "block-by-block"])
def test_uniform_weight_decay_matches_the_dense_oracle(decayed_run, monkeypatch, schedule):
    """Every walk: the one-pass schedule's step by step, fit() then segment by segment, and block by block."""
    from source_fast import analyzer as analyzer_module

    if schedule == "block-by-block":
        monkeypatch.setattr(analyzer_module, "SEGMENT_MAJOR_MAX_SCORE_BYTES", 0)
    fit_first = schedule != "one-pass"
    model, data, ckpts, steps, lrs = decayed_run
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3, weight_decay=0.3)
    scores = _scores(model, data, run, fit_first=fit_first)
    oracle = dense_source_scores(model, ClassificationTask(), run, Subset(data, range(5)), data)
    assert _rel(scores, oracle) <= 1e-6
    plain = dense_source_scores(model, ClassificationTask(), sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3),
                                Subset(data, range(5)), data)
    assert _rel(plain, oracle) > 0.05  # the decay changes the scores: the check above can fail
    # A mapping giving every parameter the same decay is the same run.
    named = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3,
                           weight_decay={n: 0.3 for n, _ in model.named_parameters()})
    assert torch.equal(_scores(model, data, named, fit_first=fit_first), scores)


def test_per_layer_weight_decay_matches_the_dense_oracle(decayed_run):
    """Each layer its own decay (biases sharing their weight's): per-layer operators, exact."""
    model, data, ckpts, steps, lrs = decayed_run
    decay = {"0.weight": 0.5, "0.bias": 0.5, "2.weight": 0.05, "2.bias": 0.05}
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3, weight_decay=decay)
    oracle = dense_source_scores(model, ClassificationTask(), run, Subset(data, range(5)), data)
    assert _rel(_scores(model, data, run), oracle) <= 1e-6
    self_oracle = torch.diagonal(dense_source_scores(model, ClassificationTask(), run, data, data))
    assert _rel(_scores(model, data, run, fit_first=True, self_scores=True), self_oracle) <= 1e-6


def test_undecayed_biases_are_an_approximation_measured_against_the_oracle(decayed_run):
    """Parameter groups without decay on biases (the Hugging Face Trainer's) make diag(wd) non-uniform: the walk
    takes its diagonal in each eigenbasis (EK-FAC's projection), the oracle the exact H̄ + diag(wd). Measured: a
    few percent of the scores here, against 50 % for ignoring the decay or for decaying the biases too."""
    model, data, ckpts, steps, lrs = decayed_run
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3, weight_decay={"0.weight": 0.3, "2.weight": 0.3})
    queries = Subset(data, range(5))
    oracle = dense_source_scores(model, ClassificationTask(), run, queries, data)
    scores = _scores(model, data, run)
    plain = _scores(model, data, sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3))
    uniform = _scores(model, data, sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3, weight_decay=0.3))
    print(f"rel. error vs the oracle: projected {_rel(scores, oracle):.3g}, ignored {_rel(plain, oracle):.3g}, "
          f"biases decayed too {_rel(uniform, oracle):.3g}")
    assert _rel(scores, oracle) < 0.35 * min(_rel(plain, oracle), _rel(uniform, oracle))


# ----------------------------------------------------------------------------------- Adam and AdamW
def test_adam_and_adamw_weight_decay_closed_forms():
    """Diagonal curvature (identity eigenbases) and a uniform preconditioner p: Adam (L2 in the gradient) is SGD
    with mass p·c on h + wd; AdamW (decoupled) is SGD with mass p·c on h + wd / p."""
    o, i, c, p, wd = 3, 4, 0.8, 2.0, 0.3
    lam = torch.rand(o, i, dtype=F64) + 0.1
    block = {"w": EKFACBlock(torch.eye(i, dtype=F64), torch.eye(o, dtype=F64), lam)}
    u = {"w": torch.randn(2, o, i, dtype=F64)}
    p_bar = [{"w": torch.full((o, i), p, dtype=F64)}]
    tiny = 1e-13
    full = lambda value: torch.full((o, i), value, dtype=F64)  # noqa: E731
    adam = query_walk(u, [block], [source_operators(c)], adam=p_bar, adam_damping=[{"w": tiny}],
                      adam_decay=[{"w": (full(p * wd), full(wd))}])[0]["w"]
    adamw = query_walk(u, [block], [source_operators(c)], adam=p_bar, adam_damping=[{"w": tiny}],
                       adam_decay=[{"w": (full(wd), full(wd / p))}])[0]["w"]
    assert torch.allclose(adam, spectral.evaluate(spectral.accumulation(p * c, wd), lam) * u["w"], rtol=1e-9)
    assert torch.allclose(adamw, spectral.evaluate(spectral.accumulation(p * c, wd / p), lam) * u["w"], rtol=1e-9)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_runs_take_weight_decay(decayed_run, optimizer):
    model, data, ckpts, steps, _ = decayed_run
    moments = [{k: torch.full_like(v, 1e-2) for k, v in c.items()} for c in ckpts]  # p̄ = 1/(0.1 + eps)
    decay = {"0.weight": 0.2, "2.weight": 0.2}  # biases undecayed

    def analyzer(weight_decay):
        run = sf.TrainingRun(ckpts, steps, lr=1e-2, num_segments=2, optimizer=optimizer,
                             adam_second_moments=moments, weight_decay=weight_decay)
        return sf.SourceAnalyzer(model, ClassificationTask(), run, batch_size=8, progress=False).fit(data)

    decayed = analyzer(decay)
    _, dampings, terms = decayed._adam_terms()
    p = 1 / (0.1 + 1e-8)
    assert dampings == analyzer(0.0)._adam_terms()[1]  # δ is the run's; the decay is its own term
    for name in ("0", "2"):
        rate, shift = terms[0][name]
        weight_rate = 0.2 if optimizer == "adamw" else p * 0.2
        assert torch.allclose(rate[:, :-1], torch.full_like(rate[:, :-1], weight_rate))
        assert torch.equal(rate[:, -1], torch.zeros_like(rate[:, -1]))  # the bias column: no decay
        # The inverse's shift: the eigen-diagonal of diag(wd) (Adam) or diag(wd / p̄) (AdamW).
        inverse_part = torch.full_like(rate, 0.2 / p if optimizer == "adamw" else 0.2)
        inverse_part[:, -1] = 0
        assert torch.allclose(shift, decayed.blocks[0][name].eigen_diagonal(inverse_part), rtol=1e-10)
    queries = Subset(data, range(3))
    scores = decayed.pairwise_scores(queries, data)
    assert not torch.allclose(scores, analyzer(0.0).pairwise_scores(queries, data), rtol=1e-3)
    assert torch.allclose(decayed.self_scores(data), torch.diagonal(decayed.pairwise_scores(data, data)), rtol=1e-8)


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad, match", [
    (-0.1, "weight_decay must be a finite number >= 0, got -0.1"),
    (float("nan"), "weight_decay must be a finite number >= 0"),
    ({"0.weight": -1.0}, r"weight_decay\['0.weight'\] must be a finite number >= 0, got -1.0"),
    ("0.1", "weight_decay must be a finite number >= 0, got '0.1'"),
])
def test_bad_weight_decay_is_named(decayed_run, bad, match):
    _, _, ckpts, steps, lrs = decayed_run
    with pytest.raises(ValueError, match=match):
        sf.TrainingRun(ckpts, steps, lr=lrs, weight_decay=bad)


def test_weight_decay_naming_unknown_parameters_is_named(decayed_run):
    model, data, ckpts, steps, lrs = decayed_run
    run = sf.TrainingRun(ckpts, steps, lr=lrs, weight_decay={"model.0.weight": 0.1})
    with pytest.raises(ValueError, match=r"run.weight_decay names 1 parameters the model does not have, e.g. "
                                         r"\['model.0.weight'\]"):
        sf.SourceAnalyzer(model, ClassificationTask(), run, progress=False)


def test_curvature_report_counts_the_decayed_argument(decayed_run):
    """The regimes are those of the operators' argument c·(σ + wd): a decay with c·wd above `high` in every
    segment makes every direction influence-like; the spectrum stays Λ̄'s."""
    from source_fast.diagnostics import curvature_report

    model, data, ckpts, steps, lrs = decayed_run

    def report(weight_decay):
        run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=3, weight_decay=weight_decay)
        analyzer = sf.SourceAnalyzer(model, ClassificationTask(), run, batch_size=8, progress=False).fit(data)
        return run, curvature_report(analyzer)

    plain_run, plain = report(0.0)
    wd = 20.0 / min(s.c for s in plain_run.segments)
    _, decayed = report(wd)
    assert any(r["influence_like"] < 1 for r in plain)
    assert all(r["influence_like"] == 1.0 for r in decayed)
    for a, b in zip(plain, decayed):
        assert np.array_equal(a["spectrum"], b["spectrum"])


def test_fast_source_takes_the_decay_as_source_does(decayed_run):
    """One checkpoint per segment: Fast-SOURCE's parameter average is the checkpoint, so it is SOURCE, decay and all
    (the decay enters both through the same decayed blocks)."""
    model, data, ckpts, steps, lrs = decayed_run
    run = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=len(ckpts), weight_decay={"0.weight": 0.3, "2.weight": 0.3})
    queries = Subset(data, range(4))

    def scores(method):
        return sf.SourceAnalyzer(model, ClassificationTask(), run, method=method, fisher="empirical", batch_size=7,
                                 progress=False).pairwise_scores(queries, data)

    fast = scores("fast_source")
    assert _rel(fast, scores("source")) <= 1e-9
    plain = sf.TrainingRun(ckpts, steps, lr=lrs, num_segments=len(ckpts))
    undecayed = sf.SourceAnalyzer(model, ClassificationTask(), plain, method="fast_source", fisher="empirical",
                                  batch_size=7, progress=False).pairwise_scores(queries, data)
    assert _rel(fast, undecayed) > 0.05


def test_store_fingerprints_change_only_with_a_decay(decayed_run):
    """Stores written before weight decay was modelled stay valid for runs without one: "adamw" without a decay
    operates as "adam", and the decay enters the fingerprint only when there is one."""
    _, _, ckpts, steps, lrs = decayed_run
    moments = [{k: torch.ones_like(v) for k, v in c.items()} for c in ckpts]

    def fingerprint(**kw):
        return sf.TrainingRun(ckpts, steps, lr=lrs, adam_second_moments=moments, **kw).fingerprint()

    assert fingerprint(optimizer="adamw") == fingerprint(optimizer="adam")
    assert "weight_decay" not in fingerprint(optimizer="adam")
    assert fingerprint(optimizer="adamw", weight_decay=0.1) != fingerprint(optimizer="adam", weight_decay=0.1)
    assert fingerprint(weight_decay=0.1)["weight_decay"] == 0.1
