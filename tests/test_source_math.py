"""SOURCE_MATH.md §5 checks at the level of the math: spectral functions, the query walk on
known curvature, exact unrolling and finite-difference retraining (float64)."""
import math

import pytest
import torch

from source_fast import ops, spectral
from source_fast.ekfac import EKFACBlock, source_operators
from source_fast.walk import query_walk

torch.set_default_dtype(torch.float32)
F64 = torch.float64


# ---------------------------------------------------------------- §5.5 spectral functions
@pytest.mark.parametrize("c", [1e-8, 0.3, 1.0, 50.0, 1e8])
def test_accumulation_is_finite_positive_decreasing_and_bounded(c):
    sigma = torch.cat([torch.zeros(1, dtype=F64), torch.logspace(-30, 30, 400, dtype=F64)])
    r = spectral.evaluate(spectral.accumulation(c), sigma)
    s = spectral.evaluate(spectral.propagation(c), sigma)
    assert torch.isfinite(r).all() and torch.isfinite(s).all()
    assert r[0].item() == pytest.approx(c, rel=1e-15) and s[0].item() == 1.0
    assert (r > 0).all() or c * sigma.max() > 700  # positive wherever representable
    assert (r[1:] <= r[:-1] * (1 + 1e-12)).all(), "r must be non-increasing in σ"
    bound = torch.minimum(torch.full_like(sigma, c), 1.0 / sigma.clamp_min(1e-300))
    assert (r <= bound * (1 + 1e-12)).all()
    ratio = r * (sigma + 1.0 / c)
    assert (ratio >= 1 - 1e-12).all() and (ratio <= 1.2985).all()


def test_accumulation_has_no_cancellation_near_zero():
    c = 2.0
    sigma = torch.tensor([1e-20, 1e-12, 1e-8, 1e-6, 1e-3], dtype=F64)
    exact = torch.tensor([(-math.expm1(-c * x)) / x for x in sigma.tolist()], dtype=F64)
    got = spectral.evaluate(spectral.accumulation(c), sigma)
    assert torch.allclose(got, exact, rtol=1e-12, atol=0)
    got32 = spectral.evaluate(spectral.accumulation(c), sigma.float())
    assert torch.allclose(got32.double(), exact, rtol=1e-6, atol=0)


def test_spectral_rejects_bad_parameters():
    with pytest.raises(ValueError, match="damping > 0"):
        spectral.inverse(0.0)
    with pytest.raises(ValueError, match="c must be a finite number"):
        spectral.accumulation(float("nan"))
    with pytest.raises(ValueError, match="kind must be one of"):
        spectral.Spectral("bogus")


def test_discrete_operators_match_repeated_steps():
    sigma = torch.tensor([0.0, 0.1, 1.0, 3.0], dtype=F64)
    eta, steps = 0.2, 7
    s = spectral.evaluate(spectral.Spectral("discrete_s", eta=eta, steps=steps), sigma)
    r = spectral.evaluate(spectral.Spectral("discrete_r", eta=eta, steps=steps), sigma)
    assert torch.allclose(s, (1 - eta * sigma) ** steps)
    assert torch.allclose(r, sum(eta * (1 - eta * sigma) ** j for j in range(steps)), rtol=1e-12)


