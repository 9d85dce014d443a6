"""Which backends can run in this test process, as pytest params, and a GPU compile check.

- "torch": always;
- "triton": triton imports and (CUDA is present, or TRITON_INTERPRET=1 — tests/conftest.py sets it
  without CUDA, and dispatch then accepts CPU tensors for backend="triton"); marked `interpreter`
  when interpreted;
- "cpu" / "cuda": the compiled extension, whenever `source_fast._dispatch.BACKENDS[name]
  .availability()` is None (picked up automatically once built; "cuda" also needs a CUDA device).

`require(...)` turns a backend that does not support an input (a dtype it does not declare) into a
skip with the backend's own reasons — except a backend disabled by the numerical self-test, which
is a failure.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from source_fast import _dispatch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can run ops on `device` ("cpu" or "cuda") in this process, priority order."""
    names = []
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        return names
    for name in _dispatch.BACKENDS:
        if name == "torch":
            names.append(name)
        elif name == "triton":
            if _triton_importable() and ((device == "cuda" and has_cuda) or (device == "cpu" and interpreting())):
                names.append(name)
        elif name in ("cpu", "cuda"):
            if name != device or _dispatch.BACKENDS[name].availability() is not None:
                continue
            names.append(name)
    return names


def backend_params(device: str = "cpu") -> list:
    """pytest.param per available backend, id = backend name; Triton under the interpreter is
    marked `interpreter`. For device="cuda" without a CUDA device every candidate is listed (the
    `gpu` tests then show up as skipped by conftest rather than as an empty parameter set)."""
    params = []
    names = available_backends(device)
    if device == "cuda" and not torch.cuda.is_available():
        names = ["cuda", "triton", "torch"]
    for name in names:
        marks = [pytest.mark.interpreter] if name == "triton" and device == "cpu" and interpreting() else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def require(backend: str, op: str, tensors: dict, deterministic: bool = False) -> None:
    """Skip if `backend` declares it does not support these inputs; fail if it was disabled by the
    dispatch self-test (a wrong-numbers backend must never turn into a skip)."""
    reasons = _dispatch.BACKENDS[backend].not_supported_reasons(op, tensors, deterministic, explicit=True)
    if any("disabled" in r for r in reasons):
        pytest.fail(f"backend {backend!r} was disabled for {op}: {'; '.join(reasons)}")
    if reasons:
        pytest.skip(f"{backend} does not support these inputs: {'; '.join(reasons)}")


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile check of Triton kernels for a GPU target, without a GPU
# ---------------------------------------------------------------------------------------------

def compile_for_gpu(cases: list[tuple], timeout: float = 240.0) -> list[dict | None]:
    """`source_fast.kernels._aot.compile_for_gpu` (Triton kernels built for an NVIDIA target and read with the
    wheel's cuobjdump, no GPU needed; see that module for the cases and the report), skipped where triton
    does not import, a compile error turned into a test failure."""
    if not _triton_importable():
        pytest.skip("triton is not importable")
    from source_fast.kernels import _aot

    try:
        return _aot.compile_for_gpu(cases, timeout)
    except RuntimeError as e:
        raise AssertionError(str(e)) from None


SM90_SHARED_BYTES = 232448


def assert_fast_sm90_builds(cases: list[tuple], timeout: float = 240.0) -> list[dict | None]:
    """compile_for_gpu, then for every sm_90 case: no spills (stack 0), shared memory within an H100's per-block
    limit, pipelined loads (asynchronous copies) and, for tensor-core dots (constexpr DOT != 0), wgmma. What makes
    a Triton kernel fast on Hopper that can be checked without one: a build without them is on a slower path
    whatever its timing. Returns the builds' compile_for_gpu reports."""
    usages = compile_for_gpu(cases, timeout)
    for (_, kernel, _, const, arch, *_), usage in zip(cases, usages):
        if usage is None or arch != 90:
            continue
        assert usage["stack"] == 0, f"{kernel} {const}: {usage} (spills)"
        # An H100's limit per block (227 KiB): the driver refuses a launch above it (OutOfResources).
        assert usage.get("shared", 0) <= SM90_SHARED_BYTES, f"{kernel} {const}: {usage} (shared memory)"
        assert usage["LDGSTS"] + usage["UTMALDG"] > 0, f"{kernel} {const}: {usage} (loads not pipelined)"
        if const.get("DOT", 0) != 0:
            assert usage["HGMMA"] > 0, f"{kernel} {const}: {usage} (no wgmma)"
    return usages


