"""A depthwise-separable CNN end to end on CPU: source_fast's stages with a depthwise layer's groups handled from
the layer input (the default) against the same build building every group's patch rows (`--forms both`), and the
model in PyTorch's default (contiguous, NCHW) or channels-last memory format (`--layouts both`; the model's own
passes run faster in channels-last on CPU), each stage in a fresh process, the variants alternating.

Workload (seeded, no downloads): conv 3→32 (3×3), then three blocks of a 3×3 depthwise conv (32, 64, 128
channels) and a 1×1 pointwise conv (32→64, 64→128, 128→128) with ReLUs and 2×2 max-pools between, a global average
pool and a linear 128→10: 229 tracked layers (each depthwise channel is its own EK-FAC block, "<name>[k]").
1,000 random 3×32×32 images with random labels, 20 queries; the checkpoints are random perturbations of one seeded
model (this measures time, not attribution quality). Stages: influence fit / pairwise / self at one checkpoint,
and SOURCE (4 checkpoints, 2 segments) pairwise scores from an empty folder in one pass per checkpoint.

Kronfluence is not compared here: it approximates a grouped convolution (inputs averaged over groups), so the two
would not compute the same curvature.

    python benchmarks/bench_depthwise_cnn.py                       # both forms, 2 alternating repeats
    python benchmarks/bench_depthwise_cnn.py --forms input --layouts both
    python benchmarks/bench_depthwise_cnn.py --smoke               # CI: tiny sizes, one repeat
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import _process

HERE = Path(__file__).resolve().parent
STAGES = ("influence_fit", "influence_pairwise", "influence_self", "source_one_pass")
FORMS = {"input": "from the layer input (default)", "patch_rows": "every group's patch rows"}
LAYOUTS = {"contiguous": "torch.contiguous_format", "channels_last": "torch.channels_last"}


def build_model(widths=(32, 64, 128)):
    from torch import nn

    layers, c = [nn.Conv2d(3, widths[0], 3, padding=1), nn.ReLU()], widths[0]
    for k, w in enumerate(widths):
        out = widths[k + 1] if k + 1 < len(widths) else w
        layers += [nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU(), nn.Conv2d(c, out, 1), nn.ReLU()]
        if k + 1 < len(widths):
            layers.append(nn.MaxPool2d(2))
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers)


def worker(spec: dict) -> dict:
    _process.set_threads(spec["threads"])
    import time

    import torch

    import source_fast as sf

    torch.set_num_threads(spec["threads"])
    if spec["form"] == "patch_rows":  # the same build, every group's patch rows built (the behaviour before)
        sf.modules.Capture._one_channel_forms_apply = lambda *args: False
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model(tuple(spec["widths"])).to(memory_format=getattr(torch, spec.get("layout", "contiguous")
                                                                          .replace("contiguous", "contiguous_format")))
    n, q, side = spec["n_train"], spec["n_query"], spec["side"]
    x, y = torch.randn(n, 3, side, side, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    train = torch.utils.data.TensorDataset(x, y)
    query = torch.utils.data.TensorDataset(x[:q], y[:q])
    states = []
    with torch.no_grad():
        for _ in range(4):
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    out_dir = Path(spec["out_dir"])
    task = sf.ClassificationTask()
    before = _process.rss_mib()
    t0 = time.perf_counter()
    if spec["stage"] == "source_one_pass":
        run = sf.TrainingRun(states, [10, 20, 30, 40], lr=0.1, num_segments=2)
        shutil.rmtree(out_dir / "source", ignore_errors=True)
        analyzer = sf.SourceAnalyzer(model, task, run, output_dir=out_dir / "source", batch_size=spec["batch_size"],
                                     progress=False)
        scores = analyzer.pairwise_scores(query, train)
    else:
        run = sf.TrainingRun(states[-1:], [40], lr=0.1, num_segments=1)
        folder = out_dir / "influence"
        if spec["stage"] == "influence_fit":
            shutil.rmtree(folder, ignore_errors=True)
        else:
            shutil.rmtree(folder / "scores", ignore_errors=True)
        analyzer = sf.SourceAnalyzer(model, task, run, output_dir=folder, method="influence",
                                     batch_size=spec["batch_size"], progress=False)
        analyzer.fit(train)  # pairwise/self: reads the stored factors back (timed)
        scores = None
        if spec["stage"] == "influence_pairwise":
            scores = analyzer.pairwise_scores(query, train)
        elif spec["stage"] == "influence_self":
            scores = analyzer.self_scores(train)
    seconds = time.perf_counter() - t0
    if scores is not None:  # for the agreement of the two forms (not timed)
        torch.save(scores, spec["scores_path"])
    return {"seconds": seconds, "peak_rss_mib": _process.rss_mib(), "rss_before_mib": before,
            "layers": len(analyzer.layers)}


def _agreement(work: Path, variants: list[str]) -> dict[str, float]:
    """Per scoring stage, max |difference| / max |score| between the scores of each variant and the first one's
    (all float32)."""
    import torch

    out = {}
    for stage in STAGES[1:]:
        first = torch.load(work / f"{stage}_{variants[0]}.pt")
        for variant in variants[1:]:
            other = torch.load(work / f"{stage}_{variant}.pt")
            out[f"{stage} {variant}"] = float((other - first).abs().max() / first.abs().max())
    return out


def _variant_name(form: str, layout: str) -> str:
    return f"{form}-{layout}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forms", default="both", choices=["both", *FORMS], help="which handling of depthwise groups")
    p.add_argument("--layouts", default="contiguous", choices=["both", *LAYOUTS],
                   help="the model's memory format (default contiguous)")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats per stage (medians reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    p.add_argument("--out-dir", default=str(HERE / "results"), help="where depthwise_cnn_cpu.{csv,md} go")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _process.answer(worker, args.worker)
    sizes = ({"n_train": 24, "n_query": 3, "side": 8, "widths": [4, 8, 8]} if args.smoke else
             {"n_train": 1000, "n_query": 20, "side": 32, "widths": [32, 64, 128]})
    forms = list(FORMS) if args.forms == "both" else [args.forms]
    layouts = list(LAYOUTS) if args.layouts == "both" else [args.layouts]
    variants = [(form, layout) for layout in layouts for form in forms]
    variant_names = [_variant_name(form, layout) for form, layout in variants]
    repeats = 1 if args.smoke else args.repeats
    times: dict[tuple[str, str], list[dict]] = {}
    work = Path(tempfile.mkdtemp(prefix="bench_depthwise_"))
    try:
        for stage in STAGES:
            for _ in range(repeats):
                for (form, layout), name in zip(variants, variant_names):  # alternating: same stretch of host load
                    spec = {"stage": stage, "form": form, "layout": layout, "threads": args.threads,
                            "batch_size": args.batch_size, "out_dir": str(work / name),
                            "scores_path": str(work / f"{stage}_{name}.pt"), **sizes}
                    if stage in ("influence_pairwise", "influence_self") and not (work / name / "influence").exists():
                        _process.run_worker(__file__, dict(spec, stage="influence_fit"),
                                            env=_process.worker_env(args.threads), what="influence fit")
                    res = _process.run_worker(__file__, spec, env=_process.worker_env(args.threads),
                                              what=f"{stage} ({name})")
                    times.setdefault((stage, form, layout), []).append(res)
                    print(f"  {stage:20s} {name:26s} {res['seconds']:7.2f} s  peak RSS {res['peak_rss_mib']:6.0f} "
                          "MiB", flush=True)
        agreement = _agreement(work, variant_names)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    import _harness as H

    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for (stage, form, layout), runs in times.items():
        rows.append({"stage": stage, "form": form, "layout": layout, "median_s": round(statistics.median(r["seconds"] for r in runs), 3),
                     "runs_s": " ".join(f"{r['seconds']:.2f}" for r in runs),
                     "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs)), "layers": runs[0]["layers"],
                     "threads": args.threads, "cpu": H.cpu_description(), "torch": H.torch.__version__,
                     "source_fast_commit": H.git_commit(), "date": date})
    lines = [f"| {r['stage']} | {r['form']} | {r['layout']} | {r['median_s']:.2f} | {r['runs_s']} | "
             f"{r['peak_rss_mib']} |" for r in rows]
    table = "\n".join(["| stage | depthwise groups | model layout | median s | runs (s) | peak RSS (MiB) |",
                       "|---|---|---|---:|---|---:|", *lines])
    if agreement:
        table += (f"\n\nScores against {variant_names[0]}'s, max |difference| / max |score|: "
                  + ", ".join(f"{key} {value:.1e}" for key, value in agreement.items()))
    print("\n" + table)
    for stage in STAGES:
        base = statistics.median(r["seconds"] for r in times[(stage, *variants[0])])
        for variant, name in zip(variants[1:], variant_names[1:]):
            other = statistics.median(r["seconds"] for r in times[(stage, *variant)])
            print(f"{stage:20s} {variant_names[0]} {base:6.2f} s, {name} {other:6.2f} s: {base / other:4.2f}x")
    if args.smoke:
        print("SMOKE OK")
        return 0
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import csv

    with open(out / "depthwise_cnn_cpu.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out / "depthwise_cnn_cpu.csv.tmp", out / "depthwise_cnn_cpu.csv")
    head = (f"# Depthwise-separable CNN on CPU\n\n{rows[0]['cpu']}, {args.threads} torch threads, torch "
            f"{rows[0]['torch']}, source_fast {rows[0]['source_fast_commit']}, {date}. "
            f"{sizes['n_train']} train / {sizes['n_query']} query images of 3×{sizes['side']}², batch "
            f"{args.batch_size}, {rows[0]['layers']} tracked layers; every stage in a fresh process, the forms "
            f"alternating, {repeats} repeat(s). Command: `python benchmarks/bench_depthwise_cnn.py"
            f"{'' if args.forms == 'both' else ' --forms ' + args.forms}"
            f"{'' if args.layouts == 'contiguous' else ' --layouts ' + args.layouts} --repeats {repeats}`.\n\n")
    (out / "depthwise_cnn_cpu.md.tmp").write_text(head + table + "\n")
    os.replace(out / "depthwise_cnn_cpu.md.tmp", out / "depthwise_cnn_cpu.md")
    print(f"wrote {out / 'depthwise_cnn_cpu.csv'} and {out / 'depthwise_cnn_cpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
