"""source_fast vs Kronfluence 1.0.1 on CPU (or, with --device cuda, a GPU): wall time and peak memory per stage.

Same model, weights, data, Task instance class, batch size and torch thread count for both libraries.
Workloads (defaults; --smoke shrinks everything to a few seconds):

  cls  MLP 784→512→256→10, cross-entropy, 5,000 train / 200 query examples (random inputs, labels from
       a random teacher MLP)
  reg  MLP 64→128→128→1, Gaussian NLL (sum of ½(y−f)²), 5,000 / 200 (targets from a random teacher)
  cnn  (not in the default set) CNN on 3×32×32 inputs: conv 3→16 (3×3, "same") → ReLU → max-pool 2 → conv
       16→32 (3×3, "same") → ReLU → max-pool 2 → linear 2048→10, cross-entropy, 2,000 / 100 (labels from a
       random teacher CNN): convolutions, whose positions are tokens (1,024 and 256 per example)

Each model is trained 3 epochs of SGD (momentum 0.9, batch 100, 150 steps) and checkpointed 6 times
(steps 25, 50, …, 150). Measured, each in a fresh subprocess (peak RSS = its VmHWM; also its CPU time):

  kronfluence  influence  EK-FAC (true Fisher, heuristic damping)  fit / pairwise / self
                                                                   (all 200 queries in one query batch)
  source_fast  influence  EK-FAC (same)                            fit / pairwise / self
  source_fast  source     SOURCE, L=3 segments, C=6 checkpoints    fit / pairwise / self / one_pass

Stage boundaries: Kronfluence "fit" = fit_all_factors (covariances, eigendecomposition, Λ); its
"pairwise"/"self" calls load the factors from disk. source_fast "fit" = SourceAnalyzer.fit; its
"pairwise"/"self" stages include re-loading the stored factors (a fit() that reads the stored eigenbases and
Λ back) before the scores, to match. Scores are written to disk by both. source_fast's
"one_pass" = pairwise_scores without fit() from an empty folder: curvature and pairwise scores with one pass
over the training data per checkpoint (the task's compute_train_loss_pair), to set against fit + pairwise.

    python benchmarks/bench_vs_kronfluence.py                 # full run (~10+ min on 2 cores)
    python benchmarks/bench_vs_kronfluence.py --smoke         # CI: seconds, in one process; no files unless --out-dir
    python benchmarks/bench_vs_kronfluence.py --threads 2 --workloads cls
    python benchmarks/bench_vs_kronfluence.py --device cuda   # model, data and both libraries on the GPU

Results: benchmarks/results/vs_kronfluence_<device>.csv and .md (full run; <device> = cpu or the GPU's name).
On a GPU each stage ends with a device synchronisation before the clock stops, and the CSV adds the stage's
peak GPU memory (torch.cuda.max_memory_allocated). Without Kronfluence installed
(requirements-kronfluence.txt) its rows are reported as skipped.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _process

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

FULL = {"n_train": 5000, "n_query": 200, "cls_dims": (784, 512, 256, 10), "reg_dims": (64, 128, 128, 1),
        "cnn": {"n_train": 2000, "n_query": 100, "image": 32}}
SMOKE = {"n_train": 256, "n_query": 8, "cls_dims": (784, 32, 16, 10), "reg_dims": (16, 32, 32, 1),
         "cnn": {"n_train": 256, "n_query": 4, "image": 8}}
EPOCHS, TRAIN_BATCH, NUM_CHECKPOINTS, NUM_SEGMENTS, MOMENTUM = 3, 100, 6, 3, 0.9
LR = {"cls": 0.05, "reg": 0.01, "cnn": 0.02}

COLUMNS = ["workload", "library", "method", "stage", "seconds", "peak_rss_mib", "threads", "cpu_model",
           "torch_version", "kronfluence_version", "source_fast_commit", "date",
           # extra context
           "cpu_seconds", "rss_before_mib", "loadavg_1m", "n_train", "n_query", "batch_size", "sf_backend", "status",
           "device", "peak_gpu_mib"]

# (library, method) measured, in order; stages per pair.
PLAN = [("kronfluence", "influence"), ("source_fast", "influence"), ("source_fast", "source")]
STAGES = ("fit", "pairwise", "self")
ONE_PASS = "one_pass"
TARGET_WORKLOADS = ("cls", "reg")  # the targets (influence ≥ 5× per stage, SOURCE C=6 > 1×) are set on these  # source_fast SOURCE only: pairwise_scores without fit() (fit + pairwise, one pass each)


# ------------------------------------------------------------------------------ shared definitions


def build_model(dims):
    """An MLP of these widths, or ("cnn", image side) for the CNN workload."""
    from torch import nn

    if dims[0] == "cnn":
        side = dims[1] // 4  # two 2×2 max-pools
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(32 * side * side, 10))
    layers = []
    for k in range(len(dims) - 1):
        layers.append(nn.Linear(dims[k], dims[k + 1]))
        if k < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_task(workload: str):
    """A kronfluence.Task when Kronfluence is importable (the same class for both libraries), else the
    protocol-identical source_fast.Task."""
    import torch
    import torch.nn.functional as F

    try:
        from kronfluence import Task as Base
    except ImportError:
        from source_fast.task import Task as Base

    if workload in ("cls", "cnn"):
        class ClassificationTask(Base):
            @staticmethod
            def _draw(logits):
                with torch.no_grad():
                    return torch.multinomial(F.softmax(logits.detach(), -1), 1).squeeze(-1)

            def compute_train_loss(self, batch, model, sample=False):
                x, y = batch
                logits = model(x)
                return F.cross_entropy(logits, self._draw(logits) if sample else y, reduction="sum")

            def compute_train_loss_pair(self, batch, model):  # source_fast's one-pass stage; same draws
                x, y = batch
                logits = model(x)
                return (F.cross_entropy(logits, self._draw(logits), reduction="sum"),
                        F.cross_entropy(logits, y, reduction="sum"))

            def compute_measurement(self, batch, model):
                x, y = batch
                return F.cross_entropy(model(x), y, reduction="sum")

        return ClassificationTask()

    class RegressionTask(Base):
        """Gaussian NLL with unit variance, summed: ½ Σ (y − f)² (constants dropped)."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            pred = model(x)
            return 0.5 * (pred - (self._draw(pred) if sample else y)).square().sum()

        def compute_train_loss_pair(self, batch, model):  # source_fast's one-pass stage; same draws
            x, y = batch
            pred = model(x)
            return 0.5 * (pred - self._draw(pred)).square().sum(), 0.5 * (pred - y).square().sum()

        @staticmethod
        def _draw(pred):
            with torch.no_grad():
                return pred.detach() + torch.randn_like(pred)

        def compute_measurement(self, batch, model):
            x, y = batch
            return 0.5 * (model(x) - y).square().sum()

    return RegressionTask()


