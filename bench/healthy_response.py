"""Where a model set's maps answer healthy tissue of lesion cases: the false positives behind a low AP_p.

    python bench/healthy_response.py OUT --labels '{dir}/{base}_seg.nii.gz' [--report DIR]

OUT is a ``condiff-infer --save-model-space --save-member-maps`` output (``bench/quality.py --lesions``
writes one per lesion set). On exactly the pixels of condiff-eval's benchmark protocol (model slice
space, empty slices dropped) it reports, pooled over cases and per case:

- the mean map inside the label and in healthy brain (inside the inference brain mask, outside the
  label), and their ratio, for the ensemble and each member: a member that answers healthy tissue has
  a low ratio whatever its synthetic healing;
- the healthy response by distance to the brain border (model-space pixels), to tell border effects
  (mask or skull-stripping mismatch) from responses inside the brain;
- the input intensity where healthy tissue answers most (its top 5 % of map values) against all healthy
  brain: dark responders point at CSF spaces (ventricles), bright ones at vessels or enhancement;
- AP_p of the map and of the non-learned baselines (the normalised input inside the brain, "bright",
  its complement, "dark", its deviation from the local median, "median", and the brain mask,
  "area") and chance, for reference (bench/quality.py reports these).

Writes ``healthy_response.json`` and ``healthy_response.md`` into ``--report`` (default OUT).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from condiff.engine.evaluate import BASELINES

BANDS = ((0.0, 1.5), (1.5, 3.5), (3.5, 5.5), (5.5, np.inf))  # distance to the brain border, model pixels
DARK, BRIGHT = 0.3, 0.8  # input intensity thresholds on the [0, 1] model scale
TOP_SHARE = 0.05


def case_arrays(out_dir: Path, rec: dict, label_pattern: str, label_values=None) -> dict[str, np.ndarray]:
    """Model-space arrays of one case on the benchmark protocol's slices: map, member maps, label,
    input and brain (all (S, H, W); member maps (M, S, H, W)). ``label_values``: as condiff-eval's."""
    from condiff.engine.evaluate import benchmark_arrays, case_baselines, kept_slices

    maps, labels, _, member_maps = benchmark_arrays(out_dir, rec, label_pattern, label_values)
    with np.load(out_dir / "model_space" / f"{rec['case']}.npz") as z:
        slices, brain = z["slices"], z["foreground"]
    keep = kept_slices(rec, slices)  # the benchmark protocol's slices
    if member_maps is None:
        raise SystemExit(f"{out_dir}: {rec['case']} has no member maps; rerun condiff-infer with --save-member-maps")
    shape = slices[keep][:, 0].shape
    brain = brain[keep].reshape(shape).astype(bool)
    base = case_baselines(out_dir, rec)  # condiff-eval --baselines' maps: both tools score the same references
    return {"map": maps.reshape(shape), "members": member_maps.reshape(len(member_maps), *shape),
            "label": labels.reshape(shape).astype(bool), "input": slices[keep][:, 0], "brain": brain,
            **{name: base[name] for name in BASELINES}}


def border_distance(brain: np.ndarray) -> np.ndarray:
    """Per slice, the Euclidean distance of each brain pixel to the nearest pixel outside the brain."""
    from scipy import ndimage

    return np.stack([ndimage.distance_transform_edt(b) for b in brain])


def summarise(arrays: dict[str, np.ndarray]) -> dict:
    from condiff.metrics import average_precision

    amap, label, brain, x = arrays["map"], arrays["label"], arrays["brain"], arrays["input"]
    healthy = brain & ~label
    dist = border_distance(brain)

    def ratio(m: np.ndarray) -> dict:
        inside = float(m[label].mean()) if label.any() else float("nan")
        out = float(m[healthy].mean()) if healthy.any() else float("nan")
        return {"label_mean": inside, "healthy_mean": out, "ratio": inside / out if out > 0 else float("nan")}

    bands = []
    for lo, hi in BANDS:
        sel = healthy & (dist > lo) & (dist <= hi)
        bands.append({"from": lo, "to": None if np.isinf(hi) else hi, "pixels": int(sel.sum()),
                      "healthy_mean": float(amap[sel].mean()) if sel.any() else float("nan")})
    top = np.zeros_like(healthy)
    if healthy.any():
        top = healthy & (amap >= np.quantile(amap[healthy], 1.0 - TOP_SHARE))

    def intensity(sel: np.ndarray) -> dict:
        v = x[sel]
        return {"pixels": int(sel.sum()), "mean": float(v.mean()) if v.size else float("nan"),
                "dark_share": float((v < DARK).mean()) if v.size else float("nan"),
                "bright_share": float((v > BRIGHT).mean()) if v.size else float("nan")}

    flat_label = label.ravel()
    return {
        "ensemble": ratio(amap), "members": [ratio(m) for m in arrays["members"]],
        "border_bands": bands,
        "intensity": {"healthy_top": intensity(top), "healthy_all": intensity(healthy), "label": intensity(label)},
        "ap_pixel": {"map": average_precision(flat_label, amap.ravel()),
                     **{name: average_precision(flat_label, arrays[name].ravel()) for name in BASELINES},
                     "chance": float(flat_label.mean())},
    }


