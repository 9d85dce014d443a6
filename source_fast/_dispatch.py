"""Backend selection: the `backend=` keyword, else SOURCE_FAST_BACKEND, else cuda → triton → cpu → torch.

Each backend is a small class declaring what it supports and *why not* otherwise
(`not_supported_reasons`). An automatic choice falls through to the next backend and logs the reasons
once at DEBUG; an explicit choice that cannot run raises NotImplementedError listing every backend's
reasons. `torch` always runs, so every op works on CPU.

On CUDA tensors the automatic choice also skips a compiled backend that the committed GPU benchmarks measured
slower than the torch backend for that op, dtype and regime (`measured_slowdown`, table in _measured_gpu.py,
generated from benchmarks/results/ops_<gpu>.csv); an explicit backend= still runs it, and
SOURCE_FAST_MEASURED_DISPATCH=0 restores the plain priority order.

Compiled backends get a numerical self-test on first use per (op, device): a tiny case against the
float64 reference. A failure disables that backend for that op with a warning instead of returning
wrong numbers.
"""
from __future__ import annotations

import importlib
import logging
import warnings
from typing import Callable

import torch

from . import _config

log = logging.getLogger("source_fast")

OPS = ("covariance", "lambda_accum", "kron_project", "score_pairwise", "score_self", "score_lowrank",
       "score_per_token")


