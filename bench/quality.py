"""Quality of a model set: the healing metric on held-out healthy slices and detection on real lesions.

    python bench/quality.py --models SET --data ../shared/data --out DIR [--engine fast --precision fp16 --device cuda]
    python bench/quality.py --smoke --out DIR        # CI: tiny random set on generated phantoms

Synthetic (``--synthetic``): the last ``--holdout`` IXI subjects (those condiff-train holds out),
prepared with the set's own contract, corrupted by each task at fixed seeds; per task the share
of the anomaly the restoration removes and the map's pixel AP against the anomaly mask, with chance.
``--draws 1 2 4 8`` adds the same metric with restorations averaged over K noise draws of the set:
how much of the restorer's own error is sampling noise that more members (or draws) would average out.
``--per-member`` adds each member's healing alone beside the ensemble's (mean / min / max over members).
Lesions (``--lesions``): condiff-infer on the BraTS T1c cases (brain masks) and the MS T1 cases, then
condiff-eval's benchmark protocol (AP_i, AUROC, AP_p, best Dice; ensemble and per member
avg/max/std), beside four non-learned baselines computed on the same slices: the normalised
intensity ("bright"), its complement ("dark"), its deviation from the local median ("median")
inside the brain, and the brain mask itself ("area": slice size alone).
Writes ``quality.json`` and ``quality.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from condiff.engine.evaluate import BASELINES

LESION_SETS = {
    "brats-t1c": {"folder": "brats-tumour", "mask": "{dir}/{base}_brainmask.nii.gz", "labels": "{dir}/{base}_seg.nii.gz",
                  # BRATS 2013/2015 classes (data/README.md): where learned maps and brightness part ways
                  "regions": {"enhancing tumour": (4,), "tumour core": (1, 3, 4), "oedema": (2,),
                              "necrosis + non-enhancing": (1, 3)}},
    "ms-t1": {"folder": "ms-lesion", "mask": "auto", "labels": "{dir}/{base}_lesionmask.nii.gz"},
}
HEALING_TASKS = (0, 2, 3, 4)  # task 1 blends in another dataset, which held-out IXI slices do not bring


def _versions() -> dict:
    import torch

    import condiff
    return {"condiff": condiff.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "machine": platform.node(), "cpu": _cpu_name()}


def _cpu_name() -> str:
    """The CPU's model name: platform.processor() is empty on Linux, where /proc/cpuinfo has it."""
    name = platform.processor()
    if name:
        return name
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def healthy_tissue(out: Path, label_pattern: str, label_values=None) -> dict:
    """bench/healthy_response.py's pooled summary on exactly the slices and masks the benchmark
    protocol uses (where in healthy tissue the map answers)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from healthy_response import healthy_response
    finally:
        sys.path.pop(0)
    return healthy_response(out, label_pattern, label_values)["pooled"]


def split_baselines(ev: dict, keys: tuple[str, ...] = ("ap_pixel",)) -> tuple[list[dict], dict]:
    """condiff-eval's rows (``Evaluation.to_dict``) without its baseline and chance rows, and those
    as ``{name: {key: value}}`` (chance: its AP_p), in the table's order."""
    rows, baselines, chance = [], {}, None
    for row in ev["rows"]:
        if row["row"].startswith("baseline: "):
            baselines[row["row"][len("baseline: "):]] = {k: row[k] for k in keys}
        elif row["row"] == "chance":
            chance = {"ap_pixel": row["ap_pixel"]}
        else:
            rows.append(row)
    baselines["chance"] = chance
    return rows, baselines