def workload_sizes(workload: str, sizes: dict) -> dict:
    """n_train, n_query and the model's dims (widths, or ("cnn", image side)) of one workload."""
    if workload == "cnn":
        return {"n_train": sizes["cnn"]["n_train"], "n_query": sizes["cnn"]["n_query"],
                "dims": ("cnn", sizes["cnn"]["image"])}
    return {"n_train": sizes["n_train"], "n_query": sizes["n_query"], "dims": sizes[f"{workload}_dims"]}


def prepare_workload(workload: str, sizes: dict, path: Path):
    """Data from a random teacher, 3 epochs of SGD with momentum, 6 checkpoints; saved to `path`."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed({"cls": 0, "reg": 1, "cnn": 2}[workload])
    sizes = workload_sizes(workload, sizes)
    dims = sizes["dims"]
    n = sizes["n_train"] + sizes["n_query"]
    x = torch.randn(n, 3, dims[1], dims[1], generator=gen) if workload == "cnn" else torch.randn(n, dims[0],
                                                                                                  generator=gen)
    torch.manual_seed(100)
    teacher = build_model(dims)
    with torch.no_grad():
        out = teacher(x)
        y = out + 0.1 * torch.randn(out.shape, generator=gen) if workload == "reg" else out.argmax(-1)
    torch.manual_seed(200)
    model = build_model(dims)
    opt = torch.optim.SGD(model.parameters(), lr=LR[workload], momentum=MOMENTUM)
    n_train = sizes["n_train"]
    total = EPOCHS * ((n_train + TRAIN_BATCH - 1) // TRAIN_BATCH)
    every = max(1, total // NUM_CHECKPOINTS)
    ckpt_steps = [every * (k + 1) for k in range(NUM_CHECKPOINTS - 1)] + [total]
    checkpoints, step = [], 0
    for _ in range(EPOCHS):
        perm = torch.randperm(n_train, generator=gen)
        for start in range(0, n_train, TRAIN_BATCH):
            idx = perm[start:start + TRAIN_BATCH]
            pred = model(x[idx])
            loss = 0.5 * (pred - y[idx]).square().mean() if workload == "reg" else F.cross_entropy(pred, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step in ckpt_steps:
                checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    torch.save({"x": x, "y": y, "dims": dims, "n_train": n_train, "checkpoints": checkpoints, "steps": ckpt_steps,
                "lr": LR[workload]}, path)


def _datasets(blob, device="cpu"):
    from torch.utils.data import TensorDataset

    n = blob["n_train"]
    x, y = blob["x"].to(device), blob["y"].to(device)
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


# ------------------------------------------------------------------------------------ worker side
def worker(spec: dict) -> dict:
    """One (library, method, stage) in this fresh process. Returns seconds and peak RSS."""
    _process.set_threads(spec["threads"])
    import time

    import torch

    torch.set_num_threads(spec["threads"])
    blob = torch.load(spec["data"], weights_only=False)
    device = torch.device(spec.get("device", "cpu"))
    gpu = device.type == "cuda"
    train, query = _datasets(blob, device)
    task = make_task(spec["workload"])
    model = build_model(blob["dims"])
    model.load_state_dict(blob["checkpoints"][-1])
    model.to(device)

    def stop_clock():
        if gpu:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    if gpu:  # the data and model are resident already; the stage's own peak is what is measured
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    out_dir = Path(spec["out_dir"])
    bs, stage = spec["batch_size"], spec["stage"]

    if spec["library"] == "kronfluence":
        import warnings

        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

        warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp.GradScaler deprecation
        model = prepare_model(model, task)
        factor_args, score_args = FactorArguments(strategy="ekfac"), ScoreArguments()
        before, cpu0 = _process.rss_mib(), _process.cpu_seconds()
        t0 = time.perf_counter()
        analyzer = Analyzer("bench", model, task, cpu=not gpu, disable_tqdm=True, output_dir=str(out_dir))
        if stage == "fit":
            analyzer.fit_all_factors("ekfac", train, per_device_batch_size=bs, factor_args=factor_args,
                                     overwrite_output_dir=True)
        elif stage == "pairwise":
            analyzer.compute_pairwise_scores("pairwise", "ekfac", query, train,
                                             per_device_query_batch_size=len(query),
                                             per_device_train_batch_size=bs, score_args=score_args,
                                             overwrite_output_dir=True)
        else:
            analyzer.compute_self_scores("self", "ekfac", train, per_device_train_batch_size=bs,
                                         score_args=score_args, overwrite_output_dir=True)
        seconds = stop_clock() - t0
        backend = ""
    else:
        import source_fast as sf

        analyzer_class = sf.SourceAnalyzer  # imported before the clock starts, as Kronfluence's Analyzer is
        run = sf.TrainingRun(blob["checkpoints"], blob["steps"], lr=blob["lr"], momentum=MOMENTUM,
                             num_segments=NUM_SEGMENTS)
        if stage == ONE_PASS:  # from scratch: neither stored factors nor scores
            shutil.rmtree(out_dir / f"{spec['method']}_one_pass", ignore_errors=True)
        elif stage != "fit":  # stored scores of an earlier run would be resumed, not recomputed
            shutil.rmtree(out_dir / spec["method"] / "scores", ignore_errors=True)
        before, cpu0 = _process.rss_mib(), _process.cpu_seconds()
        t0 = time.perf_counter()
        folder = out_dir / (f"{spec['method']}_one_pass" if stage == ONE_PASS else spec["method"])
        analyzer = analyzer_class(model, task, run, output_dir=folder, method=spec["method"],
                                  batch_size=bs, progress=False, backend=spec["sf_backend"])
        if stage != ONE_PASS:
            analyzer.fit(train)  # for pairwise/self: reads the stored factors back (timed, like Kronfluence's load)
        if stage in ("pairwise", ONE_PASS):
            analyzer.pairwise_scores(query, train)
        elif stage == "self":
            analyzer.self_scores(train)
        seconds = stop_clock() - t0
        backend = _backends_used(spec["sf_backend"], device)
    return {"seconds": seconds, "cpu_seconds": _process.cpu_seconds() - cpu0, "peak_rss_mib": _process.rss_mib(),
            "rss_before_mib": before, "sf_backend": backend, "loadavg_1m": os.getloadavg()[0],
            "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if gpu else ""}


def _backends_used(requested, device) -> str:
    """Which source_fast backend each op ran on (fp32 inputs of the T = 1 shapes used here, on `device`; the
    covariance probe is wider than the narrow factors that go to torch on CPU, see _dispatch.slower_than_torch)."""
    import torch
    from source_fast import _dispatch

    a, g = torch.zeros(4, 1, 3, device=device), torch.zeros(4, 1, 2, device=device)
    v = torch.zeros(1, 2, 3, device=device)
    wide = torch.zeros(4, _dispatch.COVARIANCE_TORCH_MAX_D + 1, device=device)
    probes = {"covariance": {"x": wide}, "lambda_accum": {"a": a, "g": g},
              "kron_project": {"v": v}, "score_pairwise": {"v": v, "a": a, "g": g}, "score_self": {"a": a, "g": g}}
    used = []
    for op, tensors in probes.items():
        try:
            name = _dispatch.select(op, tensors, backend=requested)[0]
        except NotImplementedError:  # an explicit backend without this op: the analyzer would fail, too
            name = "n/a"
        used.append(f"{op}={name}")
    return " ".join(used)


# ------------------------------------------------------------------------------------ parent side
def _versions():
    import torch

    try:
        from importlib.metadata import version

        kf = version("kronfluence")
    except Exception:
        kf = "not installed"
    import _harness as H

    cpu = H.cpu_description()
    return {"torch_version": torch.__version__, "kronfluence_version": kf, "cpu_model": cpu,
            "source_fast_commit": _process.git_commit()}




def _device_names(device: str) -> tuple[str, str]:
    """(display name, file slug): ("CPU", "cpu") or the GPU's name, e.g. ("NVIDIA H200", "nvidia_h200")."""
    import _harness as H

    dev = H.pick_device(device)  # exits with a reason when CUDA is asked for and absent
    return ("CPU" if dev.type == "cpu" else H.device_name(dev)), H.device_slug(dev)