class Backend:
    name = "base"
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    ops: tuple[str, ...] = OPS

    def availability(self) -> str | None:
        """None when usable in this process, else the reason it is not."""
        return None

    def extra_reasons(self, op: str, tensors: dict[str, torch.Tensor], deterministic: bool) -> list[str]:
        return []

    def not_supported_reasons(self, op: str, tensors: dict[str, torch.Tensor], deterministic: bool = False,
                              explicit: bool = False) -> list[str]:
        reasons = []
        why = self.availability()
        if why:
            return [why]
        if op not in self.ops:
            reasons.append(f"op {op!r} not implemented by {self.name}")
        reasons += self.device_reasons(tensors)
        for name, t in tensors.items():
            if t is None:
                continue
            if t.is_floating_point() and t.dtype not in self.dtypes and name != "mask":  # masks are converted
                reasons.append(f"{name} dtype {t.dtype} not in {[str(d) for d in self.dtypes]}")
        reasons += self.extra_reasons(op, tensors, deterministic)
        if not explicit and not reasons:
            reasons += self.slower_than_torch(op, tensors)
        if not explicit and not reasons and any(isinstance(t, torch.Tensor) and t.device.type == "cuda"
                                                for t in tensors.values()) and _config.measured_dispatch():
            slower = measured_slowdown(op, self.name, tensors)
            if slower:
                reasons.append(slower)
        if (self.name, op) in _disabled:
            reasons.append(f"disabled after a failed numerical self-test: {_disabled[(self.name, op)]}")
        return reasons

    def slower_than_torch(self, op: str, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Why the automatic choice passes over this backend for these shapes although it can run them (it
        measured slower than the torch backend there); an explicit backend= still runs it."""
        return []

    def device_reasons(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        return [f"{name} on device {t.device.type!r}; {self.name} runs on {self.devices}"
                for name, t in tensors.items() if t is not None and t.device.type not in self.devices]

    def function(self, op: str) -> Callable:
        raise NotImplementedError

    def form(self, op: str, tensors: dict[str, torch.Tensor]) -> str | None:
        """Which of its forms this backend runs op in on these inputs (`explain`), or None where it has only one."""
        return None


def _pairwise_sizes(tensors: dict[str, torch.Tensor]) -> tuple[int, int, int, int, int]:
    """(Q, N, T, O, I) of score_pairwise's v [Q, O, I], a [N, T, I]."""
    (q, o, i), (n, t, _) = tensors["v"].shape, tensors["a"].shape
    return q, n, t, o, i


def _rotation_form(tensors: dict[str, torch.Tensor]) -> str | None:
    """How the torch and cpu backends form Q_Sᵀ G_n Q_A for lambda_accum / score_self (_torch_ops.rotation_order)."""
    from . import _torch_ops

    a, g = tensors.get("a"), tensors.get("g")
    if a is None or g is None or a.dim() != 3 or g.dim() != 3:
        return None
    t, i, o = a.shape[1], a.shape[2], g.shape[2]
    if t == 1:
        return "one token: the rotated rows' squares in one product"
    if _torch_ops.rotation_order(t, o, i) == "materialize":
        return f"G_n formed first, then rotated ({t} tokens on a {o}x{i} layer: fewer multiply-adds)"
    return f"token rows rotated first, then their outer products summed ({t} tokens on a {o}x{i} layer)"


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda", "mps", "xpu")

    def function(self, op):
        from . import _torch_ops

        return getattr(_torch_ops, op)

    def form(self, op, tensors):
        if op in ("lambda_accum", "score_self"):
            return _rotation_form(tensors)
        if op != "score_pairwise":
            return None
        from . import _torch_ops

        q, n, t, o, i = _pairwise_sizes(tensors)
        strategy = _torch_ops.pairwise_strategy(q, n, t, o, i)  # as _torch_ops.score_pairwise picks it
        return {"tokenwise": "token-wise (per-token GEMMs, no G_n)",
                "materialize": "materialised (G_n formed in chunks, one GEMM)"}[strategy]


class TritonBackend(Backend):
    """Kernels in kernels/<op>.py, launcher `<op>_triton`. CUDA tensors only (the CPU interpreter is
    for tests, selected explicitly with backend="triton" under TRITON_INTERPRET=1)."""

    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def availability(self):
        try:
            importlib.import_module("triton")
        except Exception as exc:  # ImportError or a broken install
            return f"triton is not importable ({exc.__class__.__name__}: {exc})"
        return None

    @property
    def devices(self):
        # The CPU interpreter runs on CPU tensors; it is allowed only when asked for by name.
        return ("cpu",) if interpreting() else ("cuda",)

    def not_supported_reasons(self, op, tensors, deterministic=False, explicit=False):
        if interpreting() and not explicit:
            return ["the Triton CPU interpreter (TRITON_INTERPRET=1) is for tests: request backend='triton'"]
        # Tensors on a device Triton does not run on decide it without importing triton (~0.1-0.3 s).
        off_device = self.device_reasons(tensors)
        if off_device:
            return off_device
        return super().not_supported_reasons(op, tensors, deterministic, explicit)

    def function(self, op):
        module = importlib.import_module(f"source_fast.kernels.{op}")
        return getattr(module, f"{op}_triton")

    def form(self, op, tensors):
        if op != "score_pairwise":
            return None
        kernel = importlib.import_module("source_fast.kernels.score_pairwise")
        q, n, t, _, _ = _pairwise_sizes(tensors)
        name, _ = kernel.pairwise_form(q, n, t, tuple(tensors[k].dtype for k in ("v", "a", "g")))
        return f"{name}: {kernel.FORMS[name]}"


class ExtensionBackend(Backend):
    """The compiled pybind11 module source_fast._C (CUDA and/or C++/OpenMP entry points)."""

    suffix = ""

    def availability(self):
        try:
            ext = importlib.import_module("source_fast._C")
        except ImportError as exc:
            return (f"compiled extension source_fast._C not built ({exc}); rebuild with "
                    "`pip install --no-build-isolation -e .` (see README, Building)")
        if self.name == "cuda" and not getattr(ext, "HAS_CUDA", False):
            return "source_fast._C was built without CUDA (nvcc not found at build time)"
        return None

    def function(self, op):
        from . import _extension

        return getattr(_extension, f"{op}_{self.name}")


class CudaBackend(ExtensionBackend):
    name = "cuda"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)


# The C++ covariance against the torch backend on CPU (bench_covariance.py, Zen 4 host, 2 threads): 0.39x at
# D = 16 and 0.89x at D = 28 over 131,072 rows, 1.40x at D = 145, 1.6-2.2x from D = 513; with a mask the torch
# backend's weighting pass makes it the slower one from D = 28 on. So unmasked factors this narrow go to torch.
COVARIANCE_TORCH_MAX_D = 32


def _narrow_covariance(op: str, tensors: dict[str, torch.Tensor]) -> bool:
    x = tensors.get("x")
    return (op == "covariance" and isinstance(x, torch.Tensor) and x.dim() == 2
            and x.shape[1] <= COVARIANCE_TORCH_MAX_D and tensors.get("mask") is None)