# ------------------------------------------------------- §5.6 eigen-projection vs dense
def _random_block(o, i, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q_s = torch.linalg.qr(torch.randn(o, o, generator=g, dtype=F64))[0]
    q_a = torch.linalg.qr(torch.randn(i, i, generator=g, dtype=F64))[0]
    lam = torch.rand(o, i, generator=g, dtype=F64) * 2
    return EKFACBlock(q_a.to(dtype), q_s.to(dtype), lam.to(dtype))


@pytest.mark.parametrize("fn", [spectral.accumulation(0.7), spectral.propagation(0.7), spectral.inverse(0.1)],
                         ids=lambda f: f.kind)
def test_kron_project_equals_dense_kronecker_form(fn):
    o, i = 3, 5  # i includes a bias column: the layout is row-major [O, I]
    block = _random_block(o, i)
    v = torch.randn(4, o, i, dtype=F64)
    got = ops.kron_project(v, block.q_s, block.q_a, block.lam, fn)
    basis = torch.kron(block.q_s, block.q_a)
    dense = basis @ torch.diag(spectral.evaluate(fn, block.lam).reshape(-1)) @ basis.T
    want = (dense @ v.reshape(4, -1).T).T.reshape(4, o, i)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(block.dense(), basis @ torch.diag(block.lam.reshape(-1)) @ basis.T)


# ------------------------------------------------------------ §5.2 segment splitting
def test_splitting_a_stationary_segment_changes_no_score():
    block = {"w": _random_block(3, 4, seed=1)}
    u = {"w": torch.randn(5, 3, 4, dtype=F64)}
    g = torch.randn(7, 3, 4, dtype=F64)
    c1, c2 = 0.4, 1.3
    whole = query_walk(u, [block], [source_operators(c1 + c2)])
    split = query_walk(u, [block, block], [source_operators(c1), source_operators(c2)])
    score_whole = torch.einsum("qoi,noi->qn", whole[0]["w"], g)
    score_split = sum(torch.einsum("qoi,noi->qn", v["w"], g) for v in split)
    assert torch.allclose(score_whole, score_split, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------ §5.3 / §5.4 limits of c
def test_large_c_limit_is_the_influence_function():
    block = _random_block(3, 4, seed=2)  # all Λ > 0: the pseudo-inverse is the inverse
    block.lam += 0.05
    u = torch.randn(2, 3, 4, dtype=F64)
    v = query_walk({"w": u}, [{"w": block}], [source_operators(1e9)])[0]["w"]
    basis = torch.kron(block.q_s, block.q_a)
    pinv = torch.linalg.pinv(basis @ torch.diag(block.lam.reshape(-1)) @ basis.T)
    assert torch.allclose(v.reshape(2, -1), u.reshape(2, -1) @ pinv, rtol=1e-8, atol=1e-10)


def test_small_c_limit_is_the_lr_weighted_gradient_dot():
    blocks = [{"w": _random_block(3, 4, seed=s)} for s in range(3)]
    cs = [1e-7, 3e-7, 2e-7]
    u = {"w": torch.randn(2, 3, 4, dtype=F64)}
    g_bar = [torch.randn(6, 3, 4, dtype=F64) for _ in cs]
    vs = query_walk(u, blocks, [source_operators(c) for c in cs])
    scores = sum(torch.einsum("qoi,noi->qn", v["w"], g) for v, g in zip(vs, g_bar))
    dot = sum(c * torch.einsum("qoi,noi->qn", u["w"], g) for c, g in zip(cs, g_bar))
    assert torch.allclose(scores / dot, torch.ones_like(dot), atol=1e-5)


# ------------------------------------------- §5.1 exact unrolling and finite differences
def _least_squares(n=12, d=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)
    xq, yq = torch.randn(d, generator=g, dtype=F64), torch.tensor(0.7, dtype=F64)
    return x, y, xq, yq


def _train(x, y, lrs, weights, momentum=0.0, theta0=None):
    """Full-batch GD on (1/N) Σ w_i · ½(θ·x_i − y_i)²; returns all iterates θ_0..θ_T."""
    n = x.shape[0]
    theta = torch.zeros(x.shape[1], dtype=F64) if theta0 is None else theta0.clone()
    buf = torch.zeros_like(theta)
    traj = [theta.clone()]
    for eta in lrs:
        grad = (weights * (x @ theta - y)) @ x / n
        buf = momentum * buf + grad
        theta = theta - eta * buf
        traj.append(theta.clone())
    return traj


def test_one_step_segments_reproduce_unrolling_and_retraining():
    x, y, xq, yq = _least_squares()
    n, d = x.shape
    lrs = [0.3, 0.25, 0.2, 0.2, 0.15, 0.1, 0.1, 0.05]
    m = 5
    traj = _train(x, y, lrs, torch.ones(n, dtype=F64))
    hessian = x.T @ x / n  # exact and constant for least squares
    evals, evecs = torch.linalg.eigh(hessian)
    block = EKFACBlock(evecs, torch.ones(1, 1, dtype=F64), evals[None, :])  # O = 1: the Kronecker form is exact
    query_grad = (traj[-1] @ xq - yq) * xq
    # L = T segments of one step, the exact discrete operators, exact per-step gradients.
    operators = [source_operators(0, operator="discrete", eta=eta, steps=1) for eta in lrs]
    vs = query_walk({"w": query_grad[None, None, :]}, [{"w": block}] * len(lrs), operators)
    grads_m = [(theta @ x[m] - y[m]) * x[m] for theta in traj[:-1]]
    tau = sum((v["w"][0, 0] @ g) for v, g in zip(vs, grads_m)) / n
    # (U): dθ_T/dε = −Σ_k Π_{k'>k}(I − η_{k'}H) (η_k/N) ∇L_m(θ_k); τ = −∇fᵀ dθ_T/dε.
    dtheta = torch.zeros(d, dtype=F64)
    for k, eta in enumerate(lrs):
        prod = torch.eye(d, dtype=F64)
        for k2 in range(k + 1, len(lrs)):
            prod = (torch.eye(d, dtype=F64) - lrs[k2] * hessian) @ prod
        dtheta -= prod @ (eta / n * grads_m[k])
    tau_unrolled = -(query_grad @ dtheta)
    assert tau.item() == pytest.approx(tau_unrolled.item(), rel=1e-10, abs=1e-14)
    # Finite-difference retraining: τ ≈ −df/dε (central difference, weights 1 + ε on example m).
    eps = 1e-5

    def f(e):
        w = torch.ones(n, dtype=F64)
        w[m] += e
        theta = _train(x, y, lrs, w)[-1]
        return 0.5 * (theta @ xq - yq) ** 2

    tau_fd = -(f(eps) - f(-eps)) / (2 * eps)
    assert tau.item() == pytest.approx(tau_fd.item(), rel=1e-7, abs=1e-12)


def test_momentum_uses_effective_learning_rate_mass():
    """Heavy ball on a stationary quadratic (start at the optimum, so ∇L_m is constant): SOURCE with
    c/(1−β) matches the exact unrolled response once K ≫ 1/(1−β); without the correction it does not."""
    x, y, xq, yq = _least_squares(n=30, d=3, seed=4)
    n = x.shape[0]
    theta_star = torch.linalg.lstsq(x, y).solution
    eta, beta, steps, m = 0.002, 0.9, 150, 2
    hessian = x.T @ x / n
    eps = 1e-6

    def f(e):
        w = torch.ones(n, dtype=F64)
        w[m] += e
        theta = _train(x, y, [eta] * steps, w, momentum=beta, theta0=theta_star)[-1]
        return 0.5 * (theta @ xq - yq) ** 2

    tau_exact = (-(f(eps) - f(-eps)) / (2 * eps)).item()
    evals, evecs = torch.linalg.eigh(hessian)
    block = {"w": EKFACBlock(evecs, torch.ones(1, 1, dtype=F64), evals[None, :])}
    q = ((theta_star @ xq - yq) * xq)[None, None, :]
    g_m = (theta_star @ x[m] - y[m]) * x[m]

    def source(c):
        v = query_walk({"w": q}, [block], [source_operators(c)])[0]["w"][0, 0]
        return (v @ g_m / n).item()

    assert source(eta * steps / (1 - beta)) == pytest.approx(tau_exact, rel=0.05)
    assert abs(source(eta * steps) - tau_exact) > 0.3 * abs(tau_exact)


# ------------------------------------------- the eigenbasis walks equal the parameter-space walk
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_rotated_walks_equal_the_parameter_space_walk(dtype):
    """rotated_walk (kept results) and rotated_walk_visit (one reused W buffer, u consumed, a workspace
    reused by a second, smaller batch) give W_ℓ with ⟨v_ℓ, G⟩ = ⟨W_ℓ, Q_Sᵀ G Q_A⟩ for query_walk's v_ℓ."""
    from source_fast.walk import WalkPlan, rotated_walk, rotated_walk_visit

    blocks = [{"w": _random_block(5, 7, seed=s)} for s in range(3)]
    operators = [source_operators(c) for c in (0.3, 1.1, 0.7)]
    cast = [{"w": b["w"].to(dtype=dtype)} for b in blocks]
    plan = WalkPlan(cast, operators, dtype)
    workspace = {}
    for q in (6, 4):  # the second batch reuses the first one's buffers
        u = torch.randn(q, 5, 7, dtype=F64)
        want = query_walk({"w": u}, blocks, operators)
        last = blocks[-1]["w"]
        u_rot = (last.q_s.T @ u @ last.q_a).to(dtype)
        kept = rotated_walk({"w": u_rot.clone()}, cast, operators, plan=plan)
        visited = {}
        rotated_walk_visit({"w": u_rot}, plan, lambda seg, name, w: visited.__setitem__(seg, w.clone()),
                           workspace=workspace)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
        for seg, block in enumerate(blocks):
            b = block["w"]
            back = b.q_s @ visited[seg].double() @ b.q_a.T  # W_ℓ rotated back to parameter space
            assert torch.allclose(back, want[seg]["w"], **tol)
            assert torch.allclose(kept[seg]["w"].double(), visited[seg].double(), **tol)
    assert workspace["w:w"].shape[0] == 6  # allocated once, for the larger batch