def _kronfluence_available() -> bool:
    probe = subprocess.run([sys.executable, "-c", "from kronfluence.analyzer import Analyzer, prepare_model"],
                           capture_output=True, text=True)
    return probe.returncode == 0


def _run_stage(spec: dict, timeout: float) -> dict:
    return _process.run_worker(__file__, spec, env=_process.worker_env(spec["threads"]), timeout=timeout,
                               what=f"stage {spec['library']}/{spec['method']}/{spec['stage']}")


def _fmt_table(rows):
    head = f"{'workload':8s} {'library':12s} {'method':10s} {'stage':9s} {'seconds':>9s} {'peak RSS MiB':>13s} " \
           f"{'Δ RSS MiB':>10s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        sec = f"{r['seconds']:9.2f}" if isinstance(r["seconds"], float) else f"{r['seconds']!s:>9s}"
        peak = f"{r['peak_rss_mib']:13.0f}" if isinstance(r["peak_rss_mib"], float) else f"{'-':>13s}"
        growth = f"{r['peak_rss_mib'] - r['rss_before_mib']:10.0f}" if isinstance(r["peak_rss_mib"], float) \
            else f"{'-':>10s}"
        lines.append(f"{r['workload']:8s} {r['library']:12s} {r['method']:10s} {r['stage']:9s} {sec} {peak} {growth}")
    return "\n".join(lines)


