"""The C++ `cpu` backend takes fp16/bf16 inputs by upcasting them to float32 (exactly): the numbers are those of
its fp32 kernels on the same values, and the automatic dispatch picks it for 16-bit CPU tensors (it beat the
torch backend 2.1-8.8x on them: benchmarks/results/cpu_half_inputs.md)."""
import pytest
import torch

from _backends import available_backends, eigh_basis
from source_fast import _dispatch, ops

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the C++ extension is not built")
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _tokens(dtype, n=9, t=3, i=21, o=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, i, generator=gen).to(dtype), torch.randn(n, t, o, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_half_inputs_give_the_fp32_kernels_numbers(dtype):
    a, g = _tokens(dtype)
    v = torch.randn(4, 13, 21).to(dtype)
    q_a, q_s = eigh_basis(21), eigh_basis(13)
    w = torch.rand(13, 21)
    x = torch.randn(50, 17).to(dtype)
    up = lambda *ts: [t.float() for t in ts]  # noqa: E731
    assert torch.equal(ops.score_pairwise(v, a, g, backend="cpu"), ops.score_pairwise(*up(v, a, g), backend="cpu"))
    assert torch.equal(ops.covariance(x, backend="cpu"), ops.covariance(x.float(), backend="cpu"))
    assert torch.equal(ops.lambda_accum(a, g, q_a, q_s, backend="cpu"),
                       ops.lambda_accum(*up(a, g), q_a, q_s, backend="cpu"))
    assert torch.equal(ops.score_self(a, g, q_s, q_a, w, backend="cpu"),
                       ops.score_self(*up(a, g), q_s, q_a, w, backend="cpu"))
    u, wr = torch.randn(4, 13, 2).to(dtype), torch.randn(4, 21, 2).to(dtype)
    assert torch.equal(ops.score_lowrank(u, wr, a, g, backend="cpu"),
                       ops.score_lowrank(*up(u, wr, a, g), backend="cpu"))


@pytest.mark.parametrize("dtype", HALF)
def test_dispatch_picks_the_cpu_backend_for_half_cpu_tensors(dtype):
    a, g = _tokens(dtype)
    v = torch.randn(4, 13, 21).to(dtype)
    name, _ = _dispatch.select("score_pairwise", {"v": v, "a": a, "g": g}, None, False)
    assert name == "cpu"


def test_other_dtypes_still_name_the_backend_and_dtype():
    v, a, g = torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(5, 1, 4, dtype=torch.float64), \
        torch.zeros(5, 1, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="float64"):
        ops.score_pairwise(v, a, g, backend="cpu")


def test_entry_points_that_do_not_upcast_still_take_float32_only():
    """gemm_cpu and kron_project_cpu hand tensors to the kernels as they are: 16-bit stays a clear error."""
    from source_fast import _extension

    with pytest.raises(TypeError, match="a: the cpu backend accepts float32 only, got torch.bfloat16"):
        _extension.gemm_cpu(torch.ones(2, 2, dtype=torch.bfloat16), torch.ones(2, 2))
    with pytest.raises(TypeError, match="v: the cpu backend accepts float32 only"):
        _extension.kron_project_cpu(torch.ones(1, 2, 2, dtype=torch.float16), torch.eye(2), torch.eye(2),
                                    torch.ones(2, 2), ())
