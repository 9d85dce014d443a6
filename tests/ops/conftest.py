"""Shared by the op tests: one thread, so interpreter-heavy tests stay predictable on 2-core CI."""
import pytest
import torch


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
