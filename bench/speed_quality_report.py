"""Markdown and PNG for ``bench/speed_quality.py``'s report (a dict as written to speed_quality.json)."""
from __future__ import annotations

from pathlib import Path

COPIER_REMOVED = 0.10  # below this mean removed share the set is copying its input, not restoring it


def _fmt(v, digits=3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _machine(meta: dict) -> str:
    m = meta["machine"]
    where = m["gpu"] or f"{m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads"
    return f"{m['host']} ({where}); load average at start {m['loadavg_start']}, at end {meta.get('loadavg_end')}"


def how_to_read(report: dict) -> list[str]:
    meta = report["meta"]
    ref = report["rows"][0]
    removed = sum(t["removed"] for t in ref["healing"].values()) / len(ref["healing"])
    chance = sum(t["chance"] for t in ref["healing"].values()) / len(ref["healing"])
    text = ("Every configuration restores the same slices with the same noise (keyed by seed, input digest, slice "
            "and member), so a row differs from the reference only in what its name changes. *rel* = the row's AP / "
            "the reference's AP; the plot's y axis is the smaller of the two. Speed counts only the restoration and "
            "map work (engine opening and ONNX export are in the JSON as `build_s`); "
            f"{meta['machine']['device'].upper()} timings on a shared machine move by several percent between runs.")
    if removed < COPIER_REMOVED:
        text += (f" **This model set hardly heals**: the reference removes {removed:.1%} of the synthetic anomalies "
                 f"on average (healing AP {ref['healing_ap']:.3f}, chance {chance:.3f}). A copier like this mostly "
                 "reproduces its input, so its maps show where sampling noise moved the restoration more than where "
                 "the anomaly is. "
                 "The relative quality differences here therefore mostly reflect noise (other noise draws, rounding, "
                 "fewer members averaged) measured on few slices, not what a configuration would cost a trained "
                 "set; only the speed columns transfer.")
    return ["## How to read this", "", text, ""]


def write_markdown(report: dict, path: Path) -> None:
    meta, rows = report["meta"], report["rows"]
    h, les = meta["healing_inputs"], meta["lesion_inputs"]
    v = meta["versions"]
    lines = ["# condiff speed–quality table", "",
             f"- date: {meta['date']}", f"- command: `{meta['command']}`", f"- machine: {_machine(meta)}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             f"- model set: `{meta['models']}` ({meta['n_members']} members); device {meta['device']}, batch size "
             f"{meta['batch_size']}, seed {meta['seed']}; wall time {meta['wall_s']:.0f} s",
             f"- healing: {h['n_clean_slices']} clean held-out slices of {', '.join(h['subjects'])}, each corrupted by "
             "every task (fixed seeds); summary = mean over tasks of the map AP",
             f"- lesions: AP_p over {les['brain_pixels']} brain pixels of {les['n_slices']} slices "
             f"({', '.join(c['case'] for c in les['cases'])}; evenly spaced among slices with enough brain, labels "
             f"unseen); chance {les['chance']:.3f}",
             f"- reference: `{meta['reference']}`", ""]
    lines += how_to_read(report)
    lines += ["| config | engine | precision | sampler | steps | members | slices/s | speed ratio | healing AP | rel "
              "| lesion AP_p | rel | Pareto |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['name']}{' (reference)' if r['reference'] else ''} | {r['engine']} | {r['precision']} | " \
               f"{r['sampler']} | {r['steps']} | {r['members']} | "
        if r["status"] != "ok":
            lines.append(head + f"not run: {r['reason']} | | | | | | |")
            continue
        lines.append(head + f"{r['slices_per_s']:.4g} | {r['speed_ratio']:.2f} | {_fmt(r['healing_ap'])} | "
                     f"{_fmt(r['healing_rel'])} | {_fmt(r['lesion_ap'])} | {_fmt(r['lesion_rel'])} | "
                     f"{'yes' if r['pareto'] else ''} |")
    rec = meta["recommended"]
    tol = f"{meta['tolerance']:.0%}"
    if rec:
        r = next(r for r in rows if r["name"] == rec)
        lines += ["", f"**Recommended: `{rec}`** — the fastest configuration whose healing AP, healing removal (mean "
                  f"removed share) and lesion AP_p are all within {tol} of the reference (at most {tol} below it): "
                  f"{r['speed_ratio']:.2f}x the reference's speed, healing rel {r['healing_rel']:.3f}, removal rel "
                  f"{r['removed_rel']:.3f}, lesion rel {r['lesion_rel']:.3f}."]
    else:
        lines += ["", f"**Recommended: none** — no configuration faster than the reference keeps healing AP, healing "
                  f"removal and lesion AP_p within {tol} of it (at most {tol} below); keep the reference."]
    tasks = list(rows[0]["healing"])
    lines += ["", "## Healing per task (removed share / map AP)", "",
              "| config | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for r in rows:
        if r["status"] == "ok":
            cells = [f"{r['healing'][t]['removed']:.3f} / {r['healing'][t]['ap']:.3f}" if t in r["healing"] else ""
                     for t in tasks]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    chance = " | ".join(f"{rows[0]['healing'][t]['chance']:.3f} ({rows[0]['healing'][t]['n_slices']} slices)" for t in tasks)
    lines.append(f"| chance AP | {chance} |")
    for note in meta.get("notes", []):
        lines += ["", f"Note: {note}"]
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: dict, path: Path) -> str | None:
    """slices/s (log) against relative quality, Pareto front marked; returns a note when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return "no PNG: matplotlib is not installed (pip install 'condiff[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = report["meta"]
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(12, 6.5))
    ax.axhline(1 - meta["tolerance"], color="grey", ls="--", lw=0.8, label=f"{meta['tolerance']:.0%} below the reference")
    for i, r in enumerate(ok, 1):
        style = dict(marker="s", color="black") if r["reference"] else dict(marker="o", color="tab:red" if r["pareto"] else "tab:blue")
        ax.scatter(r["slices_per_s"], r["quality_rel"], s=60 if r["pareto"] else 30, zorder=3, **style)
        # numbers, named in the key beside the axes: rows often land on top of each other (same sampler on two engines)
        ax.annotate(str(i), (r["slices_per_s"], r["quality_rel"]), textcoords="offset points", xytext=(4, 3 + 7 * (i % 2)),
                    fontsize=7)
    key = "\n".join(f"{i:>2}  {r['name']}{'  (reference)' if r['reference'] else ''}{'  Pareto' if r['pareto'] else ''}"
                    for i, r in enumerate(ok, 1))
    fig.text(0.74, 0.88, key, fontsize=7, va="top", family="monospace")
    front = sorted((r for r in ok if r["pareto"]), key=lambda r: r["slices_per_s"])
    ax.step([r["slices_per_s"] for r in front], [r["quality_rel"] for r in front], where="pre", color="tab:red",
            lw=1.2, label="Pareto front", zorder=2)
    if meta["recommended"]:
        r = next(r for r in ok if r["name"] == meta["recommended"])
        ax.scatter(r["slices_per_s"], r["quality_rel"], marker="*", s=300, facecolor="none", edgecolor="green",
                   zorder=4, label=f"recommended: {r['name']}")
    ax.set_xscale("log")
    ax.set_xlabel("slices per second (log)")
    ax.set_ylabel("relative quality = min(healing AP, lesion AP_p) / reference")
    m = meta["machine"]
    ax.set_title(f"condiff speed vs quality, {meta['date'][:10]}, {m['gpu'] or m['cpu']} ({meta['device']})", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    skipped = [r["name"] for r in report["rows"] if r["status"] != "ok"]
    v = meta["versions"]
    foot = (f"{meta['command']}\ncondiff {v['condiff']}, torch {v['torch']}, onnxruntime {v.get('onnxruntime')}; "
            f"host {m['host']}" + (f"\nnot run: {', '.join(skipped)}" if skipped else ""))
    fig.text(0.01, 0.01, foot, fontsize=6.5, va="bottom", family="monospace")
    fig.subplots_adjust(bottom=0.2, right=0.72)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