class CpuBackend(ExtensionBackend):
    name = "cpu"
    devices = ("cpu",)
    # fp16/bf16 are upcast to float32 by _extension (exactly), as the torch backend does on CPU: no CPU kernel
    # contracts 16-bit operands faster, and the fp32 kernels beat torch's fp32 path.
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    # Only the ops where C++/OpenMP beats the torch backend on CPU (README, benchmarks/results/ops_cpu*.md);
    # kron_project is GEMMs either way (the same speed on the compiled GEMM), so torch runs it.
    ops = ("covariance", "lambda_accum", "score_pairwise", "score_self", "score_per_token", "score_lowrank")

    def slower_than_torch(self, op, tensors):
        if _narrow_covariance(op, tensors):
            return [f"x has {tensors['x'].shape[1]} columns (<= {COVARIANCE_TORCH_MAX_D}) and no mask: the C++ "
                    "covariance measured slower than the torch backend's GEMM on such narrow factors (D = 16: 0.39x, "
                    "D = 28: 0.89x, D = 145: 1.40x; benchmarks/results/ops_cpu_zen4.md); pass backend='cpu' to use "
                    "it anyway"]
        return []

    def form(self, op, tensors):
        if op in ("lambda_accum", "score_self"):
            return _rotation_form(tensors)
        if op not in ("score_pairwise", "score_per_token"):
            return None
        from . import _extension

        v, a, g = tensors["v"], tensors["a"], tensors["g"]
        if op == "score_per_token":  # the one-token kernels on the token rows (_extension.score_per_token_cpu)
            a, g = _extension.token_rows(a), _extension.token_rows(g)
        return _extension.CPU_PAIRWISE_KERNELS[_extension.cpu_pairwise_kernel(v, a, g)]


BACKENDS: dict[str, Backend] = {b.name: b for b in (CudaBackend(), TritonBackend(), CpuBackend(), TorchBackend())}
_disabled: dict[tuple[str, str], str] = {}
_auto_choice: dict[tuple, tuple[str, Callable]] = {}  # see select(); keyed on the backends and disabled set too
_self_tested: set[tuple[str, str, str]] = set()
_logged: set[tuple[str, str, str]] = set()


def interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "") == "1"


# The tensor whose dtype is "the op's dtype", and the one whose axis 1 is the token axis.
_PRINCIPAL = {"covariance": "x", "lambda_accum": "a", "kron_project": "v", "score_pairwise": "a", "score_self": "a",
              "score_lowrank": "a", "score_per_token": "a"}


def regime(op: str, tensors: dict[str, torch.Tensor]) -> str:
    """The benchmark regime an input falls in (benchmarks/make_dispatch_table.py uses the same names)."""
    if op == "covariance":
        return "mask" if tensors.get("mask") is not None else "nomask"
    if op == "kron_project":
        return ""
    a, g = tensors.get("a"), tensors.get("g")
    if a is None or a.ndim != 3:
        return ""
    if a.shape[1] == 1:
        return "T=1"
    if op in ("lambda_accum", "score_self") and g is not None and g.ndim == 3:
        from . import _torch_ops

        # The torch backend forms G_n first here, the compiled kernels rotate the rows: measured apart.
        if _torch_ops.rotation_order(a.shape[1], g.shape[2], a.shape[2]) == "materialize":
            return "G first"
    return "T>1"


def measured_slowdown(op: str, backend: str, tensors: dict[str, torch.Tensor]) -> str | None:
    """Why the automatic choice skips `backend` for these inputs on a GPU, or None: the committed
    benchmarks measured it slower than the torch backend for (op, dtype, regime). fp16 reads the bf16 entry
    (the same tensor-core paths); an unmeasured key is never skipped."""
    from . import _measured_gpu

    t = tensors.get(_PRINCIPAL[op])
    if t is None:
        return None
    dtype = {torch.float16: "bfloat16"}.get(t.dtype, str(t.dtype).replace("torch.", ""))
    key = (op, backend, dtype, regime(op, tensors))
    speed = _measured_gpu.SPEEDUP_VS_TORCH.get(key)
    if speed is None or speed >= 1.0:
        return None
    where = f"{dtype}, {key[3]}" if key[3] else dtype
    return (f"measured at {speed:.2f}x the torch backend's speed for {op} ({where}) on {_measured_gpu.SOURCE} "
            f"(benchmarks/results); pass backend={backend!r} to use it anyway")


def _shape_class(op: str, tensors: dict[str, torch.Tensor]):
    """What of the shapes a backend's slower_than_torch rule reads (part of the automatic choice's cache key)."""
    return _narrow_covariance(op, tensors)


