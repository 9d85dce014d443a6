"""The code blocks of docs/AS_A_BACKEND.md run as written, in order, in one namespace (each block checks
itself against the einsums it replaces): with the automatic choice (the C++ kernels where built, for the
ops they implement) and with the torch backend forced."""
import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "AS_A_BACKEND.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_its_examples():
    assert len(_blocks()) >= 4


@pytest.mark.parametrize("backend", [None, "torch"])
def test_backend_guide_examples_run_and_agree(backend, monkeypatch):
    if backend is not None:
        monkeypatch.setenv("SOURCE_FAST_BACKEND", backend)
    torch.manual_seed(0)
    namespace: dict = {}
    for block in _blocks():
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the doc's own examples
    assert namespace["scores"].shape == (4, 64) and namespace["per_token"].shape == (4, 64, 5)
