"""What a cohort costs beyond the network: condiff-infer on many small cases, fresh and resumed.

Writes N one-slice volumes (distinct bytes, so distinct noise) and runs ``condiff-infer`` on them
twice in fresh processes with the cheapest network work (1 member, 1 DDPM step by default): the
first run is almost all per-case overhead (discovery, hashing, reading, preprocessing, writing
maps, restorations, overlays, records, the tables), the second is a resume that must skip every
case. Reports seconds per case for both, and the run's own split of its time (``run.json``
``timings_s``), as JSON and Markdown.

    python bench/cohort.py --cases 400 --out bench/results/cohort-cpu-DATE          # ~20 s on 2 cores
    python bench/cohort.py --cases 3 --out /tmp/cohort                              # seconds (tests/bench)

Wall times include each process's start (~1.5 s: imports, model load), amortised over the cases.
A leftover OUT/work (an earlier ``--keep-work`` or failed run) is removed first, so the first run is
always fresh; when the counts are not N done then N skipped, no report is written and the exit status is 1.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from machine import machine_info, versions  # noqa: E402


def write_cases(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` one-slice volumes cut from the bundled healthy scan, each scaled by its own factor."""
    import nibabel as nib

    src = nib.load(str(REPO / "examples" / "scans" / "ixi132_t1.nii.gz"))
    data = np.asarray(src.get_fdata(dtype=np.float32))
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        k = i % data.shape[1]  # the slab's slices run along axis 1
        one = data[:, k:k + 1, :] * np.float32(1 + 0.01 * rng.standard_normal())
        path = folder / f"sub-{i:04d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(one, src.affine), str(path))
        paths.append(path)
    return paths


def run_infer(scans: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "condiff.engine.cli", str(scans), "-o", str(out), "--no-progress", "-q", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"condiff-infer failed ({proc.returncode}): {proc.stderr[-2000:]}")
    run = json.loads((out / "run.json").read_text())
    return {"command": " ".join(cmd), "wall_s": wall, "counts": run["counts"], "timings_s": run["timings_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=400)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--members", default="1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep-work", action="store_true",
                    help="keep OUT/work (the generated cases and their outputs); the next run removes it first")
    args = ap.parse_args(argv)
    import torch

    work = args.out / "work"  # derived data: removed after the run unless --keep-work
    if work.exists():  # outputs left there would turn the fresh run into a resume
        print(f"removing the leftover {work} (an earlier run's cases and outputs), so the first run is fresh",
              file=sys.stderr, flush=True)
        shutil.rmtree(work)
    scans = work / "scans"
    write_cases(scans, args.cases)
    extra = ["--steps", str(args.steps), "--members", args.members, "--device", args.device]
    fresh = run_infer(scans, work / "out", extra)
    resumed = run_infer(scans, work / "out", extra)
    n = args.cases
    if fresh["counts"].get("ok") != n or resumed["counts"].get("skipped") != n:  # before anything is written
        raise SystemExit(f"expected {n} done then {n} skipped, got {fresh['counts']} and {resumed['counts']}; "
                         f"no report written (cases and outputs kept in {work})")
    report = {
        "benchmark": "cohort", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]), "machine": machine_info(torch.device(args.device)),
        "versions": versions(), "cases": n, "steps": args.steps, "members": args.members,
        "fresh": {**fresh, "s_per_case": fresh["wall_s"] / n}, "resumed": {**resumed, "s_per_case": resumed["wall_s"] / n},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cohort.json").write_text(json.dumps(report, indent=1) + "\n")
    t = fresh["timings_s"]
    md = [f"# condiff-infer on {n} one-slice cases ({args.steps} step, members {args.members}, {args.device})", "",
          f"{report['date']}, {report['machine']['cpu']} ({report['machine']['cpu_count']} cores), "
          f"torch {report['versions'].get('torch')}", "", "| run | wall s | s per case | cases done / skipped |",
          "|---|---|---|---|",
          f"| fresh | {fresh['wall_s']:.2f} | {fresh['wall_s'] / n:.4f} | {fresh['counts'].get('ok', 0)} / "
          f"{fresh['counts'].get('skipped', 0)} |",
          f"| resumed | {resumed['wall_s']:.2f} | {resumed['wall_s'] / n:.4f} | {resumed['counts'].get('ok', 0)} / "
          f"{resumed['counts'].get('skipped', 0)} |", "",
          "Fresh run's own split (run.json, s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(t.items())), "",
          f"Command: `{report['command']}`", ""]
    (args.out / "cohort.md").write_text("\n".join(md))
    print("\n".join(md))
    if not args.keep_work:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