def _summary(rows):
    """Speed-ups against the issue's targets: influence ≥ 5× per stage; SOURCE (C=6) faster than KF influence."""
    def get(w, lib, method, stage):
        for r in rows:
            if (r["workload"], r["library"], r["method"], r["stage"]) == (w, lib, method, stage) \
                    and isinstance(r["seconds"], float):
                return r["seconds"]
        return None

    out = []
    for w in sorted({r["workload"] for r in rows}):
        for stage in STAGES:
            kf, inf, src = (get(w, "kronfluence", "influence", stage), get(w, "source_fast", "influence", stage),
                            get(w, "source_fast", "source", stage))
            if kf is None:
                continue
            parts = [f"{w} {stage:8s}: Kronfluence influence {kf:8.2f} s"]
            targeted = w in TARGET_WORKLOADS  # the issue's targets are for the MLP workloads
            if inf:
                verdict = f" {'OK' if kf / inf >= 5 else 'MISS'} target ≥5×" if targeted else ""
                parts.append(f"source_fast influence {inf:7.2f} s ({kf / inf:6.1f}×{verdict})")
            if src:
                verdict = f" {'OK' if src < kf else 'MISS'} target >1×" if targeted else ""
                parts.append(f"SOURCE C=6 {src:7.2f} s ({kf / src:5.2f}×{verdict})")
            out.append(" | ".join(parts))
        one = get(w, "source_fast", "source", ONE_PASS)
        kf = [get(w, "kronfluence", "influence", st) for st in ("fit", "pairwise")]
        src = [get(w, "source_fast", "source", st) for st in ("fit", "pairwise")]
        if one and None not in kf:
            two = f", SOURCE fit + pairwise as two stages {sum(src):.2f} s" if None not in src else ""
            out.append(f"{w} one pass: SOURCE C=6 fit + pairwise in one pass {one:.2f} s vs Kronfluence influence fit + "
                       f"pairwise {sum(kf):.2f} s ({sum(kf) / one:.2f}×){two}")
    return out


