"""Benchmark SourceAnalyzer.per_token_scores against pairwise_scores on the Bergson comparison's workload.

Workload (benchmarks/bench_vs_bergson.py's): a 2-block GPT-2 (n_embd 64, vocabulary 1,000) trained by SGD with
momentum, 6 checkpoints, SOURCE with 3 segments; 1,000 training documents of 30–40 tokens (padded to 40), 50
queries; the blocks' 8 Conv1D layers tracked, `sf.CausalLMTask`. The factors are fitted once (`fit`, timed
as its own stage); then, alternately, `pairwise_scores` (its own scoring pass per checkpoint after fit, as a user
who fitted first runs it) and `per_token_scores` (also one pass per checkpoint, each layer's per-token
contraction `score_per_token` on the rows as the layers see them), and both with `query_rank=8` (`--query-rank`; the
same factors) run `--repeats` times each. Peak memory is the process's peak RSS growth over a call (from its RSS at
the call, which holds the fit's freed heap). The output [50, 1000, 40] of per-token scores is 40× the pairwise
matrix.

Gate before timing: the per-token scores summed over positions equal the pairwise scores (relative max error
≤ 1e-4 in float32) and padded positions score exactly 0.

    python benchmarks/bench_per_token_scores.py --threads 2 --repeats 3    # full run (about a minute)
    python benchmarks/bench_per_token_scores.py --smoke                    # seconds; writes nothing

Results: benchmarks/results/per_token_scores_cpu.md and .json (full run only; the host's CPU is named inside).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _harness as H
import torch

import bench_vs_bergson as B

GATE_TOL = 1e-4


class Docs(torch.utils.data.Dataset):
    """Hugging Face-style items of the workload's right-padded documents."""

    def __init__(self, ids, lengths):
        self.ids = ids
        self.mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.ids[i].masked_fill(self.mask[i] == 0, -100)}


def _timed(fn, device):
    with H.PeakMemory(device) as peak:
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
    return out, seconds, peak.mib


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny workload, one repeat, nothing written")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--query-rank", type=int, default=8, help="the low-rank rows' query_rank (0: none)")
    parser.add_argument("--out-dir", type=Path, default=H.RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    import source_fast as sf

    sizes = B.SMOKE if args.smoke else B.FULL
    repeats = 1 if args.smoke else args.repeats
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as work:
        B.prepare_workload(sizes, Path(work), hf_checkpoints=False)
        blob = torch.load(Path(work) / "workload.pt", weights_only=False)
    n = blob["n_train"]
    train, query = Docs(blob["ids"][:n], blob["lengths"][:n]), Docs(blob["ids"][n:], blob["lengths"][n:])
    model = transformers.GPT2LMHeadModel(B.gpt2_config(sizes))
    model.load_state_dict(blob["checkpoints"][-1])
    run = sf.TrainingRun(blob["checkpoints"], blob["steps"], lr=blob["lr"], momentum=blob["momentum"],
                         num_segments=B.NUM_SEGMENTS)
    analyzer = sf.SourceAnalyzer(model, sf.CausalLMTask(B.tracked_modules(sizes)), run, batch_size=args.batch_size,
                                 progress=False)
    _, fit_s, fit_mib = _timed(lambda: analyzer.fit(train), device)

    pairwise = analyzer.pairwise_scores(query, train)
    per_token = analyzer.per_token_scores(query, train)
    error = ((per_token.sum(-1) - pairwise).abs().max() / pairwise.abs().max()).item()
    padded_zero = bool((per_token[:, train.mask == 0] == 0).all())
    ok = error <= GATE_TOL and padded_zero
    print(f"GATE per_token_scores torch float32: {'PASS' if ok else 'FAILED'} (sum over positions vs pairwise: "
          f"{error:.2e}, padded positions 0: {padded_zero})")
    if not ok:
        return 1

    calls = {"pairwise_scores": analyzer.pairwise_scores, "per_token_scores": analyzer.per_token_scores}
    if args.query_rank:  # the same fitted factors, directions truncated to rank R
        low = sf.SourceAnalyzer(model, sf.CausalLMTask(B.tracked_modules(sizes)), run, batch_size=args.batch_size,
                                progress=False, query_rank=args.query_rank)
        low.blocks, low._n_fit = analyzer.blocks, analyzer._n_fit
        calls[f"pairwise_scores, query_rank={args.query_rank}"] = low.pairwise_scores
        calls[f"per_token_scores, query_rank={args.query_rank}"] = low.per_token_scores
    times: dict[str, list[float]] = {name: [] for name in calls}
    peaks: dict[str, list[float]] = {name: [] for name in calls}
    results: dict[str, torch.Tensor] = {}
    for _ in range(repeats):  # alternating, so a change in the host's speed reaches every call
        for name, fn in calls.items():
            results[name], seconds, mib = _timed(lambda fn=fn: fn(query, train), device)
            times[name].append(seconds)
            peaks[name].append(mib)
    env = H.environment(device)
    rows = []
    for name in calls:
        exact = pairwise if name.startswith("pairwise") else per_token
        rows.append({"call": name, "median_s": statistics.median(times[name]), "runs_s": times[name],
                     "peak_rss_growth_mib": max(peaks[name]), "output_mib": results[name].numel() * 4 / 2**20,
                     "rel_max_error_vs_exact": ((results[name] - exact).abs().max() / exact.abs().max()).item()})
    ratio = rows[1]["median_s"] / rows[0]["median_s"]
    lines = [f"# per_token_scores vs pairwise_scores ({H.cpu_description()}, {args.threads} threads)", "",
             f"Workload: bench_vs_bergson's ({n} documents of {sizes['doc_len'][0]}–{sizes['doc_len'][1]} tokens, "
             f"{len(query)} queries, GPT-2 {sizes['n_layer']} blocks × {sizes['n_embd']}, 6 checkpoints, 3 "
             f"segments); fit once ({fit_s:.2f} s, peak +{fit_mib:.0f} MiB), then each call {repeats}× alternating. "
             f"Gate: sum over positions vs pairwise {error:.1e}.", "",
             "| call | median s | runs s | peak RSS growth MiB | output MiB | rel. max error vs exact |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['call']} | {r['median_s']:.2f} | {' / '.join(f'{t:.2f}' for t in r['runs_s'])} | "
                     f"{r['peak_rss_growth_mib']:.0f} | {r['output_mib']:.1f} | {r['rel_max_error_vs_exact']:.1e} |")
    lines += ["", f"per_token_scores / pairwise_scores: {ratio:.2f}×", "",
              "Peak RSS growth is measured from the process's RSS at the call, which still holds the heap the fit "
              "freed (glibc keeps it): 0 means the call fitted in it.", "",
              f"torch {env['torch']}, commit {env['git_commit']}, {env['timestamp']}, load {H.load1()}"]
    print("\n".join(lines))
    if args.smoke:
        print("SMOKE OK (nothing written)")
        return 0
    H.write_report(args.out_dir, "per_token_scores_cpu", lines, {
        "environment": env, "cpu": H.cpu_description(), "threads": args.threads, "fit_s": fit_s, "gate_error": error,
        "rows": rows, "ratio": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
