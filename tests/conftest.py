"""Test configuration shared by every test file.

- Without a CUDA device, Triton runs under its CPU interpreter: TRITON_INTERPRET=1 must be set
  before any @triton.jit decorates a kernel, hence here, at collection time.
- Interpreter-heavy tests are slow per program; one OpenMP thread keeps 2-core CI predictable.
- `gpu` tests are skipped without CUDA; every RNG is seeded per test.
"""
import os
import random
import sys

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # torch missing: let the import errors surface in the tests themselves
    torch = None
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests run against the installed package. The repository root must not be on sys.path: its
# Triton folder `kernels/` would shadow the PyPI package `kernels` that transformers probes for
# (`python -m pytest` puts the working directory first).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass
    if torch is not None:
        torch.manual_seed(0)
    yield
