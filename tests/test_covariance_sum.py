"""analyzer.CovarianceSum: the fit's Σ x xᵀ over a pass, with short blocks of wide factors gathered before the
product, equals one product over all the rows, whatever the block sizes."""
import pytest
import torch

from source_fast import ops
from source_fast.analyzer import CovarianceSum


@pytest.mark.parametrize("blocks", [[3, 5, 2], [6, 5, 7], [7], [16, 1], [4, 4, 4, 4, 4], [1] * 9, [2, 40, 3]],
                         ids=["short", "spanning", "one", "long-then-short", "exact-buffers", "single-rows", "mixed"])
@pytest.mark.parametrize("width", [6, 3], ids=["gathered", "narrow-direct"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_covariance_sum_equals_one_product(monkeypatch, blocks, width, dtype):
    monkeypatch.setattr(CovarianceSum, "MIN_ROWS", 8)
    monkeypatch.setattr(CovarianceSum, "MIN_WIDTH", 4)
    gen = torch.Generator().manual_seed(sum(blocks) + width)
    parts = [torch.randn(r, width, generator=gen, dtype=dtype) for r in blocks]
    calls = []
    original = ops.covariance
    monkeypatch.setattr(ops, "covariance", lambda x, **k: calls.append(x.shape[0]) or original(x, **k))
    acc = CovarianceSum(width, dtype, torch.device("cpu"))
    for part in parts:
        acc.add(part)
    total = acc.total()
    everything = torch.cat(parts).double()
    torch.testing.assert_close(total.double(), everything.T @ everything, rtol=1e-6, atol=1e-5)
    assert sum(calls) == sum(blocks)
    if width >= 4:  # gathered: every product but a block of >= MIN_ROWS rows and the last flush has MIN_ROWS rows
        assert all(r >= 8 for r in calls[:-1])
    else:
        assert calls == blocks
    assert torch.equal(acc.total(), total)  # total() again adds nothing


def test_covariance_sum_of_nothing_is_zero():
    assert not CovarianceSum(300, torch.float32, torch.device("cpu")).total().any()


@pytest.mark.parametrize("t,d,batched", [(64, 16, True), (9, 3, True), (64, 64, True), (256, 64, True),
                                         (1024, 256, True), (256, 128, False), (64, 128, False), (1, 16, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_rows_with_positions_innermost_sum_in_place(monkeypatch, t, d, batched, dtype):
    """A conv layer's output-gradient rows are [B, positions, D] views of [B, D, positions]: where it measured faster
    (narrow D, or many positions per example) their Σ x xᵀ is one batched product over those views (no flattening
    copy), symmetric, equal to the covariance of the flattened rows; otherwise the rows are flattened and added."""
    b = 3
    gy = torch.randn(b, d, t, generator=torch.Generator().manual_seed(t + d), dtype=dtype)
    rows = gy.transpose(1, 2)  # [B, T, D], positions innermost
    added = []
    acc = CovarianceSum(d, dtype if dtype == torch.float64 else torch.float32, torch.device("cpu"))
    original = acc.add
    monkeypatch.setattr(acc, "add", lambda x: added.append(x.shape) or original(x))
    acc.add_tokens(rows)
    flat = rows.reshape(-1, d).double()
    total = acc.total()
    tol = {"rtol": 1e-12, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-3}
    torch.testing.assert_close(total.double(), flat.T @ flat, **tol)
    assert torch.equal(total, total.T)
    assert (added == []) == batched
    contiguous = CovarianceSum(d, total.dtype, torch.device("cpu"))
    contiguous.add_tokens(rows.contiguous())  # rows already flat in memory: never the batched product
    torch.testing.assert_close(contiguous.total().double(), flat.T @ flat, **tol)
