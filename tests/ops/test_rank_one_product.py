"""csrc/rank_one_product (left @ (w ⊙ g_q a_qᵀ), written queries-innermost) vs the float64 reference, and its
routing from RankOneDirections (compiled on fp32 CPU, the torch product otherwise)."""
import pytest
import torch

from _backends import at_thread_counts
from source_fast import _extension, directions
from source_fast.directions import RankOneDirections
from source_fast.reference import rank_one_product_ref

pytestmark = pytest.mark.usefixtures("_needs_extension")



def _inputs(p, q, o, i, seed=0):
    gen = torch.Generator().manual_seed(seed)
    left = torch.linalg.eigh(torch.randn(max(p, o), max(p, o), generator=gen, dtype=torch.float64)
                             @ torch.randn(max(p, o), max(p, o), generator=gen, dtype=torch.float64).T)[1]
    left = left[:p, :o].float()  # column-major slice of an eigenvector matrix, like Q_S
    return (left, torch.randn(q, o, generator=gen), torch.randn(q, i, generator=gen),
            torch.rand(o, i, generator=gen) + 0.1)


def _padding(out: torch.Tensor) -> torch.Tensor:
    """The lanes q in [Q, Qs) of the [P, I, Qs] buffer behind a queries-innermost [Q, P, I] view."""
    q, p, i = out.shape
    qs = out.stride(2)
    return torch.as_strided(out, (p, i, qs - q), (out.stride(1), qs, 1), out.storage_offset() + q)


def _check(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = max(want.abs().max().item(), 1.0)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * scale), (got.double() - want).abs().max()


SHAPES = [  # (P, Q, O, I): size 1, odd, a partial row tile, one/half/partial 32-column panels, several query lines
    pytest.param(1, 1, 1, 1, id="1x1x1x1"),
    pytest.param(7, 5, 7, 9, id="tiny"),
    pytest.param(41, 37, 41, 123, id="odd"),
    pytest.param(13, 17, 29, 33, id="panel+1"),
    pytest.param(12, 16, 8, 48, id="panel+half"),
    pytest.param(25, 33, 19, 64, id="whole-panels"),
]


@pytest.mark.parametrize("p,q,o,i", SHAPES)
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "ones"])
def test_rank_one_product_matches_float64(p, q, o, i, weighted):
    left, g, a, w = _inputs(p, q, o, i)
    w = w if weighted else None
    got = _extension.rank_one_product_cpu(left, g, a, w)
    _check(got, rank_one_product_ref(left, g, a, w))
    assert _extension.is_queries_innermost(got) and got.stride(2) == _extension.padded_queries(q)
    assert torch.equal(_padding(got), torch.zeros_like(_padding(got)))  # what the sparse kernel reads


def test_rank_one_product_strided_operands_and_out():
    """Transposed g / a / weight views, and out= into a NaN-filled buffer: every lane rewritten, padding zeroed."""
    left, g, a, w = _inputs(30, 21, 26, 70, seed=1)
    g_t, a_t, w_t = g.T.contiguous().T, a.T.contiguous().T, w.T.contiguous().T
    out = _extension.queries_innermost_empty(21, 30, 70, dtype=torch.float32, device=torch.device("cpu"))
    torch.as_strided(out, (30, 70, out.stride(2)), (out.stride(1), out.stride(2), 1), out.storage_offset()).fill_(
        float("nan"))
    got = _extension.rank_one_product_cpu(left, g_t, a_t, w_t, out=out)
    assert got.data_ptr() == out.data_ptr()
    _check(got, rank_one_product_ref(left, g, a, w))
    assert torch.equal(_padding(got), torch.zeros_like(_padding(got)))


def test_rank_one_product_streamed_result():
    """A result above the streaming threshold (64 MiB) is written with non-temporal stores: same numbers."""
    left, g, a, w = _inputs(256, 120, 8, 600, seed=2)  # 256 x 600 x 128 floats = 75 MiB
    _check(_extension.rank_one_product_cpu(left, g, a, w), rank_one_product_ref(left, g, a, w))


def test_rank_one_product_bitwise_independent_of_threads():
    left, g, a, w = _inputs(50, 40, 60, 90, seed=3)
    one, two = at_thread_counts(lambda: _extension.rank_one_product_cpu(left, g, a, w))
    assert torch.equal(one, two)


def test_rank_one_product_rejects_bad_arguments():
    left, g, a, w = _inputs(6, 5, 7, 9)
    with pytest.raises(TypeError, match="left: the cpu backend accepts float32 only"):
        _extension.rank_one_product_cpu(left.double(), g, a, w)
    with pytest.raises(ValueError, match=r"expected \[P, O\], \[Q, O\], \[Q, I\]"):
        _extension.rank_one_product_cpu(left, g[:, :3], a, w)
    with pytest.raises(ValueError, match=r"weight: expected shape \[O, I\] = \[7, 9\], got \(9, 7\)"):
        _extension.rank_one_product_cpu(left, g, a, w.T)
    with pytest.raises(ValueError, match="out: expected a float32 queries-innermost"):
        _extension.rank_one_product_cpu(left, g, a, w, out=torch.empty(5, 6, 9))


def test_rank_one_directions_route_to_the_compiled_product(monkeypatch):
    """fp32 CPU factors with enough work use csrc/rank_one_product; its result matches the torch product's."""
    left, g, a, w = _inputs(64, 40, 64, 100, seed=4)
    r = RankOneDirections(g, a, w)
    assert directions._compiled_rank_one_ok(left, r)
    calls = []
    original = _extension.rank_one_product_cpu
    monkeypatch.setattr(_extension, "rank_one_product_cpu", lambda *args: calls.append(1) or original(*args))
    compiled = r.left_product_queries_innermost(left)
    assert calls == [1]
    monkeypatch.setattr(directions, "_compiled_rank_one_ok", lambda *args: False)
    _check(compiled, r.left_product_queries_innermost(left).double())
    assert not directions._compiled_rank_one_ok(left.double(), RankOneDirections(g.double(), a.double(), w.double()))


def test_rank_one_self_test_failure_falls_back_with_a_warning(monkeypatch):
    from source_fast import _compiled

    monkeypatch.setattr(_compiled, "_passed", {})
    monkeypatch.setattr(_extension, "rank_one_product_cpu", lambda left, g, a, w=None: rank_one_product_ref(
        left, g, a, w).float().mul_(1.01))
    left, g, a, w = _inputs(64, 40, 64, 100)
    with pytest.warns(RuntimeWarning, match="compiled rank_one_product disagrees"):
        assert not directions._compiled_rank_one_ok(left, RankOneDirections(g, a, w))