def _write(rows, out_dir: Path, summary, args):
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"vs_kronfluence_{args.device_slug}.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.3f}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    first = rows[0]
    seen = {}
    for r in rows:
        seen.setdefault(r["workload"], (r["n_train"], r["n_query"]))
    sizes_text = ", ".join(f"{w}: {n} train / {q} query examples" for w, (n, q) in seen.items())
    loads = [r["loadavg_1m"] for r in rows if isinstance(r["loadavg_1m"], float)] or [0.0]
    where = "all stages in one process (--in-process / --smoke: peak RSS is cumulative)" if args.in_process \
        or args.smoke else "every stage in a fresh process"
    md = [f"# source_fast vs Kronfluence {first['kronfluence_version']} on {args.device_name}",
          "",
          f"{args.device_name + ' (host: ' + first['cpu_model'] + ')' if args.device != 'cpu' else first['cpu_model']}, "
          f"{first['threads']} torch threads, torch {first['torch_version']}, source_fast "
          f"{first['source_fast_commit']} (backends: `{next((r['sf_backend'] for r in rows if r['sf_backend']), '?')}`), "
          f"{first['date']}. Batch size {first['batch_size']} for both libraries; {sizes_text}. One run each, {where} (peak RSS = that "
          f"process's VmHWM; Δ = growth during the stage, after imports and data loading). 1-minute load "
          f"average at the end of each stage {min(loads):.1f}–{max(loads):.1f} (the benchmark's own 2 threads "
          f"count ~2; more means other jobs shared the cores: compare with care). CSV: loadavg_1m, cpu_seconds "
          f"(the stage's user+sys CPU time).",
          "",
          f"Workloads: `cls` MLP {'→'.join(map(str, args.sizes['cls_dims']))} (cross-entropy), `reg` MLP "
          f"{'→'.join(map(str, args.sizes['reg_dims']))} (Gaussian NLL), `cnn` CNN on 3×{args.sizes['cnn']['image']}²"
          f" inputs (conv 3→16, pool, conv 16→32, pool, linear; cross-entropy; positions as tokens). "
          "`influence` = EK-FAC influence at the final checkpoint (true Fisher, heuristic damping) in both "
          "libraries; `source` = SOURCE with L=3 segments over C=6 checkpoints. Kronfluence runs with its default "
          "FactorArguments/ScoreArguments (fp32 gradients, fp64 eigendecomposition) and all queries in one query "
          "batch (a single pass over the training data, its fastest setting). `one_pass` = source_fast's "
          "`pairwise_scores` without `fit()`, from an empty folder: SOURCE's curvature and pairwise scores with one "
          "pass over the training data per checkpoint.",
          "",
          "| workload | library | method | stage | seconds | peak RSS (MiB) | Δ RSS (MiB) |",
          "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        if isinstance(r["seconds"], float):
            md.append(f"| {r['workload']} | {r['library']} | {r['method']} | {r['stage']} | {r['seconds']:.2f} | "
                      f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_before_mib']:.0f} |")
        else:
            md.append(f"| {r['workload']} | {r['library']} | {r['method']} | {r['stage']} | {r['status']} | | |")
    md += ["", "Against the targets (influence ≥ 5× faster than Kronfluence per stage; SOURCE C=6 faster than "
           "Kronfluence's single-checkpoint influence; set for the MLP workloads `cls` and `reg`, the others' ratios "
           "are shown without a verdict):", ""]
    md += [f"- {line}" for line in summary]
    if args.device != "cpu":
        md += ["", "Peak GPU memory of each stage (MiB, torch.cuda.max_memory_allocated): " + "; ".join(
            f"{r['workload']} {r['library']} {r['method']} {r['stage']} {r['peak_gpu_mib']:.0f}" for r in rows
            if isinstance(r.get("peak_gpu_mib"), float))]
    extra = f" --workloads {args.workloads}" if args.workloads != "cls,reg" else ""
    extra += f" --sf-backend {args.sf_backend}" if args.sf_backend else ""
    extra += f" --device {args.device}" if args.device != "cpu" else ""
    md += ["", f"Reproduce: `python benchmarks/bench_vs_kronfluence.py --threads {args.threads} "
           f"--batch-size {args.batch_size}{extra}`"]
    csv_path.with_suffix(".md").write_text("\n".join(md) + "\n")
    return csv_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both libraries (default 2)")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per batch, both libraries")
    parser.add_argument("--workloads", default="cls,reg", help="comma list of cls, reg, cnn (default cls,reg)")
    parser.add_argument("--libraries", default="kronfluence,source_fast", help="comma list")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds); for CI")
    parser.add_argument("--out-dir", default=None,
                        help="where the CSV/markdown go (default benchmarks/results; --smoke: none unless given)")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--sf-backend", default=None, choices=["cuda", "triton", "cpu", "torch"],
                        help="source_fast backend (default: automatic selection)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the stages in this process (no per-stage peak memory; default with --smoke)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per stage")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:k]: model, data and both libraries")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        return _process.answer(worker, args.worker)

    _process.set_threads(args.threads)
    sizes = SMOKE if args.smoke else FULL
    args.sizes = sizes
    args.device_name, args.device_slug = _device_names(args.device)
    libraries = [s.strip() for s in args.libraries.split(",") if s.strip()]
    has_kf = _kronfluence_available()
    in_process = args.in_process or args.smoke
    meta = _versions()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_vs_kf_") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
            data = work / f"{workload}.pt"
            prepare_workload(workload, sizes, data)
            own = workload_sizes(workload, sizes)
            for library, method in PLAN:
                if library not in libraries:
                    continue
                for stage in STAGES + ((ONE_PASS,) if (library, method) == ("source_fast", "source") else ()):
                    row = {"workload": workload, "library": library, "method": method, "stage": stage,
                           "threads": args.threads, "date": date, "n_train": own["n_train"],
                           "n_query": own["n_query"], "batch_size": args.batch_size, **meta,
                           "seconds": "", "cpu_seconds": "", "peak_rss_mib": "", "rss_before_mib": "",
                           "loadavg_1m": "", "sf_backend": "", "status": "ok", "device": args.device_name,
                           "peak_gpu_mib": ""}
                    if library == "kronfluence" and not has_kf:
                        row["status"] = "skipped (kronfluence not installed)"
                    else:
                        spec = {"workload": workload, "library": library, "method": method, "stage": stage,
                                "threads": args.threads, "batch_size": args.batch_size, "data": str(data),
                                "sf_backend": args.sf_backend, "device": args.device,
                                "out_dir": str(work / f"{workload}_{library}")}
                        row.update(worker(spec) if in_process else _run_stage(spec, args.timeout))
                    rows.append(row)
                    if isinstance(row["seconds"], float):
                        print(f"{workload:4s} {library:12s} {method:10s} {stage:9s} {row['seconds']:9.2f} s  "
                              f"peak {row['peak_rss_mib']:7.0f} MiB", flush=True)
                    else:
                        print(f"{workload:4s} {library:12s} {method:10s} {stage:9s} {row['status']}", flush=True)
    print()
    print(_fmt_table(rows))
    summary = _summary(rows)
    if summary:
        print()
        print("\n".join(summary))
    partial = ({w.strip() for w in args.workloads.split(",") if w.strip()} != {"cls", "reg"}
               or set(libraries) != {"kronfluence", "source_fast"})
    out_dir = args.out_dir if args.out_dir is not None else (None if args.smoke or partial else str(HERE / "results"))
    if out_dir is None and partial and not args.smoke:
        # The committed table is one full run: a subset must not replace it.
        print("\npartial run (a subset of workloads or libraries): results not written; pass --out-dir to keep them")
    if out_dir is not None:
        path = _write(rows, Path(out_dir), summary, args)
        print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
