"""Bring the files of a GPU check (scripts/gpu_check.sh's $OUT) into benchmarks/results/ in one step.

A lent GPU is short-lived and its results come back as a folder of files; this turns them into the
committed tables without hand-editing:

  ops_gpu.csv             upserted into results/ops_<gpu>.csv (same key: the row is replaced), then
                          results/ops_<gpu>.md is re-rendered (with the roofline columns)
  roofline.json           copied to results/roofline_<gpu>.json
  vs_kronfluence_*.csv/md copied to results/ (E2E=1 runs)
  env.txt, gpu_tests.log  their pass/fail lines are printed (nothing is copied: the note on the issue
                          and the README record them)

<gpu> is the slug of the device name in the CSV rows ("NVIDIA H200" -> nvidia_h200). With --dispatch,
source_fast/_measured_gpu.py is regenerated from that device's merged CSV (make_dispatch_table.py).

    python benchmarks/import_gpu_results.py /path/to/files_at            # merge, render, print a summary
    python benchmarks/import_gpu_results.py /path/to/files_at --dispatch # and regenerate the dispatch table
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import _harness as H
import make_dispatch_table

HERE = Path(__file__).resolve().parent


def import_results(folder: Path, results: Path = H.RESULTS_DIR, *, dispatch: bool = False,
                   dispatch_target: Path | None = None) -> dict:
    """Merge a GPU check's folder into `results`; returns what was done (paths, row counts, slug)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"{folder} is not a folder (expected scripts/gpu_check.sh's $OUT)")
    done: dict = {"copied": []}
    ops = folder / "ops_gpu.csv"
    rows = H.read_csv(ops)
    names = sorted({r["device_name"] for r in rows if r["device_name"]})
    if len(names) > 1:
        raise SystemExit(f"{ops} mixes devices {names}: import one device at a time")
    device = names[0] if names else None
    if device is None:  # no benchmark rows: the roofline alone cannot name the device
        roof = folder / "roofline.json"
        if roof.exists():
            import json

            device = json.loads(roof.read_text()).get("device_name")
    if device is None:
        raise SystemExit(f"{folder} has neither benchmark rows nor a roofline naming the device")
    done["slug"] = gpu = H.name_slug(device)
    results.mkdir(parents=True, exist_ok=True)
    if rows:
        target = results / f"ops_{gpu}.csv"
        before = len(H.read_csv(target))
        merged = H.upsert_csv(target, rows)
        done.update(csv=target, rows_in=len(rows), rows_before=before, rows_after=len(merged))
    roof = folder / "roofline.json"
    if roof.exists():
        dst = results / f"roofline_{gpu}.json"
        shutil.copyfile(roof, dst)
        done["copied"].append(dst)
    for path in sorted(folder.glob("vs_kronfluence_*")):
        dst = results / path.name
        shutil.copyfile(path, dst)
        done["copied"].append(dst)
    if rows:
        done["md"] = H.render_markdown(done["csv"])  # after the roofline: the % roof columns need it
        if dispatch:
            argv = [str(done["csv"])] + (["--out", str(dispatch_target)] if dispatch_target else [])
            make_dispatch_table.main(argv)
            done["dispatch"] = dispatch_target or make_dispatch_table.TARGET
    for log in ("gpu_tests.log",):
        path = folder / log
        if path.exists():
            lines = [ln for ln in path.read_text(errors="replace").splitlines()
                     if re.search(r"\b(passed|failed|error)\b", ln)]
            done[log] = lines[-4:]
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="the GPU check's output folder (files_at of the device call)")
    p.add_argument("--results", type=Path, default=H.RESULTS_DIR, help="benchmarks/results by default")
    p.add_argument("--dispatch", action="store_true", help="regenerate source_fast/_measured_gpu.py from it")
    args = p.parse_args(argv)
    done = import_results(args.folder, args.results, dispatch=args.dispatch)
    print(f"device slug: {done['slug']}")
    if "csv" in done:
        print(f"{done['csv']}: {done['rows_in']} rows imported ({done['rows_before']} -> {done['rows_after']} rows); "
              f"rendered {done['md']}")
    for path in done["copied"]:
        print(f"copied {path}")
    if "dispatch" in done:
        print(f"regenerated {done['dispatch']}")
    for line in done.get("gpu_tests.log", []):
        print(f"gpu tests: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
