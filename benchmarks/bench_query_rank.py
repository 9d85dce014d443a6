"""Benchmark SourceAnalyzer(query_rank=R): scoring time and agreement with exact scores as R varies.

Workload: an MLP 1024 → 1024 → 1024 → 10 (ReLU, float32) trained by SGD on synthetic data (16,384 training
examples, 64 queries, batch 256), 3 checkpoints. Methods "influence" (the final checkpoint) and "source" (3
segments). The factors are fitted once per method; then `pairwise_scores` runs exact and with query_rank ∈ {8, 32,
128}, alternating, `--repeats` times each (each call makes its own scoring pass per checkpoint after fit). Agreement
with the exact scores: mean per-query Spearman correlation, mean top-10 overlap, and the relative max error.

With one token per example, an exact contraction costs Q·N·O·I multiply-adds per layer and a rank-R one
Q·N·R·(O + I) plus the truncation of each query's direction (`directions.truncated`), whose cost does not grow
with N: for these 1024-wide layers R = 32 contracts with 1/16 of the work.

Gate before timing: query_rank=1024 (≥ min(O, I) for every layer: exact) equals the exact scores (relative
1e-5), and the low-rank factors are what ops.score_lowrank receives.

    python benchmarks/bench_query_rank.py --threads 2 --repeats 3    # full run (a few minutes)
    python benchmarks/bench_query_rank.py --smoke                    # seconds; writes nothing

Results: benchmarks/results/query_rank_cpu.md and .json (full run only; the host's CPU is named inside).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _harness as H
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

FULL = {"width": 1024, "n_train": 16384, "n_query": 64, "batch": 256, "ranks": (8, 32, 128), "steps": 60}
SMOKE = {"width": 32, "n_train": 128, "n_query": 4, "batch": 32, "ranks": (2, 8), "steps": 6}
GATE_TOL = 1e-5


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def _train(sizes: dict):
    gen = torch.Generator().manual_seed(1)
    n = sizes["n_train"] + sizes["n_query"]
    x = torch.randn(n, sizes["width"], generator=gen)
    y = (x[:, :10].argmax(1) + (torch.rand(n, generator=gen) < 0.2).long()) % 10  # learnable, 20 % noise
    model = _model(sizes["width"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    every = sizes["steps"] // 3
    ckpts, steps = [], []
    for k in range(sizes["steps"]):
        idx = torch.randint(0, sizes["n_train"], (sizes["batch"],), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if (k + 1) % every == 0:
            ckpts.append({key: v.detach().clone() for key, v in model.state_dict().items()})
            steps.append(k + 1)
    data = TensorDataset(x, y)
    return model, ckpts, steps, Subset(data, range(sizes["n_train"])), Subset(data, range(sizes["n_train"], n))


def _agreement(scores: torch.Tensor, exact: torch.Tensor) -> dict:
    def ranks(x):
        return x.argsort(1).argsort(1).double()

    rs, re = ranks(scores), ranks(exact)
    rs, re = rs - rs.mean(1, keepdim=True), re - re.mean(1, keepdim=True)
    spearman = ((rs * re).sum(1) / (rs.norm(dim=1) * re.norm(dim=1))).mean().item()
    k = min(10, exact.shape[1])
    top = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(scores.topk(k, 1).indices,
                                                                       exact.topk(k, 1).indices)]
    return {"spearman": spearman, "top10": sum(top) / len(top),
            "rel_max_error": ((scores - exact).abs().max() / exact.abs().max()).item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny workload, one repeat, nothing written")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=H.RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import source_fast as sf
    from source_fast import ops

    sizes = SMOKE if args.smoke else FULL
    repeats = 1 if args.smoke else args.repeats
    model, ckpts, steps, train, query = _train(sizes)
    task = sf.ClassificationTask()
    rows, gate_ok = [], True
    for method in ("influence", "source"):
        run = sf.TrainingRun(ckpts, steps, lr=0.05, momentum=0.9, num_segments=3)
        analyzers = {rank: sf.SourceAnalyzer(model, task, run, method=method, batch_size=sizes["batch"],
                                             progress=False, query_rank=rank) for rank in (None, *sizes["ranks"])}
        t = time.perf_counter()
        analyzers[None].fit(train)
        fit_s = time.perf_counter() - t
        for rank, analyzer in analyzers.items():  # the same factors: fitted once
            analyzer.blocks, analyzer._n_fit = analyzers[None].blocks, analyzers[None]._n_fit
        exact = analyzers[None].pairwise_scores(query, train)
        full = sf.SourceAnalyzer(model, task, run, method=method, batch_size=sizes["batch"], progress=False,
                                 query_rank=sizes["width"])
        full.blocks, full._n_fit = analyzers[None].blocks, analyzers[None]._n_fit
        error = ((full.pairwise_scores(query, train) - exact).abs().max() / exact.abs().max()).item()
        seen = []
        real = ops.score_lowrank
        ops.score_lowrank = lambda u, w, a, g, **kw: seen.append(u.shape[2]) or real(u, w, a, g, **kw)
        try:
            low = analyzers[sizes["ranks"][0]].pairwise_scores(query, train)
        finally:
            ops.score_lowrank = real
        ok = error <= GATE_TOL and set(seen) == {sizes["ranks"][0]} and torch.isfinite(low).all()
        gate_ok &= bool(ok)
        print(f"GATE query_rank_{method} torch float32: {'PASS' if ok else 'FAILED'} (full rank vs exact {error:.1e}, "
              f"score_lowrank ranks {sorted(set(seen))})")
        times = {rank: [] for rank in analyzers}
        scores = {}
        for _ in range(repeats):  # alternating, so a change in the host's speed reaches every rank
            for rank, analyzer in analyzers.items():
                t = time.perf_counter()
                scores[rank] = analyzer.pairwise_scores(query, train)
                times[rank].append(time.perf_counter() - t)
        for rank in analyzers:
            rows.append({"method": method, "query_rank": rank or "exact", "median_s": statistics.median(times[rank]),
                         "runs_s": times[rank], "fit_s": fit_s, **_agreement(scores[rank], exact)})
    if not gate_ok:
        return 1
    env = H.environment(torch.device("cpu"))
    w = sizes["width"]
    lines = [f"# query_rank: pairwise scoring time and agreement ({H.cpu_description()}, {args.threads} threads)", "",
             f"MLP {w} → {w} → {w} → 10, {sizes['n_train']} training examples, {sizes['n_query']} queries, "
             f"3 checkpoints (SOURCE: 3 segments); factors fitted once per method; each call {repeats}× "
             "alternating; agreement against the exact scores.", "",
             "| method | query_rank | median s | runs s | Spearman | top-10 overlap | rel. max error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['query_rank']} | {r['median_s']:.2f} | "
                     f"{' / '.join(f'{t:.2f}' for t in r['runs_s'])} | {r['spearman']:.4f} | {r['top10']:.2f} | "
                     f"{r['rel_max_error']:.1e} |")
    lines += ["", f"torch {env['torch']}, commit {env['git_commit']}, {env['timestamp']}, load {H.load1()}"]
    print("\n".join(lines))
    if args.smoke:
        print("SMOKE OK (nothing written)")
        return 0
    H.write_report(args.out_dir, "query_rank_cpu", lines, {"environment": env, "cpu": H.cpu_description(),
                                                          "threads": args.threads, "sizes": sizes, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