def _inputs_summary(tensors):
    return ", ".join(
        f"{k}=({tuple(t.shape)}, {t.dtype}, {t.device})" for k, t in tensors.items() if isinstance(t, torch.Tensor)
    )


def select(op: str, tensors: dict[str, torch.Tensor], backend: str | None = None,
           deterministic: bool = False) -> tuple[str, Callable]:
    """Return (backend name, function) for op on these tensors."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    requested = backend if backend is not None else _config.backend_override()
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {tuple(BACKENDS)} or None, got {requested!r}")
        reasons = BACKENDS[requested].not_supported_reasons(op, tensors, deterministic, explicit=True)
        if reasons:
            table = explain(op, tensors, deterministic=deterministic)
            raise NotImplementedError(
                f"backend {requested!r} cannot run {op} on inputs {_inputs_summary(tensors)}: "
                f"{'; '.join(reasons)}\nAll backends:\n{table}"
            )
        fn = _checked(requested, op, tensors)
        if (requested, op) in _disabled:
            raise NotImplementedError(f"backend {requested!r} cannot run {op}: {_disabled[(requested, op)]}")
        return requested, fn
    # The automatic choice depends only on these (the pipeline makes thousands of identical calls).
    key = (op, deterministic, interpreting(), id(_disabled), len(_disabled),
           tuple((n, id(b)) for n, b in BACKENDS.items()),
           tuple((k, t.device, t.dtype) for k, t in tensors.items() if isinstance(t, torch.Tensor)),
           regime(op, tensors), _config.measured_dispatch(), _shape_class(op, tensors))
    hit = _auto_choice.get(key)
    if hit is not None:
        return hit
    for name, b in BACKENDS.items():
        reasons = b.not_supported_reasons(op, tensors, deterministic)
        if not reasons:
            fn = _checked(name, op, tensors)
            if (name, op) not in _disabled:
                _auto_choice[key] = (name, fn)
                return name, fn
            reasons = [_disabled[(name, op)]]
        logged = (name, op, "; ".join(reasons))
        if logged not in _logged:
            _logged.add(logged)
            log.debug("source_fast: %s skipped for %s: %s", name, op, "; ".join(reasons))
    raise RuntimeError(f"no backend can run {op}")  # unreachable: torch always runs


def _checked(name: str, op: str, tensors) -> Callable:
    try:
        fn = BACKENDS[name].function(op)
    except Exception as exc:  # a partial or broken build: disable, explain, fall through
        _disabled[(name, op)] = f"loading its entry point raised {exc.__class__.__name__}: {exc}"
        warnings.warn(f"source_fast: backend {name!r} disabled for {op}: {_disabled[(name, op)]}", RuntimeWarning,
                      stacklevel=3)
        return BACKENDS["torch"].function(op)
    if name == "torch":
        return fn
    device = next((t.device for t in tensors.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    key = (name, op, str(device))
    if key not in _self_tested:
        _self_tested.add(key)
        from . import _selftest

        error = _selftest.run(op, fn, device)
        if error:
            _disabled[(name, op)] = error
            warnings.warn(f"source_fast: backend {name!r} disabled for {op} on {device}: {error}", RuntimeWarning,
                          stacklevel=3)
    return fn


def explain(op: str, tensors: dict[str, torch.Tensor] | None = None, deterministic: bool = False) -> str:
    """A table: each backend, whether it would run op on these inputs, and why not; then, for the ops with several
    forms (score_pairwise; score_per_token on CPU; lambda_accum and score_self on the torch and cpu backends),
    the form the selected backend takes (token-wise, formed, materialised, fused, sparse g; rows or G_n first)."""
    tensors = tensors or {}
    lines = [f"{'backend':8s} | status"]
    chosen = None
    for name, b in BACKENDS.items():
        reasons = b.not_supported_reasons(op, tensors, deterministic)
        if not reasons and chosen is None:
            chosen = name
            status = "selected"
        elif not reasons:
            status = "available (lower priority)"
        else:
            status = "skipped: " + "; ".join(reasons)
        lines.append(f"{name:8s} | {status}")
    operands = ("a", "g") if op in ("lambda_accum", "score_self") else ("v", "a", "g")
    if chosen is not None and all(isinstance(tensors.get(k), torch.Tensor) and tensors[k].dim() == 3
                                  for k in operands):
        form = BACKENDS[chosen].form(op, tensors)
        if form:
            lines.append(f"{'form':8s} | {chosen}: {form}")
    return "\n".join(lines)
