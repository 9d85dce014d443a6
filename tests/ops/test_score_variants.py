"""Low-rank and per-token scoring (torch backend) vs the float64 references."""
import pytest
import torch

from source_fast import ops, reference


@pytest.mark.parametrize("q,n,t,o,i,r", [(1, 1, 1, 1, 1, 1), (3, 7, 1, 13, 41, 2), (4, 5, 3, 6, 9, 3)],
                         ids=["tiny", "T1", "T3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lowrank_matches_reference(q, n, t, o, i, r, dtype):
    u, w = torch.randn(q, o, r, dtype=dtype), torch.randn(q, i, r, dtype=dtype)
    a, g = torch.randn(n, t, i, dtype=dtype), torch.randn(n, t, o, dtype=dtype)
    got, want = ops.score_lowrank(u, w, a, g), reference.score_lowrank_ref(u, w, a, g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_per_token_matches_reference_and_sums_to_pairwise(dtype):
    v = torch.randn(3, 6, 9, dtype=dtype)
    a, g = torch.randn(5, 4, 9, dtype=dtype), torch.randn(5, 4, 6, dtype=dtype)
    got = ops.score_per_token(v, a, g)
    want = reference.score_per_token_ref(v, a, g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.shape == (3, 5, 4)
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert torch.allclose(got.sum(-1), ops.score_pairwise(v, a, g, backend="torch"), rtol=tol, atol=tol * 10)


def test_lowrank_validates_shapes():
    with pytest.raises(ValueError, match="w must have size 9 in dimension 1"):
        ops.score_lowrank(torch.randn(2, 6, 3), torch.randn(2, 8, 3), torch.randn(5, 1, 9), torch.randn(5, 1, 6))