def run_lesions(args, report: dict) -> None:
    from condiff.engine.evaluate import evaluate

    for name, spec in LESION_SETS.items():
        if args.lesion_sets and name not in args.lesion_sets:
            continue
        folder = Path(args.data) / spec["folder"]
        if not folder.is_dir():
            report["lesions"][name] = {"skipped": f"{folder} not found"}
            continue
        out = Path(args.out) / name
        cmd = [sys.executable, "-m", "condiff.engine.cli", str(folder), "-o", str(out), "--models", str(args.models),
               "--engine", args.engine, "--precision", args.precision, "--device", args.device,
               "--steps", str(args.steps), "--sampler", args.sampler, "--mask", spec["mask"], "--save-model-space",
               "--save-member-maps", "--no-restoration", "--no-progress", "--overwrite"]
        if args.batch_size:
            cmd += ["--batch-size", str(args.batch_size)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        if proc.returncode not in (0, 1):
            report["lesions"][name] = {"error": proc.stderr[-2000:], "command": " ".join(cmd)}
            continue
        # one pass scores the model and the baselines on the same pixels (with --bootstrap, on the same draws);
        # the baselines are reported beside the table rather than in it
        ev = evaluate(out, spec["labels"], "benchmark", baselines=True, bootstrap=args.bootstrap).to_dict()
        boot = ev.pop("bootstrap")
        ev["rows"], baselines = split_baselines(ev, ("ap_pixel", "lesion_f1"))
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
        report["lesions"][name] = {"command": " ".join(cmd), "wall_s": elapsed, "evaluation": ev,
                                   "baselines": baselines, "healthy_response": healthy_tissue(out, spec["labels"]),
                                   "throughput": run.get("throughput"),
                                   "regions": label_regions(out, spec["labels"], spec.get("regions", {}))}
        if boot is not None:  # condiff-eval --baselines --bootstrap N: is the gap to the baselines luck of the cases?
            report["lesions"][name]["bootstrap"] = boot


def label_regions(out: Path, label_pattern: str, regions: dict) -> dict:
    """Per label class (condiff-eval --label-values --baselines): the benchmark rows and the baselines on
    the same pixels, the other classes counting as healthy tissue."""
    from condiff.engine.evaluate import evaluate

    found = {}
    for region, values in regions.items():
        ev = evaluate(out, label_pattern, "benchmark", label_values=values, baselines=True).to_dict()
        rows, baselines = split_baselines(ev)
        found[region] = {"label_values": list(values), "counts": ev["counts"], "rows": {r["row"]: r for r in rows},
                         "baselines": baselines}
    return found


def held_out_slices(preprocessing: dict, ixi_dir: Path, holdout: int, max_slices: int | None) -> tuple[list[str], np.ndarray]:
    """The healing metric's clean slices: the last ``holdout`` IXI subjects (those condiff-train holds
    out), prepared with the set's contract, slices with a real brain section, evenly thinned to
    ``max_slices``. Returns (subject names, slices (N, C, H, W))."""
    from condiff.io.cases import discover, find_mask
    from condiff.io.volumes import read_mask, read_volume
    from condiff.preprocess import PreprocessConfig, prepare_volume

    cfg = PreprocessConfig.from_dict(preprocessing)
    held = discover([ixi_dir])[-holdout:]
    slices = []
    for case in held:
        vol = read_volume(case.path)
        mask = read_mask(find_mask(case, "{dir}/{stem}_brainmask.nii.gz"), vol)
        prep = prepare_volume(vol, cfg, mask=mask)
        fg = prep.foreground.reshape(len(prep.slices), -1).mean(axis=1)
        slices.append(prep.slices[fg > 0.15])  # slices with a real brain section
    clean = np.concatenate(slices)
    if max_slices and len(clean) > max_slices:
        clean = clean[np.linspace(0, len(clean) - 1, max_slices).astype(int)]
    return [c.name for c in held], clean


def healing_restorer(run):
    """``healing_report``'s restore_fn over ``run(jobs) -> list[SliceResult]`` (e.g. ``run_slices``).

    Slice i of each call is keyed ("healing", i), so every engine and configuration draws the same noise.
    """
    import torch

    from condiff.engine.runner import SliceJob

    def restore_fn(cond):
        jobs = [SliceJob(torch.from_numpy(np.ascontiguousarray(c, np.float32)), "healing", i) for i, c in enumerate(cond)]
        res = run(jobs)
        return np.stack([r.restoration.numpy() for r in res]), np.stack([r.amap.numpy() for r in res])

    return restore_fn


def healing_of(restore_fn, clean: np.ndarray) -> dict:
    """``healing_report`` with this benchmark's fixed tasks and corruption seed (comparable across runs)."""
    from condiff.train.healing import healing_report
    from condiff.train.tasks import ArrayPool

    return healing_report(restore_fn, clean, HEALING_TASKS, seed=1234, same_pool=ArrayPool(clean))


def member_restorers(denoisers, plan, batch_size: int, seed: int = 0) -> list:
    """One healing restorer per member, each alone but with the noise it draws inside the set
    (``member_ids=[k]``), so the ensemble's restoration and map are exactly the members' mean."""
    from condiff.engine.runner import run_slices

    return [healing_restorer(lambda jobs, d=d, k=k: run_slices([d], jobs, plan, seed=seed, batch_size=batch_size,
                                                              member_ids=[k]))
            for k, d in enumerate(denoisers)]


def remembering(restore_fn):
    """``restore_fn`` that computes each distinct input once (the per-member and draw reports ask
    again for restorations the ensemble report already made)."""
    seen: dict[bytes, tuple] = {}

    def restore(cond):
        key = np.ascontiguousarray(cond).tobytes()
        if key not in seen:
            seen[key] = restore_fn(cond)
        return seen[key]

    return restore


def members_mean(restorers):
    """The ensemble's restorer from its members': the mean restoration and map (float64 sums)."""
    def restore(cond):
        outs = [fn(cond) for fn in restorers]
        return tuple(np.mean([o[i] for o in outs], axis=0, dtype=np.float64).astype(np.float32) for i in (0, 1))

    return restore


def member_summary(ensemble: dict, members: list[dict]) -> dict:
    """Per task: the ensemble's removed share and map AP beside its members' mean / min / max / std."""
    out = {}
    for name, row in ensemble.items():
        entry = {"task": row["task"], "ensemble_removed": row["removed"], "ensemble_ap": row["ap"]}
        for key in ("removed", "ap"):
            vals = np.array([m[name][key] for m in members], dtype=np.float64)
            entry[f"members_{key}"] = {"mean": float(vals.mean()), "min": float(vals.min()),
                                       "max": float(vals.max()), "std": float(vals.std())}
        out[name] = entry
    return out


def run_synthetic(args, report: dict) -> None:
    from condiff.engine.backends import open_denoiser
    from condiff.engine.runner import run_slices
    from condiff.modelset import open_model_set
    from condiff.sampler import make_plan

    ms = open_model_set(args.models)
    subjects, clean = held_out_slices(ms.preprocessing, Path(args.data) / "ixi-t1", args.holdout, args.max_slices)
    batch = args.batch_size or 64
    denoisers = [open_denoiser(args.engine, d, device=args.device, precision=args.precision,
                               max_batch=batch) for d in ms.member_dirs]
    plan = make_plan(args.sampler, args.steps)
    per_member = args.per_member and len(denoisers) > 1
    if per_member:
        # the ensemble is exactly its members' mean (tested), so each member restores every slice once
        # and the ensemble report averages their remembered outputs
        member_fns = [remembering(fn) for fn in member_restorers(denoisers, plan, batch)]
        restore_fn = members_mean(member_fns)
    else:
        restore_fn = healing_restorer(lambda jobs: run_slices(denoisers, jobs, plan, seed=0, batch_size=batch))
    restore_fn = remembering(restore_fn)

    t0 = time.perf_counter()
    rep = healing_of(restore_fn, clean)
    report["synthetic"] = {"subjects": subjects, "n_clean_slices": int(len(clean)),
                           "tasks": rep, "wall_s": time.perf_counter() - t0}
    if per_member:
        t0 = time.perf_counter()
        members = [{"member": d.name, "tasks": healing_of(fn, clean)} for d, fn in zip(ms.member_dirs, member_fns)]
        report["synthetic"]["members"] = members
        report["synthetic"]["member_summary"] = member_summary(rep, [m["tasks"] for m in members])
        report["synthetic"]["members_wall_s"] = time.perf_counter() - t0
    if args.draws:
        from condiff.train.healing import draw_averages

        def restorer_for_seed(seed):
            if seed == 0:  # the report above restored with seed 0 already
                return restore_fn
            return healing_restorer(lambda jobs: run_slices(denoisers, jobs, plan, seed=seed, batch_size=batch))

        t0 = time.perf_counter()
        averaged = draw_averages(restorer_for_seed, args.draws)
        report["synthetic"]["by_draws"] = {str(k): healing_of(fn, clean) for k, fn in averaged.items()}
        report["synthetic"]["by_draws_wall_s"] = time.perf_counter() - t0


def _num(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# condiff quality report", "", f"- date: {report['date']}", f"- command: `{report['command']}`",
             f"- versions: {report['versions']}", ""]
    if report.get("synthetic", {}).get("skipped"):
        lines += ["## Healing on held-out healthy slices", "", f"not run: {report['synthetic']['skipped']}", ""]
    elif report.get("synthetic"):
        s = report["synthetic"]
        lines += [f"## Healing on held-out healthy slices ({s['n_clean_slices']} slices of {', '.join(s['subjects'])})", "",
                  "| task | removed | copier reference | own error on healthy input | map AP | chance | slices |",
                  "|---|---|---|---|---|---|---|"]
        for name, row in s["tasks"].items():
            lines.append(f"| {row['task']} {name} | {row['removed']:.3f} | {row.get('copier_removed', float('nan')):.3f} | "
                         f"{row.get('clean_error', float('nan')):.3f} | {row['ap']:.3f} | {row['chance']:.3f} | {row['n_slices']} |")
        lines += ["", "removed: 1 - mean|x̂0 - x0| / mean|c - x0| in the anomaly; copier reference: what a model "
                  "scores that keeps the anomaly and adds its own error on the healthy slice (same noise); own "
                  "error: mean|R(x0) - x0| / mean|c - x0| (train/healing.py). Healing shows as removed above the "
                  "copier reference.", ""]
        if s.get("member_summary"):
            lines += ["### Ensemble against its members", "",
                      f"Each of the {len(s['members'])} members ({', '.join(m['member'] for m in s['members'])}) "
                      "restores alone with the noise it draws inside the set, so the ensemble's restoration and "
                      "map are the members' mean. Members: mean [min, max].", "",
                      "| task | ensemble removed | members removed | ensemble map AP | members map AP |",
                      "|---|---|---|---|---|"]
            for name, e in s["member_summary"].items():
                r, a = e["members_removed"], e["members_ap"]
                lines.append(f"| {e['task']} {name} | {e['ensemble_removed']:.3f} | {r['mean']:.3f} [{r['min']:.3f}, "
                             f"{r['max']:.3f}] | {e['ensemble_ap']:.3f} | {a['mean']:.3f} [{a['min']:.3f}, {a['max']:.3f}] |")
            lines.append("")
        if s.get("by_draws"):
            names = list(s["tasks"])
            lines += ["### Healing against the number of noise draws averaged", "",
                      "Each draw restores with the whole set under another noise seed (0, 1, ...); restorations "
                      "and maps are averaged over the first K draws. Cells: removed / copier reference / own error.", "",
                      "| draws | " + " | ".join(names) + " | mean map AP |", "|---" * (len(names) + 2) + "|"]
            for k, tasks in s["by_draws"].items():
                cells = [f"{tasks[n]['removed']:.3f} / {tasks[n].get('copier_removed', float('nan')):.3f} / "
                         f"{tasks[n].get('clean_error', float('nan')):.3f}" if n in tasks else "" for n in names]
                mean_ap = np.mean([t["ap"] for t in tasks.values()])
                lines.append(f"| {k} | " + " | ".join(cells) + f" | {mean_ap:.3f} |")
            lines.append("")
    for name, res in report.get("lesions", {}).items():
        lines.append(f"## {name}")
        if "evaluation" not in res:
            lines += [f"not run: {res.get('skipped') or res.get('error', '')[:300]}", ""]
            continue
        ev = res["evaluation"]
        lines += [f"protocol: {ev['protocol']} — {ev['description']}; counts {ev['counts']}", "",
                  "| row | AP_i | AUROC | AP_p | best Dice | Dice@5%FPR | AUPRO@30% | lesion F1 |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in ev["rows"]:
            cells = [row.get(k) for k in ("ap_image", "auroc", "ap_pixel", "dice", "dice_fpr5", "aupro", "lesion_f1")]
            lines.append(f"| {row['row']} | " + " | ".join("" if v is None else _num(v) for v in cells) + " |")
        for b, vals in res["baselines"].items():
            f1 = vals.get("lesion_f1")
            lines.append(f"| baseline: {b} | | | {_num(vals['ap_pixel'])} | | | | {'' if f1 is None else _num(f1)} |")
        lines.append("")
        det = ev.get("lesion_detection")
        if det and det["lesions"]:
            lines += [f"Lesion by lesion at the ensemble's best-Dice threshold ({det['threshold']:.4g}; connected per "
                      f"slice, matched at IoU >= {det['min_iou']}): {det['found']} of {det['lesions']} lesions found "
                      f"(recall {_num(det['recall'])}); {det['called_regions']} called regions, {det['false_regions']} "
                      f"false (precision {_num(det['precision'])}); lesion F1 {_num(det['f1'])}.", ""]
        boot = res.get("bootstrap")
        if boot:
            lines += [f"Case bootstrap ({boot['resamples']} resamples of the cases, {boot['level']:.0%} intervals; "
                      "paired differences):", "", "| | AP_p | best Dice | AUPRO@30% | lesion F1 |", "|---|---|---|---|---|"]
            cells = lambda d: " | ".join(f"{_num(d[k][0])} .. {_num(d[k][1])}"
                                         for k in ("ap_pixel", "dice", "aupro", "lesion_f1"))
            lines.append(f"| ensemble | {cells(boot['rows']['ensemble'])} |")
            for other, diff in boot["differences_to_first_row"].items():
                if other.startswith("baseline: "):
                    lines.append(f"| ensemble − {other[10:]} | {cells(diff)} |")
            lines.append("")
        if res.get("regions"):
            lines += ["Per label class (`condiff-eval --label-values`; the other classes count as healthy):", "",
                      "| class (values) | lesion pixels | AP_p ensemble | AP_p members avg / max | "
                      + " | ".join(BASELINES) + " | chance |", "|---|---|---|---|" + "---|" * (len(BASELINES) + 1)]
            for region, r in res["regions"].items():
                rows, b = r["rows"], r["baselines"]
                avg, top = rows.get("members avg", {}).get("ap_pixel"), rows.get("members max", {}).get("ap_pixel")
                members = "" if avg is None else f"{_num(avg)} / {_num(top)}"
                lines.append(f"| {region} ({', '.join(map(str, r['label_values']))}) | {r['counts'].get('positive_pixels')} | "
                             f"{_num(rows['ensemble'].get('ap_pixel'))} | {members} | "
                             + " | ".join(_num((b.get(name) or {}).get('ap_pixel')) for name in (*BASELINES, "chance")) + " |")
            lines.append("")
        hr = res.get("healthy_response")
        if hr:
            ratios = [hr["ensemble"]["ratio"]] + [m["ratio"] for m in hr["members"]]
            inner, outer = hr["border_bands"][-1]["healthy_mean"], hr["border_bands"][0]["healthy_mean"]
            lines += ["Mean map inside the label / in healthy brain (bench/healthy_response.py): ensemble "
                      f"{ratios[0]:.2f}, members " + " / ".join(f"{r:.2f}" for r in ratios[1:]) +
                      f"; healthy response deep inside / at the brain border {inner / outer:.2f}; "
                      f"share of dark input (< 0.3) in healthy brain's top 5 % {hr['intensity']['healthy_top']['dark_share']:.2f} "
                      f"(all healthy brain {hr['intensity']['healthy_all']['dark_share']:.2f}).", ""]
    path.write_text("\n".join(lines) + "\n")


def make_smoke_inputs(root: Path) -> tuple[Path, Path]:
    """A tiny random model set and a lesion-style data folder (phantom volumes + brain masks + labels)."""
    import nibabel as nib
    import torch

    from condiff.config import ModelConfig, preset
    from condiff.modelset import save_model, save_model_set
    from condiff.preprocess import PreprocessConfig
    from condiff.unet import ConditionalUNet

    pre = PreprocessConfig(modality="mri", image_size=32, fov_mm=64.0, normalisation="percentile", use_mask=True)
    set_dir = root / "models"
    for k in range(2):
        torch.manual_seed(k)
        cfg = preset("tiny", 1, sample_size=32)
        save_model(set_dir / f"fold{k}", ConditionalUNet(cfg), ModelConfig(unet=cfg, preprocessing=pre.to_dict(), fold=k))
    save_model_set(set_dir, [set_dir / "fold0", set_dir / "fold1"])
    data = root / "data" / "brats-tumour"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:40, :40, :6]
    for i in range(2):
        brain = ((zz - 20) ** 2 + (yy - 20) ** 2) < 15 ** 2
        img = np.where(brain, 0.5 + 0.1 * rng.standard_normal(brain.shape), -1.0).astype(np.float32)
        lesion = ((zz - 14 - 4 * i) ** 2 + (yy - 22) ** 2 < 16) & (xx > 1) & (xx < 4)
        img[lesion] += 1.0
        aff = np.diag([2.0, 2.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image(img, aff), data / f"case{i}_t1c.nii.gz")
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), aff), data / f"case{i}_brainmask.nii.gz")
        core = lesion & ((zz - 14 - 4 * i) ** 2 + (yy - 22) ** 2 < 6)  # BraTS-like classes: 4 inside 2
        nib.save(nib.Nifti1Image(np.where(core, 4, lesion * 2).astype(np.uint8), aff), data / f"case{i}_seg.nii.gz")
    return set_dir, root / "data"


