"""csrc/to_queries_innermost (W = r ⊙ ũ written queries-innermost) against torch.mul: the same bits, padding
lanes zeroed, and the walk's use of it."""
import pytest
import torch

from _backends import at_thread_counts
from source_fast import _compiled, _extension, walk
from source_fast.reference import to_queries_innermost_ref

pytestmark = pytest.mark.usefixtures("_needs_extension")



def _padding(out: torch.Tensor) -> torch.Tensor:
    q, o, i = out.shape
    qs = out.stride(2)
    return torch.as_strided(out, (o, i, qs - q), (out.stride(1), qs, 1), out.storage_offset() + q)


def _nan_filled_out(q, o, i):
    out = _extension.queries_innermost_empty(q, o, i, dtype=torch.float32, device=torch.device("cpu"))
    qs = out.stride(2)
    torch.as_strided(out, (o, i, qs), (i * qs, qs, 1), out.storage_offset()).fill_(float("nan"))
    return out


@pytest.mark.parametrize("q,o,i", [(1, 1, 1), (5, 7, 9), (16, 16, 16), (19, 5, 7), (33, 13, 41), (40, 3, 100)],
                         ids=["1", "tiny", "one-line", "partial-line", "odd", "two-lines-and-a-half"])
@pytest.mark.parametrize("scaled", [True, False], ids=["r", "copy"])
def test_to_queries_innermost_equals_torch_mul(q, o, i, scaled):
    gen = torch.Generator().manual_seed(q + o + i)
    x, r = torch.randn(q, o, i, generator=gen), torch.rand(o, i, generator=gen) if scaled else None
    got = _extension.to_queries_innermost_cpu(x, r, out=_nan_filled_out(q, o, i))
    assert torch.equal(got, x * r if scaled else x)  # one rounding per element: the same bits
    assert not _padding(got).isnan().any() and not _padding(got).any()
    assert torch.allclose(got.double(), to_queries_innermost_ref(x, r))


def test_to_queries_innermost_strided_rows_and_streamed_result():
    """Rows of x further apart than O·I (a slice of a larger batch); a result above 64 MiB (streamed stores)."""
    big = torch.randn(37, 9, 50)
    x, r = big[:, :6, :], torch.rand(6, 50)
    assert x.stride(0) > 6 * 50
    assert torch.equal(_extension.to_queries_innermost_cpu(x, r), x * r)
    x, r = torch.randn(120, 2, 70000), torch.rand(2, 70000)  # 140,000 x 128 floats = 68 MiB
    got = _extension.to_queries_innermost_cpu(x, r)
    assert torch.equal(got, x * r) and not _padding(got).any()


def test_to_queries_innermost_bitwise_independent_of_threads():
    x, r = torch.randn(50, 40, 90), torch.rand(40, 90)
    one, two = at_thread_counts(lambda: _extension.to_queries_innermost_cpu(x, r))
    assert torch.equal(one, two)


def test_to_queries_innermost_rejects_bad_arguments():
    x, r = torch.randn(5, 6, 7), torch.rand(6, 7)
    with pytest.raises(TypeError, match="x: the cpu backend accepts float32 only"):
        _extension.to_queries_innermost_cpu(x.double(), r)
    with pytest.raises(ValueError, match=r"x: expected each query's \[O, I\] contiguous"):
        _extension.to_queries_innermost_cpu(x.transpose(1, 2), r.T.contiguous())
    with pytest.raises(ValueError, match=r"r: expected a contiguous \[O, I\] = \[6, 7\]"):
        _extension.to_queries_innermost_cpu(x, r.T)
    with pytest.raises(ValueError, match="out: expected a queries-innermost"):
        _extension.to_queries_innermost_cpu(x, r, out=torch.empty(5, 6, 7))


def test_walk_accumulation_term_uses_it_and_matches_torch(monkeypatch):
    """The walk's W = r ⊙ ũ into the queries-innermost layout: compiled on fp32 CPU (a recycled buffer's NaN
    padding rewritten to zero), the same bits as the torch path."""
    x, r = torch.randn(40, 30, 60), torch.rand(30, 60)
    assert walk._compiled_writes_ok(x, r)  # its first-use check runs here, not in the count below
    calls = []
    original = _extension.to_queries_innermost_cpu
    monkeypatch.setattr(_extension, "to_queries_innermost_cpu", lambda *a, **k: calls.append(1) or original(*a, **k))
    reuse = _nan_filled_out(40, 30, 60)
    got = walk._accumulation_term(x, r, queries_innermost=True, last_use=False, reuse=reuse)
    assert calls == [1] and got.data_ptr() == reuse.data_ptr()
    assert torch.equal(got, x * r) and not _padding(got).any()
    monkeypatch.setattr(walk, "_compiled_writes_ok", lambda *a: False)
    torch_path = walk._accumulation_term(x, r, queries_innermost=True, last_use=False)
    assert torch.equal(torch_path, got) and _extension.is_queries_innermost(torch_path)


def test_compiled_product_check_failure_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(_compiled, "_passed", {})
    monkeypatch.setattr(walk, "_check_writes", lambda: False)
    x, r = torch.randn(40, 30, 60), torch.rand(30, 60)
    with pytest.warns(RuntimeWarning, match="compiled queries-innermost writes disagrees with torch"):
        assert not walk._compiled_writes_ok(x, r)
    assert not walk._compiled_writes_ok(x, r)  # decided once per process
