"""Shared by the op tests: one thread, so interpreter-heavy tests stay predictable on 2-core CI."""
import pytest
import torch

from _backends import require


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def blocks_override():
    """`_blocks.override_blocks` for one test: force GPU table entries (tiles, forms, arithmetic), cleared after."""
    from source_fast.kernels import _blocks

    yield _blocks.override_blocks
    _blocks.override_blocks(None)


@pytest.fixture
def _needs_extension():
    """Skip unless the compiled C++ CPU backend (source_fast._C) is built and usable: the tests of the CPU-only
    pipeline products (gemm, rank_one_product, to_queries_innermost, the conv kernels) call it directly."""
    require("cpu", "covariance", {"x": torch.zeros(1, 64)})
