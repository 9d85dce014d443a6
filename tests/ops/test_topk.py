"""ops.topk_update: streaming top-k over training examples, stable on ties (lower index first)."""
import pytest
import torch

from source_fast import ops


def _expected(scores: torch.Tensor, k: int, largest: bool = True):
    """Plain Python oracle: sort each row by (value, index) with ties broken by the lower index."""
    values, indices = [], []
    for row in scores.double().tolist():
        order = sorted(range(len(row)), key=lambda j: ((-row[j] if largest else row[j]), j))[:k]
        values.append([row[j] for j in order])
        indices.append(order)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(indices, dtype=torch.int64)


def _stream(scores: torch.Tensor, k: int, block_sizes, largest: bool = True):
    values = indices = None
    start = 0
    sizes = iter(block_sizes)
    while start < scores.shape[1]:
        size = next(sizes)
        values, indices = ops.topk_update(values, indices, scores[:, start:start + size], start, k, largest=largest)
        start += size
    return values, indices


@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
@pytest.mark.parametrize("blocks", [[100], [1] * 100, [7] * 15, [3, 50, 1, 46]], ids=["one", "ones", "sevens", "mixed"])
@pytest.mark.parametrize("k", [1, 5, 100, 150])
def test_topk_streaming_equals_global(k, blocks, largest):
    scores = torch.randn(4, 100)
    values, indices = _stream(scores, k, blocks, largest)
    want_v, want_i = _expected(scores, k, largest)
    assert indices.dtype == torch.int64 and values.shape == (4, min(k, 100))
    torch.testing.assert_close(values.double(), want_v, rtol=0, atol=0)
    torch.testing.assert_close(indices, want_i, rtol=0, atol=0)


@pytest.mark.parametrize("blocks", [[30], [1] * 30, [4] * 8, [13, 17]], ids=["one", "ones", "fours", "mixed"])
def test_topk_ties_keep_lower_index_whatever_the_blocks(blocks):
    scores = torch.randint(0, 3, (3, 30)).float()  # many exact ties
    values, indices = _stream(scores, 10, blocks)
    want_v, want_i = _expected(scores, 10)
    torch.testing.assert_close(values.double(), want_v, rtol=0, atol=0)
    torch.testing.assert_close(indices, want_i, rtol=0, atol=0)


def test_topk_offset_is_the_training_index():
    scores = torch.tensor([[0.0, 5.0, 1.0]])
    values, indices = ops.topk_update(None, None, scores, 1000, 2)
    assert indices.tolist() == [[1001, 1002]] and values.tolist() == [[5.0, 1.0]]


def test_topk_merges_into_running_dtype():
    values, indices = ops.topk_update(None, None, torch.tensor([[1.0, 3.0]], dtype=torch.float64), 0, 2)
    values, indices = ops.topk_update(values, indices, torch.tensor([[2.0]], dtype=torch.float32), 2, 2)
    assert values.dtype == torch.float64
    assert values.tolist() == [[3.0, 2.0]] and indices.tolist() == [[1, 2]]


@pytest.mark.parametrize("k", [0, -1, True, 2.0, None])
def test_topk_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        ops.topk_update(None, None, torch.randn(2, 3), 0, k)


def test_topk_rejects_bad_scores():
    with pytest.raises(ValueError, match="new_scores must have 2 dimensions"):
        ops.topk_update(None, None, torch.randn(3), 0, 1)
    with pytest.raises(TypeError, match="new_scores"):
        ops.topk_update(None, None, [[1.0, 2.0]], 0, 1)
