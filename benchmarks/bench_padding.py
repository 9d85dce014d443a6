"""Padded batches: SOURCE with the rows of padded token positions cut (the default) against kept whole
(SOURCE_FAST_CUT_PADDING=0).

Documents padded to a fixed length (a tokenizer's ``padding="max_length"``) carry token positions that the
attention mask removes from every example of a batch. source_fast cuts those positions from a layer's rows
when its g is exactly zero there (`source_fast.modules._padding_windows`; the scores do not change, see
tests/test_token_window.py), so the covariance, eigen-correction and scoring kernels and the kept rows see
only the batch's real span. The model's own passes still run over the padded length.

Workload: a GPT-2 from a config (2 blocks, n_embd 64, vocabulary 1,000, context 64, random init), 512
training documents of 30–40 tokens right-padded to 64, 20 queries, 4 checkpoints in L = 2 segments (SGD
steps of small random perturbations: the timing does not depend on the training), sf.CausalLMTask over the 8
Conv1D layers, `pairwise_scores` without `fit()` (one pass per checkpoint, sampled Fisher), batch size 64.
Each mode runs in a fresh process (--repeats times, alternating); wall time of `pairwise_scores` and the
process's peak RSS (VmHWM).

    python benchmarks/bench_padding.py --threads 2 --repeats 3   # writes results/padding_cpu.{csv,md}
    python benchmarks/bench_padding.py --smoke                   # seconds; writes nothing
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import platform
import statistics
import sys
import time
from pathlib import Path

import _harness
import _process

HERE = Path(__file__).resolve().parent
FULL = {"n_train": 512, "n_query": 20, "context": 64, "doc_len": (30, 40), "n_embd": 64, "n_layer": 2,
        "vocab": 1000, "checkpoints": 4, "batch": 64}
SMOKE = {"n_train": 24, "n_query": 3, "context": 16, "doc_len": (4, 6), "n_embd": 8, "n_layer": 1,
         "vocab": 50, "checkpoints": 2, "batch": 8}
MODES = ("cut", "whole")


def worker(spec: dict) -> dict:
    _process.set_threads(spec["threads"])
    import torch
    import transformers
    from torch.utils.data import Dataset, Subset

    import source_fast as sf

    torch.set_num_threads(spec["threads"])
    sizes = spec["sizes"]
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=sizes["vocab"], n_positions=sizes["context"],
                                     n_embd=sizes["n_embd"], n_layer=sizes["n_layer"], n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(0)
    n = sizes["n_train"] + sizes["n_query"]
    ids = torch.randint(0, sizes["vocab"], (n, sizes["context"]), generator=gen)
    lengths = torch.randint(sizes["doc_len"][0], sizes["doc_len"][1] + 1, (n,), generator=gen)
    mask = (torch.arange(sizes["context"])[None, :] < lengths[:, None]).long()

    class Docs(Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": mask[i]}

    docs = Docs()
    train, query = Subset(docs, range(sizes["n_train"])), Subset(docs, range(sizes["n_train"], n))
    checkpoints = []
    for _ in range(sizes["checkpoints"]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    run = sf.TrainingRun(checkpoints, [10 * (k + 1) for k in range(len(checkpoints))], lr=0.01, num_segments=2)
    names = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    analyzer = sf.SourceAnalyzer(model, sf.CausalLMTask(names), run, batch_size=sizes["batch"], progress=False)
    start = time.perf_counter()
    scores = analyzer.pairwise_scores(query, train)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": _process.rss_mib(), "score_abs_sum": float(scores.abs().sum()),
            "valid_fraction": float(mask[:sizes["n_train"]].float().mean()), "torch": torch.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _process.answer(worker, args.worker)
    sizes = SMOKE if args.smoke else FULL
    repeats = 1 if args.smoke else args.repeats
    results = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            spec = {"mode": mode, "threads": args.threads, "sizes": sizes}
            env = _process.worker_env(args.threads, SOURCE_FAST_CUT_PADDING="1" if mode == "cut" else "0")
            res = _process.run_worker(__file__, spec, env=env, timeout=900)
            results[mode].append(res)
            print(f"{mode:5s}  {res['seconds']:6.2f} s  peak RSS {res['peak_rss_mib']:7.0f} MiB  "
                  f"|scores| {res['score_abs_sum']:.6g}", flush=True)
    sums = {results[m][0]["score_abs_sum"] for m in MODES}
    agree = max(sums) - min(sums) <= 1e-5 * max(sums)
    med = {m: statistics.median(r["seconds"] for r in results[m]) for m in MODES}
    rss = {m: statistics.median(r["peak_rss_mib"] for r in results[m]) for m in MODES}
    valid = results["cut"][0]["valid_fraction"]
    print(f"\nreal tokens {valid:.0%} of the padded length; scores agree: {agree}")
    print(f"cut: {med['cut']:.2f} s, {rss['cut']:.0f} MiB; whole: {med['whole']:.2f} s, {rss['whole']:.0f} MiB; "
          f"{med['whole'] / med['cut']:.2f}× faster, {rss['cut'] / rss['whole']:.2f}× the peak memory")
    if not agree:
        print("FAILED: the two modes' scores differ", file=sys.stderr)
        return 1
    if args.smoke:
        print("SMOKE: tiny sizes, timings are not measurements; nothing written")
        return 0
    from source_fast.io import atomic_write_bytes

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    meta = {"timestamp": stamp, "git_commit": _process.git_commit(), "machine": platform.processor() or platform.machine(),
            "cpu_model": _harness.cpu_model(), "threads": args.threads, "torch": results["cut"][0]["torch"],
            "python": platform.python_version()}
    rows = [{"mode": m, "run": k + 1, "seconds": f"{r['seconds']:.3f}", "peak_rss_mib": f"{r['peak_rss_mib']:.0f}", **meta}
            for m in MODES for k, r in enumerate(results[m])]
    atomic_write_bytes(out / "padding_cpu.csv", _csv_text(rows).encode())
    md = [f"# Padded batches: rows cut vs kept whole ({meta['cpu_model']}, {args.threads} threads, torch "
          f"{meta['torch']}, {stamp}, commit {meta['git_commit']})", "",
          f"Workload: {FULL['n_train']} documents of {FULL['doc_len'][0]}–{FULL['doc_len'][1]} tokens padded to "
          f"{FULL['context']} (real tokens {valid:.0%}), {FULL['n_query']} queries, GPT-2 2×64, "
          f"{FULL['checkpoints']} checkpoints, L = 2, one-pass `pairwise_scores`; median of {repeats} fresh "
          "processes per mode.", "",
          "| mode | seconds (median) | all runs | peak RSS MiB (median) |", "|---|---:|---|---:|"]
    for m in MODES:
        runs = ", ".join(f"{r['seconds']:.2f}" for r in results[m])
        md.append(f"| {m} | {med[m]:.2f} | {runs} | {rss[m]:.0f} |")
    md += ["", f"Scores agree between the modes: {agree}.", "",
           f"Reproduce: `python benchmarks/bench_padding.py --threads {args.threads} --repeats {repeats}`"]
    atomic_write_bytes(out / "padding_cpu.md", ("\n".join(md) + "\n").encode())
    print(f"wrote {out / 'padding_cpu.csv'} and {out / 'padding_cpu.md'}")
    return 0


def _csv_text(rows: list[dict]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
