"""Every SOURCE_FAST_* environment variable is read here and nowhere else (listed in ENV.md)."""
from __future__ import annotations

import os

BACKENDS = ("cuda", "triton", "cpu", "torch")


def backend_override() -> str | None:
    """SOURCE_FAST_BACKEND: force one backend for every op (same effect as backend=...)."""
    value = os.environ.get("SOURCE_FAST_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"SOURCE_FAST_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def chunk_bytes() -> int:
    """SOURCE_FAST_CHUNK_MIB: memory budget of one materialised chunk in the torch backend."""
    raw = os.environ.get("SOURCE_FAST_CHUNK_MIB", "256")
    try:
        mib = int(raw)
    except ValueError:
        raise ValueError(f"SOURCE_FAST_CHUNK_MIB must be a positive integer, got {raw!r}") from None
    if mib <= 0:
        raise ValueError(f"SOURCE_FAST_CHUNK_MIB must be a positive integer, got {raw!r}")
    return mib * 2**20


def _mib(name: str, default: str) -> int:
    raw = os.environ.get(name, default)
    try:
        mib = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a non-negative integer, got {raw!r}") from None
    if mib < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {raw!r}")
    return mib * 2**20


def row_cache_bytes() -> int:
    """SOURCE_FAST_ROW_CACHE_MIB: memory budget for token rows kept from a segment's covariance passes
    for its eigenvalue-correction passes (same batches, same sampled labels, so the same rows: the
    cached batches skip a forward and backward pass; 0 = off)."""
    return _mib("SOURCE_FAST_ROW_CACHE_MIB", "1024")


def stack_bytes() -> int:
    """SOURCE_FAST_STACK_MIB: memory budget for the token rows of one segment's checkpoints held together
    while scoring (stacked along the token axis, so each segment costs one contraction; 0 = off)."""
    return _mib("SOURCE_FAST_STACK_MIB", "64")


def deterministic_default() -> bool:
    """SOURCE_FAST_DETERMINISTIC=1 forces deterministic kernels; else torch's global setting."""
    raw = os.environ.get("SOURCE_FAST_DETERMINISTIC", "")
    if raw:
        return raw.strip() not in ("0", "false", "False")
    import torch

    return torch.are_deterministic_algorithms_enabled()


def measured_dispatch() -> bool:
    """SOURCE_FAST_MEASURED_DISPATCH=0 turns off the automatic dispatch's skipping of GPU backends that the
    committed benchmarks measured slower than the torch backend (source_fast/_measured_gpu.py)."""
    return _switch("SOURCE_FAST_MEASURED_DISPATCH")


def cut_padding() -> bool:
    """SOURCE_FAST_CUT_PADDING=0 keeps token positions that the attention mask removes from a whole batch in
    the rows (default: cut where exact, see modules._padding_windows; the scores are the same either way)."""
    return _switch("SOURCE_FAST_CUT_PADDING")


EIGH_LAPACKS = ("auto", "torch", "numpy")


def eigh_lapack() -> str:
    """SOURCE_FAST_EIGH_LAPACK picks the LAPACK of the float64 eigendecompositions on CPU: torch's, numpy's, or
    auto (numpy's OpenBLAS where torch's LAPACK is MKL on a non-Intel CPU; see _linalg.eigh)."""
    value = os.environ.get("SOURCE_FAST_EIGH_LAPACK", "auto").strip().lower() or "auto"
    if value not in EIGH_LAPACKS:
        raise ValueError(f"SOURCE_FAST_EIGH_LAPACK must be one of {EIGH_LAPACKS}, got {value!r}")
    return value


def _switch(name: str) -> bool:
    """An on-by-default switch: off for 0, false, False or off."""
    return os.environ.get(name, "1").strip() not in ("0", "false", "False", "off")
