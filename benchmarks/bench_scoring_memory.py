"""End-to-end memory and time of SourceAnalyzer.pairwise_scores as the training set grows.

Model: MLP 256→256→10 (ReLU), cross-entropy task, batch 256, 50 queries, float32. Training sets of
N ∈ {10³, 10⁴, 10⁵} synthetic examples generated on the fly from a fixed 4096-row bank (so the dataset itself
uses the same memory at every N). Configurations:

  influence|memory   method="influence" (EK-FAC influence at the final checkpoint, one checkpoint),
                     output_dir=None (scores assembled in memory)
  influence|memmap   same, with an output_dir (factors in safetensors, scores in the .npy memmap store)
  source|memory      method="source", 2 checkpoints in 2 segments, output_dir=None
  source|memmap      same, with an output_dir

Threads: 1 by default (``--threads`` to change): the per-batch ops of this MLP are too small to gain from a
second thread, and on a shared 2-core host a second OpenMP thread stalls at barriers (fits 10-50× slower were
seen under load). Each (configuration, N) runs in a fresh subprocess: it fits (analyzer.fit), then scores.
Peak memory of each stage is its peak RSS growth (VmHWM reset through /proc/self/clear_refs, or ru_maxrss
growth without it) from the RSS just before it; the absolute process peak is reported too. The claim
checked: peak memory of pairwise_scores beyond the score matrix itself (Q×N×4 bytes; with an output_dir the
memmap's pages count once more, as the returned tensor is a copy of the memmap) stays flat as N grows; so does
the fit's.

Correctness gate first (no timing before it): on a tiny float64 model the analyzer's pairwise scores are
compared with the dense float64 oracle source_fast.reference.dense_source (influence and source) for the torch
backend in float64 (tolerance 1e-6 relative to max|ref|) and float32 (1e-3), and for the backend the benchmark
uses (auto selection per op, or --backend) in float32 (1e-3).

    python benchmarks/bench_scoring_memory.py            # full run (~5-10 min on 2 cores)
    python benchmarks/bench_scoring_memory.py --smoke    # CI: gate + N ∈ {200, 400} on a tiny MLP, two configs
    python benchmarks/bench_scoring_memory.py --sizes 1000,10000 --configs influence|memory

Rows go to benchmarks/results/ops_<device>.csv as op ``e2e_pairwise_scores`` (ms_p50 = pairwise_scores wall
time of the single run, peak_mib = its peak growth; fit time, fit peak, score-matrix size and the growth
beyond it are in the note column), and to the generated .md table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _harness as H
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

FULL = {"sizes": (1000, 10000, 100000), "n_query": 50, "dims": (256, 256, 10), "batch": 256}
SMOKE = {"sizes": (200, 400), "n_query": 4, "dims": (16, 16, 4), "batch": 64,
         "configs": ("influence|memory", "source|memmap")}
CONFIGS = ("influence|memory", "influence|memmap", "source|memory", "source|memmap")
BANK = 4096
GATE_TOL = {"float64": 1e-6, "float32": 1e-3}


class ClassificationTask:
    """Kronfluence-style task: summed cross-entropy; sample=True draws labels from the model."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.multinomial(F.softmax(logits.double(), -1), 1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    def get_influence_tracked_modules(self):
        return None

    def get_attention_mask(self, batch):
        return None


class SyntheticData(Dataset):
    """N examples made on the fly from a fixed bank: x_n = bank[n mod B] + a small deterministic n-dependent
    shift, y_n = a hash of n. Memory is O(B) at any N. Supports batched fetching (__getitems__)."""

    def __init__(self, n, d_in, classes, seed, dtype=torch.float32):
        gen = torch.Generator().manual_seed(seed)
        self.bank = torch.randn(min(n, BANK), d_in, generator=gen, dtype=torch.float64).to(dtype)
        self.freq = torch.rand(d_in, generator=gen, dtype=torch.float64).to(dtype)
        self.n, self.classes, self.dtype = n, classes, dtype

    def __len__(self):
        return self.n

    def _make(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = self.bank[idx % len(self.bank)] + 0.1 * torch.sin(idx[:, None].to(self.dtype) * self.freq)
        y = (idx * 7919 + 13) % self.classes
        return x, y

    def __getitem__(self, i):
        x, y = self._make([int(i)])
        return x[0], y[0]

    def __getitems__(self, indices):
        x, y = self._make(list(indices))
        return list(zip(x.unbind(0), y.unbind(0)))


def mlp(dims, dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dims[0], dims[1]), nn.ReLU(), nn.Linear(dims[1], dims[2])).to(dtype)