BMM_SIGNATURE = dict(
    a_ptr="*fp16", b_ptr="*fp32", c_ptr="*fp32", f_ptr="*fp32", M="i32", N="i32", K="i64",
    stride_ab="i64", stride_am="i32", stride_ak="i32", stride_bb="i32", stride_bk="i32", stride_bn="i32",
    stride_cb="i64", stride_cm="i32", stride_cn="i32", stride_fk="i32", stride_fn="i32",
    spec_c="fp32", spec_damping="fp32",
)


def bmm_cases(dot_types: dict, fkinds=(0,), square=(False,), accumulate=(False,), arch: int = 90) -> list:
    """Compile cases of kernels/_common.py's `_bmm_kernel` for several operand dtypes and flags."""
    cases = []
    for dot, ptr in dot_types.items():
        for fk in fkinds:
            for sq in square:
                for acc in accumulate:
                    sig = dict(BMM_SIGNATURE, a_ptr=ptr)
                    const = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, DOT=dot, FKIND=fk, SQUARE=sq, ACCUMULATE=acc)
                    cases.append(("source_fast.kernels._common", "_bmm_kernel", sig, const, arch))
    return cases


def eigh_basis(n, device="cpu"):
    """Eigenvectors of a random SPD matrix, as torch.linalg.eigh returns them: column-major."""
    m = torch.randn(n, n, device=device)
    q = torch.linalg.eigh(m @ m.T + n * torch.eye(n, device=device))[1]
    assert n == 1 or not q.is_contiguous(), "eigh is expected to return column-major eigenvectors"
    return q


TOKEN_SHAPES = [  # (N, T, I, O): sizes 1, odd primes, T = 1 (rank-one path) and T > 1 (fused path),
    # I above the interpreter's 64-wide tile, T above its 64-token block, I ≠ O both ways
    pytest.param(1, 1, 1, 1, id="n1-t1-i1-o1"),
    pytest.param(7, 1, 41, 13, id="n7-t1-i41-o13"),
    pytest.param(7, 3, 41, 13, id="n7-t3-i41-o13"),
    pytest.param(1, 3, 13, 41, id="n1-t3-i13-o41"),
    pytest.param(3, 5, 80, 20, id="n3-t5-i80-o20"),
    pytest.param(2, 70, 17, 9, id="n2-t70-i17-o9"),
]


def at_thread_counts(fn, counts=(1, 2)) -> list:
    """fn() run once per torch thread count (compiled CPU kernels must be bitwise independent of it);
    the caller's thread count is restored."""
    threads = torch.get_num_threads()
    try:
        results = []
        for k in counts:
            torch.set_num_threads(k)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def recording_lib_calls():
    """Within the block, every call into the compiled module source_fast._C made through
    `_extension._lib()` is recorded as (name, args) in the yielded list, except those of a first use's
    self-test (`_selftest.run`), which runs in the block when the test is the first to use that backend."""
    from source_fast import _extension, _selftest

    lib, calls, in_selftest = _extension._lib, [], []  # resolved on use: the block may run without the module built
    real_selftest = _selftest.run

    def unrecorded_selftest(*args, **kwargs):
        in_selftest.append(True)
        try:
            return real_selftest(*args, **kwargs)
        finally:
            in_selftest.pop()

    class Recorder:
        def __getattr__(self, name):
            attr = getattr(lib(), name)
            if not callable(attr):
                return attr

            def call(*args):
                if not in_selftest:
                    calls.append((name, args))
                return attr(*args)
            return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_extension, "_lib", lambda: Recorder())
        mp.setattr(_selftest, "run", unrecorded_selftest)
        yield calls
