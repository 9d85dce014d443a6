"""source_fast/directions.py: query directions held as rank-one factors, and the output-side product
into the queries-innermost layout (both forms against a float64 oracle, several column chunks)."""
import pytest
import torch

from source_fast import _extension, directions
from source_fast.directions import RankOneDirections, as_dense, left_product_queries_innermost


def _factors(q=5, o=7, i=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(q, o, generator=gen), torch.randn(q, i, generator=gen), torch.rand(o, i, generator=gen) + 0.1)


def test_rank_one_dense_and_weighting():
    g, a, w = _factors()
    r = RankOneDirections(g, a)
    assert r.shape == (5, 7, 11) and r.dtype == torch.float32
    want = g.double()[:, :, None] * a.double()[:, None, :]
    assert torch.allclose(r.dense().double(), want, rtol=1e-6)
    weighted = r.weighted(w).weighted(2 * w)
    assert torch.allclose(weighted.dense().double(), want * 2 * w.double() ** 2, rtol=1e-5)
    assert as_dense(want) is want


@pytest.mark.parametrize("chunk_bytes", [1, 7 * 16 * 4 * 3, 1 << 24], ids=["one-column", "three-columns", "one-chunk"])
@pytest.mark.parametrize("q", [1, 5, 17])
def test_left_product_queries_innermost_matches_oracle(chunk_bytes, q, monkeypatch):
    """Both forms: left @ W[q] in a [Q, O, I] view of a zero-padded [O, I, Qs] buffer."""
    monkeypatch.setattr(directions, "_CHUNK_BYTES", chunk_bytes)
    g, a, w = _factors(q=q)
    left = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))[0]
    r = RankOneDirections(g, a, w)
    want = left @ r.dense().double()
    for got in (r.left_product_queries_innermost(left), left_product_queries_innermost(left, r.dense())):
        assert got.shape == (q, 7, 11)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
        base = got.permute(1, 2, 0)  # the buffer [O, I, Q..]: queries innermost, padded to whole vectors
        assert got.stride(0) == 1 and got.stride(1) == 11 * got.stride(2)
        qs = got.stride(2)
        assert qs % _extension.QUERY_PAD == 0 and qs >= q
        padded = torch.as_strided(base, (7, 11, qs), (11 * qs, qs, 1))
        assert torch.equal(padded[..., q:], torch.zeros_like(padded[..., q:]))
        assert _extension._sparse_layout(got) is got  # the sparse kernel reads it in place


def test_rank_one_rejects_mismatched_factors():
    g, a, w = _factors()
    with pytest.raises(ValueError, match="same Q"):
        RankOneDirections(g, a[:2])
    with pytest.raises(ValueError, match=r"weight must be \[O, I\]"):
        RankOneDirections(g, a, w.T)


@pytest.mark.parametrize("chunk_bytes", [1, 11 * 16 * 4 * 3, 1 << 24], ids=["one-row", "three-rows", "one-chunk"])
@pytest.mark.parametrize("q", [1, 17])
def test_right_product_queries_innermost_matches_oracle(chunk_bytes, q, monkeypatch):
    """Q_S W Q_Aᵀ without leaving the queries-innermost layout: the left product, then W'[q] @ right per query
    in place (several output rows per scratch chunk or one), padding lanes still zero."""
    monkeypatch.setattr(directions, "_CHUNK_BYTES", chunk_bytes)
    g, a, w = _factors(q=q)
    left = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(11, 11, dtype=torch.float64))[0].T
    r = RankOneDirections(g, a, w)
    want = left @ r.dense().double() @ right
    got = directions.right_product_queries_innermost(r.left_product_queries_innermost(left), right)
    assert got.shape == (q, 7, 11) and _extension.is_queries_innermost(got)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    qs = got.stride(2)
    padded = torch.as_strided(got.permute(1, 2, 0), (7, 11, qs), (11 * qs, qs, 1))
    assert torch.equal(padded[..., q:], torch.zeros_like(padded[..., q:]))
    with pytest.raises(ValueError, match="queries-innermost"):
        directions.right_product_queries_innermost(r.dense(), right)
