"""When the pipeline calls a compiled CPU product directly (not a dispatched op): the GEMM (`_linalg`), the
rank-one directions' output side (`directions`) and the walk's queries-innermost writes (`walk`).

Each needs fp32 CPU tensors without autograd, no other backend forced (SOURCE_FAST_BACKEND), and its check (a
tiny case against torch or a float64 product) passed on first use in this process; a failure disables that
product with a warning and torch runs instead, never wrong numbers.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from . import _config

_passed: dict[str, bool] = {}


def usable(name: str, check: Callable[[], bool], *tensors: torch.Tensor) -> bool:
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if _config.backend_override() not in (None, "cpu"):
        return False
    if name not in _passed:
        _passed[name] = _run_check(name, check)
    return _passed[name]


def _run_check(name: str, check: Callable[[], bool]) -> bool:
    try:
        ok = check()
    except ImportError:  # not built: torch runs, nothing to warn about
        return False
    except Exception as exc:  # a broken build: fall back, say why
        warnings.warn(f"source_fast: compiled {name} disabled ({exc.__class__.__name__}: {exc}); using torch",
                      RuntimeWarning, stacklevel=4)
        return False
    if not ok:
        warnings.warn(f"source_fast: compiled {name} disagrees with torch on a tiny case; using torch",
                      RuntimeWarning, stacklevel=4)
    return bool(ok)
