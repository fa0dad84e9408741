"""Markdown table and PNG plot of a bench/throughput.py report (the JSON it writes)."""
from __future__ import annotations

from pathlib import Path


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e3 else f"{v:,.0f}"
    return str(v)


def markdown(report: dict) -> str:
    m, meta = report["machine"], report["meta"]
    lines = [f"# condiff throughput: {meta['preset']} on {m['gpu'] or m['cpu']}", "",
             f"- date: {meta['date']}", f"- command: `{meta['command']}`",
             f"- machine: {m['host']}, {m['platform']}, CPU {m['cpu']} ({m['cpu_count']} cores, "
             f"{m['ram_gib']} GiB), torch threads {m['torch_threads']}, device {m['device']}"
             + (f", GPU {m['gpu']} ({m['gpu_memory_gib']} GiB)" if m["gpu"] else ""),
             "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"- network: {meta['preset']}, {meta['image_channels']} channel(s), {meta['size']} px, "
             f"{fmt(meta['gflop_per_eval'], 4)} GFLOP per evaluation ({meta['flops_source']})",
             f"- work: {meta['members']} member(s) x {meta['steps']} DDPM steps per slice; "
             f"'s/slice (500)' scales to the paper's 10 members x 50 steps; warm-up {meta['warmup']}, "
             f"{meta['repeats']} timed repeats, median (min–max)",
             f"- floor: {meta['floor_note']}",
             f"- load average (1/5/15 min): {m['loadavg_start']} at the start, {meta['loadavg_end']} at the end", "",
             "| engine | batch | steps | slices/s | evals/s | s/slice (500) | pipeline s median (min–max) "
             "| denoise ms/image | TFLOP/s | × floor | vs fp32 | vs ref | vs ref best | peak MiB | build s "
             "| first call s | max Δmap vs fp32 |",
             "|" + "---|" * 17]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['batch_size']} | {r['steps']} | skipped: {r['note']} |"
                         + " |" * 13)
            continue
        p = r["pipeline_s"]
        lines.append(" | ".join([
            f"| {r['label']}", str(r["batch_size"]), str(r["steps"]), fmt(r["slices_per_s"]), fmt(r["evals_per_s"]),
            fmt(r["paper_slice_s"]), f"{fmt(p['median'])} ({fmt(p['min'])}–{fmt(p['max'])})",
            fmt(r["denoise_ms_per_image"]), fmt(r["pipeline_tflops"]), fmt(r["x_floor"]), fmt(r["vs_fp32"]),
            fmt(r["vs_reference"]), fmt(r["vs_reference_best"]), fmt(r["peak_mem_mib"], 4), fmt(r["build_s"]),
            fmt(r["first_call_s"]), fmt(r["max_abs_map_diff_vs_fp32"], 2)]) + " |")
    kinds = sorted({r["peak_mem_kind"] for r in report["rows"] if r.get("peak_mem_kind")})
    lines += ["", f"Peak memory: {', '.join(kinds) or '–'}. '× floor' = achieved time per "
              "evaluation / sequential floor; 'vs ref best' compares with the reference baseline at its best "
              "batch size. Weights are random (seeded).", ""]
    notes = meta["notes"] + sorted({f"{r['label']}: {r['note']}" for r in report["rows"]
                                    if r["status"] == "ok" and r.get("note")})
    notes += sorted({f"{r['label']}: no 'max Δmap vs fp32': {r['map_diff_note']}" for r in report["rows"]
                     if r["status"] == "ok" and r.get("map_diff_note")})
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> str | None:
    """slices/s (scaled to 500-evaluation slices) against batch size, one line per engine/precision."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install condiff[bench])"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["label"] for r in report["rows"]):
        pts = sorted((r["batch_size"], r["paper_slices_per_s"]) for r in report["rows"]
                     if r["label"] == label and r["status"] == "ok")
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    from matplotlib.ticker import FormatStrFormatter

    batches = sorted({r["batch_size"] for r in report["rows"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("batch size (slices per call)")
    ax.set_ylabel("slices/s (10 members x 50 steps)")
    m = report["machine"]
    ax.set_title(f"condiff {report['meta']['preset']}, {m['gpu'] or m['cpu']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
