"""Batches of a dataset for the analyzer's passes, in order.

A `TensorDataset` (or a `Subset` of one, as the analyzer makes for a resumed pass or a training stage) is
batched by indexing its tensors: the same batches `DataLoader`'s default collation builds (a list with one
tensor per dataset tensor, fresh memory), without a Python call per example. On the regression MLP of
benchmarks/bench_vs_kronfluence.py that per-example indexing and stacking took ≈ 25 ms of a 0.28 s pairwise
stage. Any other dataset, or a custom collate_fn, goes through `DataLoader`.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset


def batches(dataset: Dataset, batch_size: int, collate_fn=None):
    """An iterable (with len) over the dataset's batches of `batch_size`, in order, the last one shorter."""
    if collate_fn is None:
        source = _tensor_source(dataset)
        if source is not None:
            return _TensorBatches(*source, batch_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


def _tensor_source(dataset):
    """(tensors, indices or None) when the dataset is a TensorDataset under any number of Subsets."""
    indices = None
    while isinstance(dataset, Subset):
        ix = dataset.indices
        inner = torch.arange(ix.start, ix.stop, ix.step) if isinstance(ix, range) else torch.as_tensor(ix).long()
        indices = inner if indices is None else inner[indices]
        dataset = dataset.dataset
    if type(dataset) is not TensorDataset:  # a subclass may override __getitem__
        return None
    return dataset.tensors, indices


class _TensorBatches:
    def __init__(self, tensors, indices, batch_size: int):
        self.tensors, self.indices, self.batch_size = tensors, indices, batch_size
        self.n = len(tensors[0]) if indices is None else len(indices)

    def __len__(self):
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for start in range(0, self.n, self.batch_size):
            stop = min(self.n, start + self.batch_size)
            if self.indices is None:  # copies, as collation's stack makes: a task may change its batch in place
                yield [t[start:stop].clone() for t in self.tensors]
            else:
                idx = self.indices[start:stop]
                yield [t[idx] for t in self.tensors]
