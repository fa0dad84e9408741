"""Long training in GPU chunks: stage the state, collect what a chunk returns, report healing over time.

    python bench/train_chunks.py stage RUN                 # runs/RUN/pieces -> .carry/train-state/RUN (+ budget check)
    python bench/train_chunks.py collect RUN FILES_AT      # a chunk's returned files -> runs/RUN, and a record
    python bench/train_chunks.py report NAME=METRICS.jsonl [...] --out DIR [--title T]

``bench/gpu_train.sh`` runs one chunk on the device. ``collect`` verifies the pieces' SHA-256, unpacks them
into a temporary place and checks the chunk against the run's record (it must start where the last recorded
chunk ended, or at 0 for a new run, and train at least one step) before it keeps them as the state the next
chunk resumes from (``runs/RUN/pieces``) and unpacks the model and the metrics log; then it appends the
chunk (steps, device minutes, healing metric at its last validation) to
``bench/results/training-chunks/RUN.jsonl`` and ``RUN.md``. A refused chunk leaves the previous state as
it was. ``stage`` refuses a run whose record says it has trained (steps_after > 0) when no state is there
to resume from (restore it from git first: ``bench/results/ARCHIVED.md``), and a state whose step is not
the last recorded one. ``report`` turns metrics logs (one per run,
e.g. two recipes) into the healing metric over training time: JSON, Markdown and a PNG.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from condiff.modelset import sha256_file as sha256

REPO = Path(__file__).resolve().parents[1]
TRAVEL_LIMIT = 64 * 2**20   # the device tool's working-tree limit
RESULTS = REPO / "bench" / "results" / "training-chunks"


def check_sums(folder: Path, names: list[str] | None = None) -> None:
    """Every file SHA256SUMS lists (or only ``names``) matches; raise naming the first that does not."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise SystemExit(f"{sums}: missing (was the chunk's output complete?)")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        name = name.lstrip("*")
        if names is not None and name not in names:
            continue
        if not (folder / name).is_file():
            raise SystemExit(f"{folder / name}: listed in SHA256SUMS but missing")
        if sha256(folder / name) != digest:
            raise SystemExit(f"{folder / name}: SHA-256 differs from SHA256SUMS (truncated or corrupted transfer)")


def travelling_bytes(repo: Path = REPO) -> int:
    """What a device call sends: tracked + untracked-not-ignored files, plus .carry."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True, check=True)
    total = sum((repo / p).stat().st_size for p in out.stdout.decode().split("\0") if p and (repo / p).is_file())
    carry = repo / ".carry"
    if carry.is_dir():
        total += sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    return total


def recorded_chunks(run: str, results: Path = RESULTS) -> list[dict]:
    """The chunks ``collect`` recorded for ``run`` (oldest first)."""
    log = results / f"{run}.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []


def pieces_chunk(pieces: list[Path]) -> dict:
    """chunk.json of a state cut into ``pieces``, read from the joined stream (gpu_train.sh packs it first)."""
    class Joined:  # the pieces as one file object, read in order
        def __init__(self, paths):
            self.files = iter(paths)
            self.cur = None

        def read(self, n=-1):
            out = b""
            while n < 0 or len(out) < n:
                if self.cur is None:
                    nxt = next(self.files, None)
                    if nxt is None:
                        break
                    self.cur = open(nxt, "rb")
                chunk = self.cur.read(-1 if n < 0 else n - len(out))
                if not chunk:
                    self.cur.close()
                    self.cur = None
                    continue
                out += chunk
            return out

    try:
        with tarfile.open(fileobj=Joined(pieces), mode="r|gz") as tar:
            for member in tar:
                if member.name.lstrip("./") == "chunk.json":
                    return json.loads(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{pieces[0].parent}: the state's pieces do not unpack ({exc})") from exc
    raise SystemExit(f"{pieces[0].parent}: the state has no chunk.json")


def stage(run: str, runs_dir: Path, repo: Path = REPO, results: Path = RESULTS) -> Path:
    pieces = sorted((runs_dir / run / "pieces").glob("state.tgz.part*"))
    dest = repo / ".carry" / "train-state" / run
    recorded = recorded_chunks(run, results)
    last = recorded[-1]["steps_after"] if recorded else 0
    if not pieces:
        if last > 0:
            raise SystemExit(
                f"{runs_dir / run / 'pieces'}: no state, but {results / (run + '.jsonl')} records {run} at step "
                f"{last}: a chunk would start from scratch. Restore the state from git first "
                f"(bench/results/ARCHIVED.md), or train under a new run name")
        shutil.rmtree(dest, ignore_errors=True)
        print(f"{runs_dir / run / 'pieces'}: no state yet, the first chunk starts from scratch")
        return dest
    at = pieces_chunk(pieces).get("steps_after")
    if at != last:
        raise SystemExit(f"{runs_dir / run / 'pieces'}: the state is at step {at}, but {results / (run + '.jsonl')} "
                         f"records {run} at step {last}: stage the last recorded state (bench/results/ARCHIVED.md)")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    lines = []
    for p in pieces:
        shutil.copy2(p, dest / p.name)
        lines.append(f"{sha256(p)}  {p.name}")
    (dest / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    total = travelling_bytes(repo)
    state = sum(p.stat().st_size for p in pieces)
    print(f"staged {len(pieces)} pieces ({state / 1e6:.1f} MB) into {dest}; a device call sends {total / 2**20:.1f} MiB "
          f"(limit {TRAVEL_LIMIT / 2**20:.0f} MiB)")
    if total > TRAVEL_LIMIT:
        raise SystemExit(f"too much to send: {total / 2**20:.1f} MiB > 64 MiB. The state alone is {state / 1e6:.1f} MB: "
                         "train a smaller preset (compact) or carry less data")
    return dest


def last_validation(metrics: Path) -> dict:
    rec = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "val":
            rec = r
    return rec


def healing_summary(val: dict) -> dict:
    def per_task(metric: str) -> dict:
        prefix = f"heal_{metric}/"
        return {k[len(prefix):]: v for k, v in val.items() if k.startswith(prefix)}

    removed = per_task("removed")
    return {"removed": removed, "ap": per_task("ap"), "chance": per_task("chance"), "copier": per_task("copier"),
            "min_removed": min(removed.values()) if removed else None}


def check_chunk(chunk: dict, run: str, earlier: list[dict], where: Path, log: Path) -> None:
    """A chunk may be recorded only where it continues the run's record: raise (nothing changed) otherwise."""
    last = earlier[-1]["steps_after"] if earlier else 0
    before, after = chunk.get("steps_before"), chunk.get("steps_after")
    if any((c.get("steps_before"), c.get("steps_after"), c.get("date")) == (before, after, chunk.get("date"))
           for c in earlier):
        raise SystemExit(f"{where}: this chunk (step {before} → {after}) is already recorded in {log}")
    if before != last:
        raise SystemExit(f"{where}: this chunk starts at step {before}, but {log} records {run} at step {last}"
                         + (" (it restarted from scratch: was the state staged? bench/results/ARCHIVED.md)"
                            if before == 0 else "") + "; nothing collected, the previous state is kept")
    if not isinstance(after, int) or after <= before:
        raise SystemExit(f"{where}: this chunk trained no steps ({before} → {after}, train_rc "
                         f"{chunk.get('train_rc')}; see its gpu_train.log); nothing collected")


def collect(run: str, files_at: Path, runs_dir: Path, results: Path = RESULTS) -> dict:
    check_sums(files_at)
    pieces = sorted(files_at.glob("state.tgz.part*"))
    if not pieces:
        raise SystemExit(f"{files_at}: no state.tgz.part* pieces (see its gpu_train.log)")
    root = runs_dir / run
    log = results / f"{run}.jsonl"
    earlier = recorded_chunks(run, results)
    runs_dir.mkdir(parents=True, exist_ok=True)
    # everything is unpacked and checked in a temporary place beside the run first: a refused or failed
    # collect leaves the previous state (pieces, state, model) to resume from
    with tempfile.TemporaryDirectory(dir=runs_dir, prefix=f".collect-{run}-") as tmp:
        tmp = Path(tmp)
        joined = tmp / "state.tgz"
        with open(joined, "wb") as out:
            for p in pieces:
                out.write(p.read_bytes())
        try:
            with tarfile.open(joined) as tar:
                tar.extractall(tmp / "state", filter="data")
        except (tarfile.TarError, EOFError) as exc:
            raise SystemExit(f"{files_at}: the state's pieces do not unpack ({exc})") from exc
        joined.unlink()
        if not (tmp / "state" / "chunk.json").is_file():
            raise SystemExit(f"{files_at}: the state has no chunk.json (see its gpu_train.log)")
        chunk = json.loads((tmp / "state" / "chunk.json").read_text())
        check_chunk(chunk, run, earlier, files_at, log)
        if (files_at / "model.tgz").is_file():
            with tarfile.open(files_at / "model.tgz") as tar:
                tar.extractall(tmp / "model", filter="data")
        (tmp / "pieces").mkdir()
        for p in pieces:
            shutil.copy2(p, tmp / "pieces" / p.name)
        # swap in only now, each folder by a rename on the same file system
        root.mkdir(exist_ok=True)
        for name in ("state", "model", "pieces"):
            if (tmp / name).exists():
                shutil.rmtree(root / name, ignore_errors=True)
                (tmp / name).rename(root / name)
    state = root / "state"
    metrics = state / "train" / f"fold{chunk['fold']}" / "metrics.jsonl"
    val = last_validation(metrics) if metrics.is_file() else {}
    results.mkdir(parents=True, exist_ok=True)
    minutes = sum(c["train_wall_s"] for c in earlier) / 60 + chunk["train_wall_s"] / 60
    rec = {**chunk, "device_train_min_total": round(minutes, 2), "val_step": val.get("step"),
           "val_loss": val.get("val_loss"), "healing": healing_summary(val)}
    with open(log, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    write_chunk_table(log, results / f"{run}.md")
    print(json.dumps(rec, indent=1))
    return rec


def write_chunk_table(log: Path, md: Path) -> None:
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    lines = [f"# Training chunks of `{log.stem}`", "",
             "Made by `bench/gpu_train.sh` (one chunk per device session) and `bench/train_chunks.py collect`.", "",
             "| date | device | recipe | steps | train min (chunk / total) | val step | removed per task | map AP per task (chance) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r["healing"]
        removed = ", ".join(f"{k} {v:.2f}" + (f" (copier {h['copier'][k]:.2f})" if k in h.get("copier", {}) else "")
                            for k, v in sorted(h["removed"].items()))
        ap = ", ".join(f"{k} {v:.3f} ({h['chance'].get(k, float('nan')):.3f})" for k, v in sorted(h["ap"].items()))
        lines.append(f"| {r['date'][:10]} | {r['device']} | {r['recipe']} | {r['steps_before']} → {r['steps_after']} | "
                     f"{r['train_wall_s'] / 60:.1f} / {r['device_train_min_total']:.1f} | {r.get('val_step')} | {removed} | {ap} |")
    md.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------- report


def healing_series(metrics: Path) -> list[dict]:
    """Per validation: step, elapsed seconds, mean removed and mean map AP over tasks, and per task."""
    out = []
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") != "val":
            continue
        h = healing_summary(r)
        if not h["removed"]:
            continue
        out.append({"step": r["step"], "elapsed_s": r.get("elapsed_s"), "val_loss": r.get("val_loss"),
                    "mean_removed": sum(h["removed"].values()) / len(h["removed"]),
                    "mean_ap": sum(h["ap"].values()) / len(h["ap"]),
                    "mean_chance": sum(h["chance"].values()) / len(h["chance"]), **h})
    return out


def report(named: list[tuple[str, Path]], out: Path, title: str, command: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    series = {name: healing_series(path) for name, path in named}
    rep = {"title": title, "command": command, "runs": {n: {"metrics": str(p), "series": series[n]} for n, p in named}}
    (out / "healing.json").write_text(json.dumps(rep, indent=1, sort_keys=True) + "\n")
    tasks = sorted({t for s in series.values() for row in s for t in row["removed"]})
    lines = [f"# {title}", "", f"command: `{command}`", "",
             "Healing metric (train/healing.py) at each validation: share of each synthetic anomaly removed, and the "
             "map's pixel AP against the anomaly mask (chance in brackets). Where the log has it, the copier "
             "reference follows each removed share in brackets: the score of a model that keeps the anomaly and adds "
             "its own error on the healthy slice; healing is removed above it.", "",
             "| run | step | elapsed min | val loss | " + " | ".join(f"removed {t}" for t in tasks) + " | mean AP (chance) |",
             "|---|---|---|---|" + "---|" * len(tasks) + "---|"]
    for name, rows in series.items():
        for r in rows:
            cells = " | ".join(f"{r['removed'].get(t, float('nan')):.3f}"
                               + (f" ({r['copier'][t]:.2f})" if t in r.get("copier", {}) else "") for t in tasks)
            el = "" if r["elapsed_s"] is None else f"{r['elapsed_s'] / 60:.1f}"
            vl = "" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
            lines.append(f"| {name} | {r['step']} | {el} | {vl} | {cells} | {r['mean_ap']:.3f} ({r['mean_chance']:.3f}) |")
    (out / "healing.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, rows in series.items():
            steps = [r["step"] for r in rows]
            axes[0].plot(steps, [r["mean_removed"] for r in rows], marker="o", label=name)
            axes[1].plot(steps, [r["mean_ap"] for r in rows], marker="o", label=name)
            axes[1].plot(steps, [r["mean_chance"] for r in rows], ls=":", color="grey")
        axes[0].set(xlabel="training step", ylabel="anomaly removed (mean over tasks)")
        axes[1].set(xlabel="training step", ylabel="map AP (mean over tasks; dotted: chance)")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / "healing.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    print((out / "healing.md").read_text())
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", default=str(REPO / "runs"), help="where chunk states live (git-ignored)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage")
    s.add_argument("run")
    s.add_argument("--results", default=str(RESULTS), help="where the run's chunks are recorded")
    c = sub.add_parser("collect")
    c.add_argument("run")
    c.add_argument("files_at")
    c.add_argument("--results", default=str(RESULTS))
    r = sub.add_parser("report")
    r.add_argument("runs", nargs="+", help="NAME=path/to/metrics.jsonl")
    r.add_argument("--out", required=True)
    r.add_argument("--title", default="Healing over training time")
    args = ap.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if args.cmd == "stage":
        stage(args.run, runs_dir, results=Path(args.results))
    elif args.cmd == "collect":
        collect(args.run, Path(args.files_at), runs_dir, Path(args.results))
    else:
        named = []
        for item in args.runs:
            name, _, path = item.partition("=")
            if not path or not Path(path).is_file():
                ap.error(f"{item}: expected NAME=path/to/metrics.jsonl of an existing file")
            named.append((name, Path(path)))
        report(named, Path(args.out), args.title, " ".join(["bench/train_chunks.py", *(argv or sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
