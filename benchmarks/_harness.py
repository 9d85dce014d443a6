"""Shared harness of the op benchmarks benchmarks/bench_<op>.py (STYLE.md §5).

One `OpBench` subclass per op declares its cases (shapes), how to build inputs, the float64 reference, how
to call a source_fast backend, its Kronfluence-style baselines and a flop/byte model. `main` then:

1. **Correctness gate** (before any timing): on a small case per dtype, every implementation (each
   available backend and each baseline) is compared with the float64 reference of source_fast.reference;
   it prints ``GATE <op> <impl> <dtype>: PASS|FAILED (...)``. An implementation that fails is reported as
   FAILED and never timed.
2. **Timing**: CUDA: ``triton.testing.do_bench`` quantiles [0.5, 0.2, 0.8] (ms). CPU: a host timer
   (time.perf_counter, warmup, then repeats for ~``--rep-s`` seconds, at least 3; same quantiles).
3. **Peak memory** of one call beyond its inputs: CUDA: ``torch.cuda.max_memory_allocated`` minus the
   allocation before the call. CPU: peak RSS growth — the peak-RSS counter is reset through
   /proc/self/clear_refs and VmHWM − VmRSS(before) is read; each (case, implementation) runs in a fresh
   subprocess (``--isolate``, the default on CPU) so memory cached by the allocator from earlier
   measurements cannot hide growth. Without clear_refs, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
   growth is used (an upper bound).
4. Rows are printed as a table and upserted into benchmarks/results/ops_<device-slug>.csv (same op,
   backend, mode, dtype, shape, device and threads replace older rows); benchmarks/results/ops_<slug>.md is
   regenerated from that CSV.

``--smoke``: a tiny shape, one iteration, in-process, nothing written unless ``--out`` is given, exit status
non-zero if any gate FAILED or a measurement raised. Its timings are not measurements (CI keeps the scripts
alive with it). CPU timings in general are never performance claims for the GPU kernels.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import gc
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

QUANTILES = (0.5, 0.2, 0.8)
RESULT_PREFIX = "BENCH_RESULT "
MIB = 2**20
BACKEND_ORDER = ("torch", "cpu", "triton", "cuda")

COLUMNS = ["op", "backend", "mode", "dtype", "shape_params", "ms_p50", "ms_p20", "ms_p80", "peak_mib",
           "device_name", "threads", "torch", "triton", "cuda", "git_commit", "timestamp",
           # extensions of the STYLE.md schema
           "status", "tflops", "gbps", "note"]
KEY_COLUMNS = ("op", "backend", "mode", "dtype", "shape_params", "device_name", "threads")

# Gate: max|got − ref| / max|ref| on the small gate case. Tests (tests/_tolerances.py) are the precise
# check; this only keeps a wrong implementation out of the timing tables (fp32 sees ≤ 1e-6 in practice).
GATE_TOL = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """One benchmarked configuration. shape: ordered (name, int) pairs, e.g. (("R", 4096), ("D", 513))."""

    mode: str
    shape: tuple[tuple[str, int], ...]
    dtype: str = "float32"

    @property
    def p(self) -> dict[str, int]:
        return dict(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape_params(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.shape)

    def to_json(self) -> dict:
        return {"mode": self.mode, "shape": [list(kv) for kv in self.shape], "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> Case:
        return cls(d["mode"], tuple((k, int(v)) for k, v in d["shape"]), d["dtype"])


def case(mode: str, dtype: str = "float32", **shape: int) -> Case:
    return Case(mode, tuple(shape.items()), dtype)


class OpBench:
    """Subclass per op. Implementations are source_fast backends (called through source_fast.ops with
    ``backend=``) and Kronfluence-style baselines (``baselines()``: name -> fn(inputs))."""

    op: str = ""

    def cases(self, device: torch.device, smoke: bool) -> list[Case]:
        raise NotImplementedError

    def gate_case(self, dtype: str) -> Case:
        raise NotImplementedError

    def make_inputs(self, c: Case, device: torch.device) -> dict[str, Any]:
        raise NotImplementedError

    def reference(self, inputs: dict[str, Any]):
        raise NotImplementedError

    def run_backend(self, backend: str, inputs: dict[str, Any]):
        raise NotImplementedError

    def dispatch_tensors(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The tensors source_fast.ops hands to backend selection (for availability checks)."""
        return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    def baselines(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {}

    def flops(self, c: Case) -> float:
        return float("nan")

    def bytes(self, c: Case) -> float:
        return float("nan")

    def note(self, impl: str, c: Case, device: torch.device) -> str:
        """Free text stored in the CSV's note column for this row (e.g. a baseline's batch size)."""
        return ""


class CpuPrimitiveBench(OpBench):
    """An internal CPU product of the pipeline (not a dispatched op): ``torch`` and the compiled ``cpu`` only.
    ``device_input`` names the input whose device decides."""

    device_input: str = ""

    def unavailable(self, impl: str, inputs: dict[str, Any]) -> str | None:
        if impl == "torch":
            return None
        if impl != "cpu" or inputs[self.device_input].device.type != "cpu":
            return f"{self.op} is a CPU primitive: no {impl} implementation"
        try:
            import source_fast._C  # noqa: F401
        except ImportError as exc:
            return f"source_fast._C not built ({exc})"
        return None

    def dispatch_tensors(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return dict(inputs)

    def baselines(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        return {}


# -------------------------------------------------------------------------------------- helpers
def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, *shape: int, device, dtype=torch.float32) -> torch.Tensor:
    """Random normal generated on the host in fp32 (reproducible across devices), then moved/cast."""
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def orthogonal(gen: torch.Generator, n: int, device, dtype=torch.float32) -> torch.Tensor:
    """A random orthogonal [n, n] matrix (Q of a QR), like an eigenvector basis."""
    m = torch.randn(n, n, generator=gen, dtype=torch.float32)
    if torch.device(device).type == "cuda":
        m = m.to(device)
    q = torch.linalg.qr(m)[0]
    return q.to(device=device, dtype=dtype)


def token_inputs(gen: torch.Generator, p: dict, device, dtype) -> dict[str, torch.Tensor]:
    """Token rows a [N, T, I], g [N, T, O] and orthogonal bases q_a [I, I], q_s [O, O] (drawn in this order)."""
    return {"a": randn(gen, p["N"], p["T"], p["I"], device=device, dtype=dtype),
            "g": randn(gen, p["N"], p["T"], p["O"], device=device, dtype=dtype),
            "q_a": orthogonal(gen, p["I"], device, dtype), "q_s": orthogonal(gen, p["O"], device, dtype)}


def gpu_token_cases() -> list[Case]:
    """The large per-example shapes (N·O·I up to ~8.6e9) shared by lambda_accum and score_self on CUDA."""
    return [case(f"T={t}", dtype, N=n, T=t, I=i, O=o) for dtype in ("float32", "bfloat16") for t in (1, 16)
            for n, i, o in ((1024, 513, 257), (8192, 1025, 1024), (2048, 4097, 1024))]


def gpu_conv_cases() -> list[Case]:
    """Conv layers' positions as tokens (many tokens, narrow layers: the torch backend forms G_n first, the
    compiled kernels rotate the rows; the dispatcher's "G first" regime) for lambda_accum and score_self on CUDA:
    3×3 convs at 32×32 (3→16 and 16→32 channels) and 16×16 (64→64) positions."""
    return [case("conv positions", dtype, N=n, T=t, I=i, O=o) for dtype in ("float32", "bfloat16")
            for n, t, i, o in ((4096, 1024, 28, 16), (2048, 1024, 145, 32), (2048, 256, 577, 64))]


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def per_example_batch(n: int, o: int, i: int, device: torch.device, dtype=torch.float32) -> int:
    """Examples per batch for the Kronfluence-style baselines that materialise per-example gradients
    [b, O, I]: Kronfluence does so one training batch at a time; the batch is capped so that one such
    tensor stays within 1 GiB on CPU and 4 GiB on CUDA (all of N when it fits)."""
    cap = (4 if device.type == "cuda" else 1) * 2**30
    return max(1, min(n, cap // max(1, o * i * itemsize(dtype))))


def _as_tuple(x) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def rel_error(got, want) -> float:
    """max|got − want| / max|want| over all outputs (tuples compared elementwise)."""
    got_t, want_t = _as_tuple(got), _as_tuple(want)
    if len(got_t) != len(want_t):
        return float("inf")
    err, scale = 0.0, 0.0
    for g, w in zip(got_t, want_t):
        if tuple(g.shape) != tuple(w.shape):
            return float("inf")
        d = (g.detach().double().cpu() - w.detach().double().cpu()).abs().max().item()
        err = max(err, d if math.isfinite(d) else float("inf"))
        scale = max(scale, w.abs().max().item())
    return err / (scale + 1e-300)


def exc_line(exc: BaseException) -> str:
    """'Type: first line of the message' (≤ 200 characters), for status cells and gate lines."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------- environment
@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(maxsize=None)  # read once per process: every CPU row's note carries it
def cpu_family_model() -> str:
    """The CPU's "family F model M" from /proc/cpuinfo: virtual machines often report only "AMD EPYC", and two
    generations behind that name differ by 2x in AVX-512 throughput (the compiled GEMM against MKL's AVX2 path)."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("cpu family", "model") and key not in found:
                    found[key] = value.strip()
                if len(found) == 2:
                    break
    except OSError:
        pass
    return f"family {found['cpu family']} model {found['model']}" if len(found) == 2 else "?"


def cpu_description() -> str:
    """"<model name> (family F model M)": the model name alone does not tell two EPYC generations apart."""
    return f"{cpu_model()} ({cpu_family_model()})"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    return device.type if device.type != "cuda" else name_slug(device_name(device))


def name_slug(name: str) -> str:
    """A GPU's name as a results-file slug: "NVIDIA H200" -> nvidia_h200."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "cuda"


def default_results_path(device: torch.device) -> Path:
    return RESULTS_DIR / f"ops_{device_slug(device)}.csv"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - not installed or broken
        return ""


_COMMIT: str | None = None


def git_commit() -> str:
    global _COMMIT
    if _COMMIT is None and os.environ.get("SOURCE_FAST_GIT_COMMIT"):  # a tree copied to a GPU machine
        _COMMIT = os.environ["SOURCE_FAST_GIT_COMMIT"]
    if _COMMIT is None:
        try:
            out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], check=False, cwd=REPO,
                                 capture_output=True, text=True, timeout=10)
            _COMMIT = out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else ""
        except (OSError, subprocess.SubprocessError):
            _COMMIT = ""
        _COMMIT = _COMMIT or "unknown"
    return _COMMIT


def environment(device: torch.device) -> dict[str, str]:
    return {
        "device_name": device_name(device),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda or "",
        "git_commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }


def write_report(out_dir: Path, stem: str, lines: list[str], payload: dict) -> None:
    """A benchmark's table (`<stem>.md`, the printed lines) and its data (`<stem>.json`) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {out_dir / stem}.md and .json")


def load1() -> str:
    """1-minute load average (recorded with CPU rows: the machine may be shared)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return device


# ------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux ≥ 4.0: writing 5 to /proc/self/clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak memory growth (MiB) over the with-block: CUDA allocator peak, or host peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = float("nan")
        self.method = ""

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda.max_memory_allocated"
        else:
            self.rss = _status_kib("VmRSS")
            self.reset_ok = self.rss is not None and _reset_peak_rss()
            self.base = self.rss if self.reset_ok else (self.rss if self.rss is not None else _maxrss_kib())
            self.method = "VmHWM-VmRSS" if self.reset_ok else "ru_maxrss (upper bound)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / MIB
        else:
            peak = _status_kib("VmHWM") if self.reset_ok else _maxrss_kib()
            self.mib = max(0, (peak or 0) - self.base) / 1024
        return False


# ------------------------------------------------------------------------------------- timing
def host_bench(fn: Callable[[], Any], *, rep_s: float = 2.0, warmup_s: float = 0.25, min_reps: int = 3,
               max_reps: int = 200) -> list[float]:
    """Host-timer quantiles (ms) [p50, p20, p80] of fn(); the first call is a warmup."""
    t0 = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t0, 1e-7)
    for _ in range(min(max_reps, int(warmup_s / est))):
        fn()
    n = max(min_reps, min(max_reps, math.ceil(rep_s / est)))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    return [float(x) for x in q]


SLOW_CALL_MS = 50.0  # above this, a few event-timed calls instead of do_bench (its estimate alone runs 5)


def cuda_bench(fn: Callable[[], Any]) -> list[float]:
    """triton.testing.do_bench quantiles (ms) [p50, p20, p80] (it flushes L2 between runs); calls slower
    than SLOW_CALL_MS are timed 3 times with CUDA events (a lease is short, and their spread is small)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    probe_ms = start.elapsed_time(end)
    if probe_ms > SLOW_CALL_MS:  # the probe was the warm-up
        return _cuda_event_bench(fn, reps=3 if probe_ms < 1000 else 1, warm=False)
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - no (working) triton: CUDA events, same quantiles
        return _cuda_event_bench(fn)
    return [float(x) for x in do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES))]


def _cuda_event_bench(fn, reps: int = 20, warm: bool = True) -> list[float]:
    if warm:
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    return [float(x) for x in q]


def one_shot(fn: Callable[[], Any], device: torch.device) -> list[float]:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    ms = (time.perf_counter() - t) * 1e3
    return [ms, ms, ms]


# -------------------------------------------------------------------------------- implementations
def impl_names(bench: OpBench, selected: Sequence[str] | None) -> list[str]:
    names = list(BACKEND_ORDER) + list(bench.baselines())
    if selected:
        unknown = [s for s in selected if s not in names]
        if unknown:
            raise SystemExit(f"--impls: unknown {unknown}; choose from {names}")
        names = [n for n in names if n in selected]
    return names


def unavailable(bench: OpBench, impl: str, inputs: dict[str, Any]) -> str | None:
    """None if impl can run on these inputs, else why not."""
    if impl not in BACKEND_ORDER:
        return None
    if hasattr(bench, "unavailable"):  # an internal primitive that is not a dispatched op
        return bench.unavailable(impl, inputs)
    from source_fast import _dispatch

    if impl == "triton" and _dispatch.interpreting():
        return "TRITON_INTERPRET=1: the interpreter is for tests and is never timed"
    reasons = _dispatch.BACKENDS[impl].not_supported_reasons(bench.op, bench.dispatch_tensors(inputs),
                                                             explicit=True)
    return "; ".join(reasons) or None


def call(bench: OpBench, impl: str, inputs: dict[str, Any]):
    if impl in BACKEND_ORDER:
        return bench.run_backend(impl, inputs)
    return bench.baselines()[impl](inputs)


def measure(bench: OpBench, impl: str, c: Case, device: torch.device, *, smoke: bool, rep_s: float,
            inputs: dict[str, Any] | None = None, warm_inputs: dict[str, Any] | None = None) -> dict:
    """Peak memory of one call, then timing quantiles. Returns a partial row."""
    if inputs is None:
        inputs = bench.make_inputs(c, device)
    if warm_inputs is not None:  # load modules, run dispatch self-tests, start thread pools: not counted
        call(bench, impl, warm_inputs)
        sync(device)
    fn = lambda: call(bench, impl, inputs)
    with PeakMemory(device) as mem:
        out = fn()
        sync(device)
    del out
    if smoke:
        ms = one_shot(fn, device)
    elif device.type == "cuda":
        ms = cuda_bench(fn)
    else:
        ms = host_bench(fn, rep_s=rep_s)
    row = {"ms_p50": ms[0], "ms_p20": ms[1], "ms_p80": ms[2], "peak_mib": mem.mib, "mem_method": mem.method}
    if device.type == "cuda" and not smoke:
        sec = ms[0] / 1e3
        row["tflops"] = bench.flops(c) / sec / 1e12
        row["gbps"] = bench.bytes(c) / sec / 1e9
    return row


def _worker(bench: OpBench, spec: dict) -> None:
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    c = Case.from_json(spec["case"])
    warm = bench.make_inputs(bench.gate_case(c.dtype), device)
    try:
        row = measure(bench, spec["impl"], c, device, smoke=bool(spec["smoke"]), rep_s=float(spec["rep_s"]),
                      warm_inputs=warm)
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - reported as a row, not a crash
        row = {"status": f"ERROR: {exc_line(exc)}"}
    print(RESULT_PREFIX + json.dumps(row), flush=True)


def _run_isolated(script: Path, spec: dict, timeout_s: float) -> dict:
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"status": f"ERROR: timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return {"status": f"ERROR: worker exited {proc.returncode}: {tail[0][:200]}"}


# ----------------------------------------------------------------------------------------- output
def _fmt(x, spec=".3f") -> str:
    if x is None or x == "":
        return ""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "" if math.isnan(v) else format(v, spec)


def finish_row(op: str, impl: str, c: Case, env: dict[str, str], part: dict, note: str = "") -> dict:
    row = {k: "" for k in COLUMNS}
    row.update(env)
    row.update({"op": op, "backend": impl, "mode": c.mode, "dtype": c.dtype, "shape_params": c.shape_params,
                "note": note})
    for k in ("ms_p50", "ms_p20", "ms_p80"):
        row[k] = _fmt(part.get(k), ".4f")
    row["peak_mib"] = _fmt(part.get("peak_mib"), ".1f")
    row["tflops"] = _fmt(part.get("tflops"), ".3f")
    row["gbps"] = _fmt(part.get("gbps"), ".1f")
    row["status"] = part.get("status", "ok")
    return row


def ratio_vs_torch(rows: list[dict]) -> dict[int, str]:
    """For each row index: torch_p50 / this_p50 of the same case (>1: faster than the torch backend)."""
    torch_ms = {}
    for r in rows:
        if r["backend"] == "torch" and r["ms_p50"]:
            torch_ms[(r["op"], r["mode"], r["dtype"], r["shape_params"], r["device_name"], r["threads"])] = \
                float(r["ms_p50"])
    out = {}
    for idx, r in enumerate(rows):
        key = (r["op"], r["mode"], r["dtype"], r["shape_params"], r["device_name"], r["threads"])
        if r["ms_p50"] and key in torch_ms and float(r["ms_p50"]) > 0:
            out[idx] = f"{torch_ms[key] / float(r['ms_p50']):.2f}x"
    return out


def print_table(rows: list[dict], smoke: bool, gpu: bool) -> None:
    ratios = {} if smoke else ratio_vs_torch(rows)
    head = ["op", "backend", "mode", "dtype", "shape_params", "ms_p50", "ms_p20", "ms_p80", "peak_mib",
            "vs_torch", "status"] + (["tflops", "gbps"] if gpu else [])
    table = [head] + [[r[h] if h != "vs_torch" else ratios.get(i, "") for h in head] for i, r in enumerate(rows)]
    widths = [max(len(str(row[j])) for row in table) for j in range(len(head))]
    if smoke:
        print("SMOKE RUN: one iteration on a tiny shape; these timings are not measurements.")
    for k, row in enumerate(table):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (r.get(k) or "") for k in COLUMNS} for r in csv.DictReader(f)]


def upsert_csv(path: Path, rows: list[dict]) -> list[dict]:
    """Replace rows with the same key (op, backend, mode, dtype, shape, device, threads); keep the rest."""
    old = read_csv(path)
    new_keys = {tuple(r[k] for k in KEY_COLUMNS) for r in rows}
    merged = [r for r in old if tuple(r[k] for k in KEY_COLUMNS) not in new_keys]
    merged += rows
    order = {}
    for r in old + rows:
        order.setdefault(r["op"], len(order))
    merged.sort(key=lambda r: order[r["op"]])  # stable: groups ops, keeps row order within an op
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(merged)
    os.replace(tmp, path)
    return merged


def _parse_note(note: str) -> dict[str, str]:
    out = {}
    for part in note.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def render_markdown(csv_path: Path) -> Path:
    """Write <csv stem>.md next to the CSV: one table per op (and the end-to-end memory table)."""
    rows = read_csv(csv_path)
    md = csv_path.with_suffix(".md")
    lines = [f"# {csv_path.stem}: op benchmarks", "",
             f"Generated from `{csv_path.name}` by `benchmarks/_harness.py`; do not edit by hand.", ""]
    devices = sorted({r["device_name"] for r in rows})
    envs = sorted({(r["device_name"], r["threads"], r["torch"], r["triton"], r["cuda"]) for r in rows})
    for d, th, tv, trv, cu in envs:
        lines.append(f"- device: {d}; threads: {th}; torch {tv}; triton {trv or '-'}; cuda {cu or '-'}")
    commits = sorted({r["git_commit"] for r in rows})
    stamps = sorted(r["timestamp"] for r in rows if r["timestamp"])
    lines.append(f"- commits: {', '.join(commits)}; measured {stamps[0] if stamps else '?'} .. "
                 f"{stamps[-1] if stamps else '?'} (UTC)")
    if not any(r["tflops"] for r in rows):  # host timings
        lines += ["", ("**CPU timings on a shared machine** (other jobs ran concurrently): they compare "
                  "implementations on this host only and are not performance claims for the GPU kernels. "
                  "`vs torch` = torch backend p50 / this p50 at the same thread count (> 1: faster than the "
                  "torch backend); the fastest p50 of each case and thread count is in bold. With 2 threads on a "
                  "loaded 2-core host, OpenMP barrier stalls make some timings bimodal (compare p20 with p50). "
                  "`peak MiB` = peak RSS growth of one call beyond its inputs (fresh subprocess per row).")]
    else:
        lines += ["", ("`vs torch` = torch backend p50 / this p50 (> 1: faster). `peak MiB` = allocator peak "
                       "of one call beyond its inputs. TFLOP/s and GB/s use the per-op models in the bench scripts.")]
    roof = roofline_for(csv_path)
    if roof:
        lines += ["", (f"`% roof`: TFLOP/s over the device's measured matrix rate for the dtype (fp32: "
                       f"{roof['mm_fp32_tflops']:.1f} TFLOP/s without TF32, the precision every implementation here "
                       f"uses; bf16/fp16: {roof['mm_bf16_tflops']:.0f}), and GB/s over its measured copy bandwidth "
                       f"({roof['copy_gbps']:.0f} GB/s); from `{roofline_path(csv_path).name}` "
                       "(benchmarks/bench_roofline.py).")]
    ratios = ratio_vs_torch(rows)
    ops = []
    for r in rows:
        if r["op"] not in ops:
            ops.append(r["op"])
    gpu = any(r["tflops"] for r in rows)
    if gpu:
        lines += ["", "## Summary: the largest shape of each op and dtype", ""] + _largest_shape_table(rows, roof)
    for op in ops:
        idx = [i for i, r in enumerate(rows) if r["op"] == op]
        lines += ["", f"## {op}", ""]
        if op == "e2e_pairwise_scores":
            lines += _e2e_table([rows[i] for i in idx])
            continue
        # Group: case (first-appearance order), then thread count; fastest p50 of each group in bold.
        case_order: dict[tuple, int] = {}
        for i in idx:
            case_order.setdefault((rows[i]["mode"], rows[i]["dtype"], rows[i]["shape_params"]), len(case_order))
        def group(i, case_order=case_order):
            r = rows[i]
            return case_order[(r["mode"], r["dtype"], r["shape_params"])], int(r["threads"] or 0), r["device_name"]

        idx.sort(key=group)  # stable: implementation order kept within a group
        best: dict[tuple, float] = {}
        for i in idx:
            if rows[i]["ms_p50"] and rows[i]["status"] == "ok":
                best[group(i)] = min(best.get(group(i), math.inf), float(rows[i]["ms_p50"]))
        head = ["mode", "dtype", "shape", "threads", "impl", "ms p50 [p20, p80]", "peak MiB", "vs torch", "status"]
        if gpu:
            head += ["TFLOP/s", "GB/s"] + (["% roof (FLOP, BW)"] if roof else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i in idx:
            r = rows[i]
            ms = f"{float(r['ms_p50']):.3f} [{float(r['ms_p20']):.3f}, {float(r['ms_p80']):.3f}]" \
                if r["ms_p50"] else "-"
            if r["ms_p50"] and float(r["ms_p50"]) == best.get(group(i)):
                ms = f"**{ms.split(' ')[0]}** {ms.split(' ', 1)[1]}"
            status = r["status"] if r["status"] != "ok" else ""
            if r["note"]:
                status = (status + " " if status else "") + r["note"]
            cells = [r["mode"], r["dtype"], r["shape_params"].replace(",", ", "), r["threads"], f"`{r['backend']}`", ms,
                     r["peak_mib"] or "-", ratios.get(i, "-"), status]
            if gpu:
                cells += [r["tflops"] or "-", r["gbps"] or "-"]
                if roof:
                    cells.append(_roof_cell(r, roof))
            lines.append("| " + " | ".join(cells) + " |")
    if len(devices) > 1:
        lines += ["", f"(rows from {len(devices)} devices: {', '.join(devices)})"]
    md.write_text("\n".join(lines) + "\n")
    return md


def _largest_shape_table(rows: list[dict], roof: dict | None) -> list[str]:
    """p50 (ms) of torch / triton / cuda on the case with the most work (torch TFLOP/s × ms) per (op, dtype), and
    the fastest implementation's rate (and % of the roofline when known)."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["ms_p50"] and r["status"] in ("", "ok") and r["backend"] in ("torch", "triton", "cuda"):
            cases.setdefault((r["op"], r["dtype"], r["mode"], r["shape_params"]), {})[r["backend"]] = r
    largest: dict[tuple, tuple] = {}
    for key, impls in cases.items():
        base = impls.get("torch")
        if base is None or not base["tflops"]:
            continue
        work = float(base["tflops"]) * float(base["ms_p50"])
        if key[:2] not in largest or work > largest[key[:2]][0]:
            largest[key[:2]] = (work, key, impls)
    out = ["| op | dtype | case | torch ms | triton ms | cuda ms | fastest | TFLOP/s" + (" (% roof)" if roof else "")
           + " |", "|---|---|---|---:|---:|---:|---|---:|"]
    for (op, dtype), (_, key, impls) in sorted(largest.items()):
        fastest = min(impls, key=lambda b: float(impls[b]["ms_p50"]))
        rate = f"{float(impls[fastest]['tflops']):.1f}"
        if roof:
            rate += f" ({_roof_percents(impls[fastest], roof)[0]:.1f} %)"
        times = [f"{float(impls[b]['ms_p50']):.1f}" if b in impls else "-" for b in ("torch", "triton", "cuda")]
        out.append(f"| {op} | {dtype} | {key[2]}; {key[3].replace(',', ', ')} | " + " | ".join(times)
                   + f" | `{fastest}` | {rate} |")
    return out


def roofline_path(csv_path: Path) -> Path:
    """ops_<device>.csv -> roofline_<device>.json beside it (written by benchmarks/bench_roofline.py)."""
    return csv_path.with_name(csv_path.stem.replace("ops_", "roofline_", 1) + ".json")


def roofline_for(csv_path: Path) -> dict | None:
    path = roofline_path(csv_path)
    return json.loads(path.read_text()) if path.exists() else None


def _roof_percents(r: dict, roof: dict) -> tuple[float, float]:
    """(% of the dtype's matrix rate, % of the copy bandwidth) of a row with TFLOP/s and GB/s."""
    peak = roof["mm_fp32_tflops"] if r["dtype"] in ("float32", "float64") else roof["mm_bf16_tflops"]
    return 100 * float(r["tflops"]) / peak, 100 * float(r["gbps"]) / roof["copy_gbps"]


def _roof_cell(r: dict, roof: dict) -> str:
    if not r["tflops"]:
        return "-"
    flop, bw = _roof_percents(r, roof)
    return f"{flop:.1f} %, {bw:.1f} %"


def _e2e_table(rows: list[dict]) -> list[str]:
    head = ["method", "scores store", "shape", "backend", "threads", "fit s", "pairwise s", "fit peak growth",
            "pairwise peak growth", "score matrix", "pairwise growth beyond scores", "process peak",
            "process peak beyond scores", "status"]
    out = [("Single runs, each in a fresh subprocess; memory in MiB. *Growth*: peak RSS during the stage minus the "
            "RSS just before it. *Beyond scores*: minus the Q×N×4-byte score matrix (twice with a memmap store: its "
            "pages and the returned copy). *Process peak*: absolute peak RSS (interpreter, torch, model, data bank "
            "included)."), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = _parse_note(r["note"])
        method, _, store = r["mode"].partition("|")
        pair_s = f"{float(r['ms_p50']) / 1e3:.2f}" if r["ms_p50"] else "-"
        out.append("| " + " | ".join([method, store, r["shape_params"].replace(",", ", "), r["backend"], r["threads"],
                                      n.get("fit_s", "-"), pair_s, n.get("fit_peak_mib", "-"), r["peak_mib"] or "-",
                                      n.get("scores_mib", "-"), n.get("beyond_scores_mib", "-"),
                                      n.get("process_peak_mib", "-"), n.get("process_peak_beyond_scores_mib", "-"),
                                      r["status"] if r["status"] != "ok" else ""]) + " |")
    return out


def write_results(rows: list[dict], out: Path) -> None:
    upsert_csv(out, rows)
    md = render_markdown(out)
    print(f"wrote {out} and {md}")


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shape, one iteration, gate still runs; CI mode")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:k]")
    p.add_argument("--impls", default="", help="comma list of implementations (backends and baselines)")
    p.add_argument("--dtypes", default="", help="comma list: only the cases of these dtypes (e.g. bfloat16)")
    p.add_argument("--cases", default="", help="only the cases whose mode contains this text (e.g. 'sparse a')")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default; smoke: 1)")
    p.add_argument("--out", default="", help="CSV to upsert (default benchmarks/results/ops_<device>.csv; "
                                              "smoke runs write only when given); '-' writes nothing")
    p.add_argument("--rep-s", type=float, default=2.0, help="CPU: seconds of timed repeats per row (≥ 3 repeats)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one subprocess per measurement (default: on for full CPU runs, off otherwise)")
    p.add_argument("--timeout-s", type=float, default=1200, help="per isolated measurement")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(bench: OpBench, argv=None, script: str | None = None) -> int:
    args = parse_args(argv, description=(sys.modules["__main__"].__doc__ or ""))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    elif args.smoke and not args.worker:
        torch.set_num_threads(1)  # tiny shapes: a 2nd thread only adds barrier stalls on a loaded CI host
    if args.worker:
        _worker(bench, json.loads(args.worker))
        return 0
    script_path = Path(script or sys.modules["__main__"].__file__).resolve()
    device = pick_device(args.device)
    isolate = args.isolate if args.isolate is not None else (device.type == "cpu" and not args.smoke)
    env = environment(device)
    names = impl_names(bench, [s for s in args.impls.split(",") if s])
    cases = bench.cases(device, args.smoke)
    if args.dtypes:
        cases = [c for c in cases if c.dtype in args.dtypes.split(",")]
    if args.cases:
        cases = [c for c in cases if args.cases in c.mode]
        if not cases:
            print(f"no case of {bench.op} has {args.cases!r} in its mode", file=sys.stderr)
            return 2
    print(f"# {bench.op} on {env['device_name']} ({device}), threads={env['threads']}, torch {env['torch']}, "
          f"triton {env['triton'] or '-'}, cuda {env['cuda'] or '-'}, commit {env['git_commit']}"
          f"{', SMOKE' if args.smoke else ''}{', isolated subprocesses' if isolate else ''}", flush=True)

    # 1. correctness gate, per dtype, before any timing
    passed: dict[tuple[str, str], bool] = {}
    failures = 0
    rows: list[dict] = []
    warm: dict[str, dict] = {}
    for dtype in dict.fromkeys(c.dtype for c in cases):
        gc_inputs = bench.make_inputs(bench.gate_case(dtype), device)
        warm[dtype] = gc_inputs
        ref = bench.reference(gc_inputs)
        for impl in names:
            why = unavailable(bench, impl, gc_inputs)
            if why:
                print(f"SKIP {bench.op} {impl} {dtype}: {why}", flush=True)
                continue
            try:
                err = rel_error(call(bench, impl, gc_inputs), ref)
                ok = err <= GATE_TOL[dtype]
                detail = f"max|got-ref|/max|ref| = {err:.2e}, tol {GATE_TOL[dtype]:.0e}"
            except Exception as exc:  # noqa: BLE001 - a backend that raises fails the gate
                ok, detail = False, f"raised {exc_line(exc)}"
            passed[(impl, dtype)] = ok
            print(f"GATE {bench.op} {impl} {dtype}: {'PASS' if ok else 'FAILED'} ({detail})", flush=True)
            if not ok:
                failures += 1

    # 2. memory and timing of what passed; each row is upserted as soon as it is measured, so a run cut
    # short (a device lease, a timeout) keeps what it finished
    out = args.out or ("" if args.smoke else str(default_results_path(device)))
    out = "" if out == "-" else out

    def record(row: dict) -> None:
        rows.append(row)
        if out:
            upsert_csv(Path(out), [row])
            render_markdown(Path(out))

    cache: dict[Case, dict] = {}
    for c in cases:
        for impl in names:
            if (impl, c.dtype) not in passed:
                continue
            note = bench.note(impl, c, device)
            if impl == "triton" and device.type == "cuda" and os.environ.get("SOURCE_FAST_TRITON_BLOCKS"):
                note = "; ".join(x for x in (note, "tiles=SOURCE_FAST_TRITON_BLOCKS") if x)  # a tuning run's choices
            if device.type != "cuda" and not args.smoke:
                note = "; ".join(x for x in (note, f"load1={load1()}", f"cpu={cpu_family_model()}") if x)
            if not passed[(impl, c.dtype)]:
                record(finish_row(bench.op, impl, c, env, {"status": "FAILED (correctness gate)"}, note))
                continue
            print(f"  measuring {bench.op} {impl} {c.mode} {c.dtype} {c.shape_params} ...", flush=True)
            if isolate:
                spec = {"case": c.to_json(), "impl": impl, "device": str(device), "smoke": args.smoke,
                        "rep_s": args.rep_s, "threads": torch.get_num_threads()}
                part = _run_isolated(script_path, spec, args.timeout_s)
            else:
                try:
                    if c not in cache:
                        cache.clear()  # one case's inputs at a time
                        cache[c] = bench.make_inputs(c, device)
                    part = measure(bench, impl, c, device, smoke=args.smoke, rep_s=args.rep_s, inputs=cache[c],
                                   warm_inputs=warm[c.dtype])
                    part["status"] = "ok"
                except Exception as exc:  # noqa: BLE001 - reported as a row
                    part = {"status": f"ERROR: {exc_line(exc)}"}
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            if args.smoke and part.get("status") == "ok":
                part["status"] = "smoke"
            if str(part.get("status", "")).startswith("ERROR"):
                failures += 1
            record(finish_row(bench.op, impl, c, env, part, note))
    cache.clear()

    print()
    print_table(rows, args.smoke, device.type == "cuda")
    if out and rows:
        print(f"wrote {out} and {Path(out).with_suffix('.md')}")
    return 1 if failures else 0