def make_smoke_healthy(data_root: Path, n_subjects: int = 2) -> Path:
    """IXI-like healthy phantoms (``ixi-t1/<id>-T1.nii.gz`` + ``_brainmask``) for the healing metric in smoke runs."""
    import nibabel as nib

    folder = data_root / "ixi-t1"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    zz, yy, xx = np.mgrid[:40, :40, :8]
    for i in range(n_subjects):
        brain = ((zz - 20) ** 2 / 15.0 ** 2 + (yy - 20) ** 2 / (13.0 + i) ** 2) < 1
        # two tissue classes, so the tasks' blends and deformations have structure to change
        tissue = np.where(((zz - 20) ** 2 + (yy - 20) ** 2) < 36, 0.3, 0.6) + 0.05 * rng.standard_normal(brain.shape)
        img = np.where(brain, tissue, 0.0).astype(np.float32)
        aff = np.diag([2.0, 2.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image(img, aff), folder / f"IXI9{i:02d}-HH-0000-T1.nii.gz")
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), aff), folder / f"IXI9{i:02d}-HH-0000-T1_brainmask.nii.gz")
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--holdout", type=int, default=2)
    ap.add_argument("--max-slices", type=int, default=48)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--lesion-sets", nargs="+", choices=sorted(LESION_SETS), metavar="NAME",
                    help=f"lesion sets to run [all: {', '.join(LESION_SETS)}]")
    ap.add_argument("--draws", type=int, nargs="+", metavar="K",
                    help="also report healing with restorations averaged over K noise draws of the set (e.g. 1 2 4 8)")
    ap.add_argument("--per-member", action="store_true",
                    help="also report healing for each member alone (same noise as inside the set), beside the ensemble")
    ap.add_argument("--lesions", action="store_true")
    ap.add_argument("--bootstrap", type=int, default=None, metavar="N",
                    help="real lesions: N case resamples for intervals of the ensemble and of its differences to the "
                         "intensity baselines (condiff-eval --bootstrap) [0; 20 with --smoke]")
    ap.add_argument("--smoke", action="store_true", help="CI: tiny random set on generated phantoms, 2 DDIM steps")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.bootstrap is None:
        args.bootstrap = 20 if args.smoke else 0
    if args.smoke:
        args.models, args.data = map(str, make_smoke_inputs(out / "smoke-inputs"))
        make_smoke_healthy(Path(args.data))
        args.steps, args.sampler, args.device = 2, "ddim", "cpu"
        args.lesions = args.lesions or not args.synthetic  # --smoke --synthetic: the healing part alone
        LESION_SETS.pop("ms-t1", None)
    if not (args.synthetic or args.lesions):
        args.synthetic = args.lesions = True
    if not args.models:
        ap.error("--models is required (or --smoke)")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "versions": _versions(),
              "models": args.models, "engine": args.engine, "precision": args.precision, "steps": args.steps,
              "sampler": args.sampler, "lesions": {}}
    if args.synthetic:
        ixi = Path(args.data) / "ixi-t1"
        if ixi.is_dir():
            run_synthetic(args, report)
        else:  # said in the report and on stdout, like a missing lesion set
            report["synthetic"] = {"skipped": f"{ixi} not found (the held-out healthy IXI T1 slices)"}
    if args.lesions:
        run_lesions(args, report)
    (out / "quality.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=float) + "\n")
    write_markdown(report, out / "quality.md")
    print((out / "quality.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