def make_run(dims, method, dtype, steps=40, lr=0.05):
    """A short SGD run on the bank; checkpoints at steps/2 and steps (source) or the final one (influence)."""
    import source_fast as sf

    model = mlp(dims, dtype)
    data = SyntheticData(512, dims[0], dims[2], seed=7, dtype=dtype)
    x, y = data._make(range(512))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ckpts, ckpt_steps = [], []
    for k in range(steps):
        sl = slice((k * 64) % 512, (k * 64) % 512 + 64)
        opt.zero_grad()
        F.cross_entropy(model(x[sl]), y[sl]).backward()
        opt.step()
        if (k + 1) % (steps // 2) == 0:
            ckpts.append({name: v.detach().clone() for name, v in model.state_dict().items()})
            ckpt_steps.append(k + 1)
    if method == "influence":
        run = sf.TrainingRun(ckpts[-1:], ckpt_steps[-1:], lr=lr, num_segments=1)
    else:
        run = sf.TrainingRun(ckpts, ckpt_steps, lr=lr, num_segments=2)
    return model, run


def analyzer_for(model, run, method, output_dir, batch, backend, dtype_name="float32"):
    import source_fast as sf

    kw = {"damping": 0.01} if method == "influence" else {}
    return sf.SourceAnalyzer(model, ClassificationTask(), run, output_dir=output_dir, method=method,
                             batch_size=batch, progress=False, backend=backend, **kw)


# ----------------------------------------------------------------------------------------- gate
def gate(backends) -> int:
    """Analyzer vs the dense float64 oracle on a tiny model. Returns the number of failures."""
    import source_fast as sf
    from source_fast.reference.dense_source import dense_source_scores

    failures = 0
    oracles = {}
    for dtype_name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        for backend in backends:
            if dtype_name == "float64" and backend != "torch":
                continue
            label = backend or "auto"
            for method in ("influence", "source"):
                dims = (4, 5, 3)
                kw = {"damping": 0.01} if method == "influence" else {}
                if method not in oracles:  # one dense oracle per method, shared by every backend and dtype
                    model64, run64 = make_run(dims, method, torch.float64, steps=20, lr=0.3)
                    data = SyntheticData(24, dims[0], dims[2], seed=1, dtype=torch.float64)
                    oracles[method] = (run64, dense_source_scores(model64, ClassificationTask(), run64,
                                                                  Subset(data, range(5)), data, method=method, **kw))
                run64, oracle = oracles[method]
                model = mlp(dims, dtype)
                run = sf.TrainingRun([{k: v.to(dtype) for k, v in c.items()} for c in run64.checkpoints],
                                     run64.steps, lr=list(run64.lrs), num_segments=len(run64.segments))
                data_t = SyntheticData(24, dims[0], dims[2], seed=1, dtype=dtype)
                try:
                    an = sf.SourceAnalyzer(model, ClassificationTask(), run, method=method, fisher="empirical",
                                           batch_size=7, progress=False, backend=backend, **kw)
                    err = H.rel_error(an.pairwise_scores(Subset(data_t, range(5)), data_t), oracle)
                    ok = err <= GATE_TOL[dtype_name]
                    detail = f"{method}: max|got-ref|/max|ref| = {err:.2e}, tol {GATE_TOL[dtype_name]:.0e}"
                except Exception as exc:  # noqa: BLE001 - a raising pipeline fails the gate
                    ok, detail = False, f"{method}: raised {H.exc_line(exc)}"
                print(f"GATE e2e_pairwise_scores {label} {dtype_name}: {'PASS' if ok else 'FAILED'} ({detail})",
                      flush=True)
                failures += not ok
    return failures


def resolved_backend(backend):
    """What backend=None resolves to for float32 CPU score_pairwise inputs."""
    if backend:
        return backend
    from source_fast import _dispatch

    t = {"v": torch.zeros(1, 1, 1), "a": torch.zeros(1, 1, 1), "g": torch.zeros(1, 1, 1)}
    for name, b in _dispatch.BACKENDS.items():
        if not b.not_supported_reasons("score_pairwise", t):
            return f"auto:{name}"
    return "auto"


# --------------------------------------------------------------------------------------- worker
def _mib_now():
    return (H._status_kib("VmRSS") or 0) / 1024


def _stage_peak(fn):
    """Run fn(); return (result, seconds, peak RSS growth MiB from the RSS just before it, absolute peak RSS
    MiB during it). Without clear_refs the process-lifetime ru_maxrss is used (growth is then an upper bound)."""
    import gc

    gc.collect()
    before = H._status_kib("VmRSS")
    reset = before is not None and H._reset_peak_rss()
    base = before if before is not None else H._maxrss_kib()
    t = time.perf_counter()
    out = fn()
    sec = time.perf_counter() - t
    peak = (H._status_kib("VmHWM") if reset else None) or H._maxrss_kib()
    return out, sec, max(0, peak - base) / 1024, peak / 1024


def worker(spec):
    torch.set_num_threads(int(spec["threads"]))
    method, store = spec["config"].split("|")
    dims, n, n_query, batch = tuple(spec["dims"]), int(spec["n"]), int(spec["n_query"]), int(spec["batch"])
    model, run = make_run(dims, method, torch.float32)
    train = SyntheticData(n, dims[0], dims[2], seed=1)
    queries = Subset(SyntheticData(max(n_query, 64), dims[0], dims[2], seed=2), range(n_query))
    with tempfile.TemporaryDirectory(prefix="sf_bench_mem_") as tmp:
        out_dir = Path(tmp) / "store" if store == "memmap" else None
        an = analyzer_for(model, run, method, out_dir, batch, spec["backend"] or None)
        rss_start = _mib_now()
        _, fit_s, fit_peak, fit_abs = _stage_peak(lambda: an.fit(train))
        rss_fit = _mib_now()
        scores, pair_s, pair_peak, pair_abs = _stage_peak(lambda: an.pairwise_scores(queries, train))
        ok = tuple(scores.shape) == (n_query, n) and bool(torch.isfinite(scores).all())
        del scores
    scores_mib = n_query * n * 4 / H.MIB
    copies = 2 if store == "memmap" else 1
    print(H.RESULT_PREFIX + json.dumps({
        "status": "ok" if ok else "ERROR: wrong shape or non-finite scores",
        "fit_s": fit_s, "pairwise_s": pair_s, "fit_peak_mib": fit_peak, "pairwise_peak_mib": pair_peak,
        "scores_mib": scores_mib, "beyond_scores_mib": pair_peak - copies * scores_mib,
        "process_peak_mib": max(fit_abs, pair_abs), "process_peak_beyond_scores_mib": max(fit_abs, pair_abs)
        - copies * scores_mib, "rss_start_mib": rss_start, "rss_after_fit_mib": rss_fit,
    }), flush=True)


def run_one(spec, timeout_s, isolate):
    if not isolate:  # smoke: in-process (peak numbers are then only indicative)
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            worker(spec)
        lines = buf.getvalue().splitlines()
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s, cwd=H.REPO)
        except subprocess.TimeoutExpired:
            return {"status": f"ERROR: timed out after {timeout_s:.0f} s"}
        lines = proc.stdout.splitlines()
        if not any(line.startswith(H.RESULT_PREFIX) for line in lines):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            return {"status": f"ERROR: worker exited {proc.returncode}: {tail[0][:200]}"}
    for line in lines:
        if line.startswith(H.RESULT_PREFIX):
            return json.loads(line[len(H.RESULT_PREFIX):])
    return {"status": "ERROR: no result"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--sizes", default="", help="comma list of N (default 1000,10000,100000)")
    p.add_argument("--configs", default="", help=f"comma list from {CONFIGS} (default: all; smoke: "
                                                 f"{','.join(SMOKE['configs'])})")
    p.add_argument("--backend", default="", help="source_fast backend for the analyzer (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 1, see the module doc)")
    p.add_argument("--out", default="", help="CSV to upsert (default benchmarks/results/ops_cpu.csv; smoke: none)")
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # Default 1 thread: the per-batch ops of a 256-wide MLP (batch 256) are too small to gain from a 2nd
    # thread, and on a shared 2-core host a 2nd OpenMP thread stalls at barriers (10-50x slower fits seen).
    torch.set_num_threads(args.threads if args.threads > 0 else 1)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    cfg = SMOKE if args.smoke else FULL
    sizes = [int(s) for s in args.sizes.split(",") if s] or list(cfg["sizes"])
    configs = [c for c in args.configs.split(",") if c] or list(cfg.get("configs", CONFIGS))
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise SystemExit(f"--configs: unknown {bad}; choose from {CONFIGS}")
    device = torch.device("cpu")  # the analyzer runs on the model's device; this benchmark is host-memory
    env = H.environment(device)
    backend_label = resolved_backend(args.backend)
    print(f"# e2e_pairwise_scores on {env['device_name']}, threads={env['threads']}, torch {env['torch']}, "
          f"commit {env['git_commit']}, backend {backend_label}{', SMOKE' if args.smoke else ''}", flush=True)

    # torch (float64 and float32) and what the benchmark runs: backend=None (auto) or --backend, in float32
    gate_backends = ["torch"] + [args.backend or None] if args.backend != "torch" else ["torch"]
    failures = gate(gate_backends)
    if failures:
        print(f"{failures} gate failure(s): not timing", flush=True)
        return 1

    rows, results = [], {}
    shape_tmpl = "N={n},Q={q},mlp={d},batch={b}"
    for config in configs:
        for n in sizes:
            print(f"  measuring {config} N={n} ...", flush=True)
            spec = {"config": config, "n": n, "n_query": cfg["n_query"], "dims": list(cfg["dims"]),
                    "batch": cfg["batch"], "backend": args.backend, "threads": torch.get_num_threads()}
            r = run_one(spec, args.timeout_s, isolate=not args.smoke)
            results[(config, n)] = r
            if args.smoke and r.get("status") == "ok":
                r["status"] = "smoke"
            if str(r.get("status", "")).startswith("ERROR"):
                failures += 1
            case = H.Case(config, (), "float32")
            part = {"status": r.get("status", "ERROR"), "ms_p50": r.get("pairwise_s", float("nan")) * 1e3,
                    "peak_mib": r.get("pairwise_peak_mib")}
            note = ";".join(f"{k}={r[k]:.2f}" for k in ("fit_s", "fit_peak_mib", "scores_mib", "beyond_scores_mib",
                                                       "process_peak_mib", "process_peak_beyond_scores_mib",
                                                       "rss_start_mib") if k in r)
            note += f";load1={H.load1()}"
            row = H.finish_row("e2e_pairwise_scores", backend_label, case, env, part, note)
            row["shape_params"] = shape_tmpl.format(n=n, q=cfg["n_query"], d="-".join(map(str, cfg["dims"])),
                                                    b=cfg["batch"])
            row["ms_p20"] = row["ms_p80"] = ""
            rows.append(row)

    print()
    if args.smoke:
        print("SMOKE RUN: tiny model; these timings and memory numbers are not measurements.")
    head = f"{'config':18s} {'N':>7s} {'fit s':>7s} {'pair s':>7s} {'fit peak':>9s} {'pair peak':>9s} " \
           f"{'scores':>7s} {'beyond':>7s} {'proc peak':>9s} {'proc-scores':>11s}  status"
    print(head + "\n" + "-" * len(head))
    for (config, n), r in results.items():
        def f(k, r=r):
            return f"{r[k]:.2f}" if k in r else "-"
        print(f"{config:18s} {n:>7d} {f('fit_s'):>7s} {f('pairwise_s'):>7s} {f('fit_peak_mib'):>9s} "
              f"{f('pairwise_peak_mib'):>9s} {f('scores_mib'):>7s} {f('beyond_scores_mib'):>7s} "
              f"{f('process_peak_mib'):>9s} {f('process_peak_beyond_scores_mib'):>11s}  {r.get('status')}")
    print("(MiB. fit/pair peak: peak RSS growth of the stage; beyond = pair peak − score matrix (×2 with a memmap "
          "store: its pages + the returned copy); proc peak: absolute peak RSS of the process; proc-scores: the "
          "same minus the score matrix (×2 with a memmap))")
    for config in configs:
        pts = [(n, results[(config, n)]) for n in sizes if "beyond_scores_mib" in results[(config, n)]]
        if len(pts) >= 2:
            lo, hi = pts[0][1], pts[-1][1]
            print(f"FLATNESS {config}: N {pts[0][0]} -> {pts[-1][0]}: "
                  + "; ".join(f"{label} {lo[k]:.1f} -> {hi[k]:.1f} MiB ({hi[k] - lo[k]:+.1f})"
                              for label, k in (("pairwise growth beyond scores", "beyond_scores_mib"),
                                               ("fit growth", "fit_peak_mib"),
                                               ("process peak beyond scores", "process_peak_beyond_scores_mib"))))
    out = args.out or ("" if args.smoke else str(H.default_results_path(device)))
    if out and out != "-" and rows:
        H.write_results(rows, Path(out))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
