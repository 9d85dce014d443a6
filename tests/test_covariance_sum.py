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
