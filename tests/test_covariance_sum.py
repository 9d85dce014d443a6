"""analyzer.CovarianceSum and LambdaSum: the fit's Σ x xᵀ and Λ over a pass, with short blocks gathered before the
op, equal the op over all the rows, whatever the block sizes."""
import pytest
import torch

from source_fast import ops
from source_fast.analyzer import CovarianceSum, LambdaSum


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


@pytest.mark.parametrize("blocks", [[3, 5, 2], [600], [7, 600, 2], [256, 256, 9], [1] * 5],
                         ids=["short", "long", "short-long-short", "exact", "single-rows"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_lambda_sum_equals_the_op_over_every_block(monkeypatch, blocks, tokens):
    """One-token blocks shorter than MIN_ROWS examples are gathered (fewer op calls, each ≥ MIN_ROWS but the last);
    token rows go to the op as they come; the sum is the same."""
    gen = torch.Generator().manual_seed(sum(blocks) + tokens)
    o, i = 5, 7
    q_a = torch.linalg.qr(torch.randn(i, i, generator=gen, dtype=torch.float64))[0]
    q_s = torch.linalg.qr(torch.randn(o, o, generator=gen, dtype=torch.float64))[0]
    parts = [(torch.randn(r, tokens, i, generator=gen, dtype=torch.float64),
              torch.randn(r, tokens, o, generator=gen, dtype=torch.float64)) for r in blocks]
    want = torch.zeros(o, i, dtype=torch.float64)
    for a, g in parts:
        ops.lambda_accum(a, g, q_a, q_s, out=want)
    calls = []
    original = ops.lambda_accum
    monkeypatch.setattr(ops, "lambda_accum", lambda a, g, *r, **k: calls.append(a.shape[0]) or original(a, g, *r, **k))
    got = torch.zeros(o, i, dtype=torch.float64)
    acc = LambdaSum(q_a, q_s, got)
    for a, g in parts:
        acc.add(a, g)
    acc.flush()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert sum(calls) == sum(blocks)
    if tokens > 1:
        assert calls == blocks
    else:
        assert all(r >= LambdaSum.MIN_ROWS for r in calls[:-1]) and len(calls) <= len(blocks)
    acc.flush()  # nothing left: adds nothing
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [1, 2])
def test_groups_lambda_sum_equals_each_groups_own(monkeypatch, m):
    """The eigen-correction of a depthwise module's groups given as their G_n (rows.Formed) in batched products over
    the stacked bases (GroupsLambdaSum, chunked here) equals each group's own LambdaSum: Σ_n (Q_Sᵀ G_n Q_A)², in
    float64 to 1e-12."""
    from source_fast import analyzer
    from source_fast.rows import Formed

    gen = torch.Generator().manual_seed(0)
    names, i = [f"dw[{c}]" for c in range(5)], 10
    basis = {name: (torch.linalg.qr(torch.randn(i, i, generator=gen, dtype=torch.float64))[0],
                    torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]) for name in names}
    grads = torch.randn(9, 5, m, i, generator=gen, dtype=torch.float64)  # one module's [B, C, m, I]
    monkeypatch.setattr(analyzer, "_FORMED_CHUNK_BYTES", 2 * 5 * m * i * 8 * 4)  # chunks of 4 examples
    together = {name: torch.zeros(m, i, dtype=torch.float64) for name in names}
    family = analyzer.GroupsLambdaSum(names, basis, together)
    family.add([grads[:, c] for c in range(5)])
    family.add([grads[:3, c] for c in range(5)])
    for c, name in enumerate(names):
        own = torch.zeros(m, i, dtype=torch.float64)
        one = LambdaSum(*basis[name], own)
        one.add(Formed(grads[:, c]), None)
        one.add(Formed(grads[:3, c]), None)
        q_a, q_s = basis[name]
        want = sum((q_s.T @ grads[n, c] @ q_a).square() for n in range(9)) + \
            sum((q_s.T @ grads[n, c] @ q_a).square() for n in range(3))
        torch.testing.assert_close(own, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(together[name], want, rtol=1e-12, atol=1e-12)