def healthy_response(out_dir: Path, label_pattern: str, label_values=None) -> dict:
    """``label_values``: only these label classes are lesion (condiff-eval --label-values); the
    other labelled voxels then count as healthy tissue."""
    from condiff.engine.writer import load_records

    cases = {}
    for rec in load_records(out_dir):
        if rec.get("status") == "ok":
            cases[rec["case"]] = case_arrays(out_dir, rec, label_pattern, label_values)
    if not cases:
        raise SystemExit(f"{out_dir}: no finished cases")
    pooled = {k: np.concatenate([c[k] for c in cases.values()], axis=1 if k == "members" else 0)
              for k in ("map", "members", "label", "input", "brain", *BASELINES)}
    return {"out_dir": str(out_dir), "labels": label_pattern,
            "label_values": list(label_values) if label_values else None, "pooled": summarise(pooled),
            "cases": {name: summarise(a) for name, a in cases.items()}}


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3g}"


def write_markdown(report: dict, path: Path) -> None:
    p = report["pooled"]
    lines = [f"# Healthy-tissue response: `{report['out_dir']}`", "",
             f"Labels `{report['labels']}`"
             + (f" (values {', '.join(map(str, report['label_values']))})" if report.get("label_values") else "")
             + "; model slice space, benchmark protocol's slices; pooled over "
             f"{len(report['cases'])} case(s).", "",
             "| maps | mean in label | mean in healthy brain | ratio |", "|---|---|---|---|"]
    rows = [("ensemble", p["ensemble"])] + [(f"member {i}", m) for i, m in enumerate(p["members"])]
    lines += [f"| {name} | {_fmt(r['label_mean'])} | {_fmt(r['healthy_mean'])} | {_fmt(r['ratio'])} |" for name, r in rows]
    lines += ["", "Healthy response by distance to the brain border (model pixels):", "",
              "| distance | pixels | mean map |", "|---|---|---|"]
    lines += [f"| ({b['from']}, {'∞' if b['to'] is None else b['to']}] | {b['pixels']} | {_fmt(b['healthy_mean'])} |"
              for b in p["border_bands"]]
    it = p["intensity"]
    lines += ["", f"Input intensity (model scale) where healthy brain answers most (top {TOP_SHARE:.0%} of its map):", "",
              f"| pixels | count | mean | share < {DARK} | share > {BRIGHT} |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {v['pixels']} | {_fmt(v['mean'])} | {_fmt(v['dark_share'])} | {_fmt(v['bright_share'])} |"
              for name, v in (("healthy top", it["healthy_top"]), ("all healthy", it["healthy_all"]), ("label", it["label"]))]
    ap = p["ap_pixel"]
    lines += ["", f"AP_p: map {_fmt(ap['map'])}, bright baseline {_fmt(ap['bright'])}, chance {_fmt(ap['chance'])}.", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--labels", required=True, help="label pattern, as condiff-eval --masks")
    ap.add_argument("--label-values", type=int, nargs="+", metavar="V",
                    help="only these label classes are lesion, as condiff-eval --label-values")
    ap.add_argument("--report", type=Path, help="folder for the report [default: OUT]")
    args = ap.parse_args(argv)
    report = healthy_response(args.out_dir, args.labels, args.label_values)
    dest = args.report or args.out_dir
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "healthy_response.json").write_text(json.dumps(report, indent=1, allow_nan=True))
    write_markdown(report, dest / "healthy_response.md")
    print((dest / "healthy_response.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
