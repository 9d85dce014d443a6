"""Per-process measurements shared by the end-to-end comparisons (bench_vs_kronfluence.py,
bench_vs_bergson.py). Dependency-free (no torch, no git process), so it imports in any venv."""
from __future__ import annotations

import os
import resource
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def set_threads(threads: int) -> None:
    """BLAS/OpenMP thread counts for this process and its children (set before torch is imported)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def rss_mib() -> float:
    """Peak resident memory of this process (MiB): VmHWM of /proc/self/status.

    Not ru_maxrss: Linux carries the parent's high-water mark into a fork+exec'd child, so
    ru_maxrss never reads below the parent's RSS at the time of the fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux; see above


def cpu_seconds(children: bool = False) -> float:
    """User + system CPU time of this process (and of its reaped children when asked)."""
    usage = [resource.getrusage(resource.RUSAGE_SELF)]
    if children:
        usage.append(resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usage)


def git_commit() -> str:
    """HEAD's commit read from .git directly (no git process: works from any cwd and venv)."""
    git = REPO / ".git"
    try:
        if git.is_file():
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:12]
        ref = head.split(":", 1)[1].strip()
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:12]
        packed = git / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:12]
    except (OSError, IndexError):
        pass
    return "unknown"


# ------------------------------------------------------------------ one measurement per fresh process
RESULT_PREFIX = "BENCH_RESULT "


def worker_env(threads: int, **extra: str) -> dict:
    """Environment of a worker process: the thread count pinned, no Triton interpreter."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(extra)
    return env


def run_worker(script: str, spec: dict, *, python: str | None = None, env: dict | None = None,
               timeout: float | None = None, cwd: str | None = None, what: str = "worker") -> dict:
    """Run `python script --worker <spec json>` and return the dict it printed (see `answer`)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([python or sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def answer(worker, spec_json: str) -> int:
    """Worker side of `run_worker`: run worker(spec) and print its result line."""
    import json

    print(RESULT_PREFIX + json.dumps(worker(json.loads(spec_json))), flush=True)
    return 0
