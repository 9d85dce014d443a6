"""source_fast.batches: a TensorDataset (under any Subsets) is batched by indexing its tensors, with the
batches DataLoader's default collation gives; anything else goes through DataLoader."""
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from source_fast.batches import _TensorBatches, batches


def _reference(dataset, batch_size):
    return list(DataLoader(dataset, batch_size=batch_size, shuffle=False))


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert type(g) is type(w) and len(g) == len(w)
        for x, y in zip(g, w):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y)


def _data(n=23):
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 2, generator=gen), torch.randint(0, 5, (n,), generator=gen),
                         torch.arange(n, dtype=torch.float64))


@pytest.mark.parametrize("batch_size", [1, 4, 7, 23, 64])
@pytest.mark.parametrize("wrap", ["plain", "range", "list", "nested", "empty"])
def test_tensor_dataset_batches_equal_dataloaders(batch_size, wrap):
    ds = _data()
    if wrap == "range":
        ds = Subset(ds, range(5, 23))
    elif wrap == "list":
        ds = Subset(ds, [3, 0, 22, 7, 7, -1, 11])
    elif wrap == "nested":
        ds = Subset(Subset(ds, list(range(22, 2, -2))), range(2, 9))
    elif wrap == "empty":
        ds = Subset(ds, [])
    loader = batches(ds, batch_size)
    assert isinstance(loader, _TensorBatches)
    got = list(loader)
    assert len(loader) == len(got)
    _assert_same(got, _reference(ds, batch_size))


def test_batches_are_copies():
    ds = _data()
    before = ds.tensors[0].clone()
    for wrapped in (ds, Subset(ds, [1, 2, 3])):
        for batch in batches(wrapped, 4):
            batch[0].mul_(0)  # a task that edits its batch in place must not change the dataset
    assert torch.equal(ds.tensors[0], before)


def test_other_datasets_and_custom_collate_use_dataloader():
    class Mine(TensorDataset):
        def __getitem__(self, i):
            return tuple(2 * t[i] for t in self.tensors)

    mine = Mine(torch.ones(5, 2))
    assert isinstance(batches(mine, 2), DataLoader)
    assert torch.equal(next(iter(batches(mine, 2)))[0], torch.full((2, 2), 2.0))
    assert isinstance(batches(_data(), 4, collate_fn=lambda items: items), DataLoader)
    assert isinstance(batches([{"x": torch.zeros(2)}] * 3, 2), DataLoader)
