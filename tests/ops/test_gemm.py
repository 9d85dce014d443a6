"""csrc/gemm (the CPU GEMM behind basis rotations and the rotated walk) vs float64 torch products."""
import pytest
import torch

from _backends import at_thread_counts
from source_fast import _linalg

pytestmark = pytest.mark.usefixtures("_needs_extension")



def _check(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = max(want.abs().max().item(), 1.0)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * scale), (got.double() - want).abs().max()


CASES = [  # (a shape, b shape): every operand layout the pipeline uses, sizes 1, odd, above one block
    pytest.param((1, 1), (1, 1), id="1x1x1"),
    pytest.param((13, 41), (41, 37), id="2d"),  # last panel of 5 columns: the 256-bit narrow tile
    pytest.param((14, 50), (50, 45), id="2d-last-panel-13-columns"),  # the 16-lane narrow tile
    pytest.param((40, 129), (129, 129), id="2d-width-129"),  # an input dimension plus the bias column
    pytest.param((3, 17, 400), (400, 450), id="3d@2d-short-wide-transposed"),  # 51 rows x 450 columns: Cᵀ = Bᵀ Aᵀ
    pytest.param((3, 29, 400), (400, 70), id="3d@2d-K-above-block"),
    pytest.param((5, 1, 41), (41, 600), id="3d@2d-one-row-N-above-block"),
    pytest.param((23, 29), (4, 29, 31), id="2d@3d-shared-left"),
    pytest.param((23, 29), (1, 29, 31), id="2d@3d-one-entry-transposed"),
    pytest.param((40, 300), (3, 300, 50), id="2d@3d-per-entry-threads"),
    pytest.param((4, 13, 17), (4, 17, 19), id="3d@3d"),
    pytest.param((7, 0), (0, 5), id="K0"),
]


@pytest.mark.parametrize("a_shape,b_shape", CASES)
def test_gemm_matches_float64(a_shape, b_shape):
    from source_fast import _extension

    a, b = torch.randn(a_shape), torch.randn(b_shape)
    _check(_extension.gemm_cpu(a, b), a.double() @ b.double())


def test_gemm_strided_operands():
    from source_fast import _extension

    a = torch.randn(6, 40, 30).transpose(1, 2)[::2]  # [3, 30, 40], not viewable as rows
    b = torch.randn(50, 40).T                        # column-major, like torch.linalg.eigh's vectors
    _check(_extension.gemm_cpu(a, b), a.double() @ b.double())
    left = torch.randn(30, 33).T[:, ::2]             # [33, 15]... strided shared left factor
    x = torch.randn(3, 15, 20)
    _check(_extension.gemm_cpu(left, x), left.double() @ x.double())


def test_gemm_bitwise_independent_of_threads():
    from source_fast import _extension

    # (row tiles split between threads, whole entries per thread, shared left factor run transposed)
    for a, b in [(torch.randn(2, 100, 500), torch.randn(500, 90)), (torch.randn(3, 100, 500), torch.randn(3, 500, 90)),
                 (torch.randn(100, 500), torch.randn(1, 500, 90))]:
        one, two = at_thread_counts(lambda: _extension.gemm_cpu(a, b))  # noqa: B023 (called at once)
        assert torch.equal(one, two)


def test_linalg_matmul_routes_and_falls_back():
    """Large fp32 CPU products use the compiled GEMM; float64, autograd and narrow outputs use torch."""
    a, b = torch.randn(64, 300), torch.randn(300, 200)
    assert _linalg._compiled_ok(a, b)
    _check(_linalg.matmul(a, b), a.double() @ b.double())
    assert not _linalg._compiled_ok(a.double(), b.double())
    assert not _linalg._compiled_ok(a, b[:, :8])            # 8 columns: padding would dominate
    assert not _linalg._compiled_ok(a.requires_grad_(), b)  # autograd needs torch
    assert not _linalg._compiled_ok(torch.randn(3, 4, 5), torch.randn(2, 5, 6))  # batch mismatch


@pytest.mark.parametrize("a_shape,b_shape", [((13, 41), (41, 37)), ((3, 29, 400), (400, 70)),
                                             ((23, 29), (4, 29, 31)), ((23, 29), (1, 29, 31)),
                                             ((4, 13, 17), (4, 17, 19))])
def test_gemm_writes_into_out(a_shape, b_shape):
    """out= (the walk's buffer reuse): written in place, strided outputs included, same bits as a fresh result."""
    from source_fast import _extension

    a, b = torch.randn(a_shape), torch.randn(b_shape)
    fresh = _extension.gemm_cpu(a, b)
    out = torch.full(fresh.shape, float("nan"))
    assert _extension.gemm_cpu(a, b, out=out) is out
    assert torch.equal(out, fresh)
    strided = torch.full(fresh.shape[:-2] + (fresh.shape[-1], fresh.shape[-2]), float("nan")).transpose(-1, -2)
    _extension.gemm_cpu(a, b, out=strided)
    _check(strided, a.double() @ b.double())
    with pytest.raises(ValueError, match="out: expected shape"):
        _extension.gemm_cpu(a, b, out=torch.empty(3, 3))
    with pytest.raises(TypeError, match="out: the cpu backend accepts float32"):
        _extension.gemm_cpu(a, b, out=fresh.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_sided_in_place_matches_out_of_place(dtype, monkeypatch):
    """The walk's basis change over its own buffer, a chunk of queries at a time (chunks of 3 here)."""
    from source_fast import walk

    monkeypatch.setattr(walk, "_IN_PLACE_CHUNK_BYTES", 3 * 40 * 70 * torch.finfo(dtype).bits // 8)
    x, left, right = torch.randn(8, 40, 70, dtype=dtype), torch.randn(40, 40), torch.randn(70, 70)
    want = left.double() @ x.double() @ right.double()
    got = walk._two_sided_(x, left, right)
    assert got.data_ptr() == x.data_ptr()
    _check(got.float(), want)
