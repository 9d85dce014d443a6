"""Shared by the op tests: one thread, so interpreter-heavy tests stay predictable on 2-core CI."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
