"""Speed against quality for the configurations a user can pick (engine/precision, sampler/steps, members).

    python bench/speed_quality.py --models examples/models --out DIR            # the whole table
    python bench/speed_quality.py --models SET --out DIR --configs torch-fp32-ddim10-all,ort-fp32-ddpm50-all
    python bench/speed_quality.py --list-configs                                # the names --configs takes
    python bench/speed_quality.py --smoke --out DIR                             # CI: tiny random set, phantoms

Every configuration restores the same slices with the same noise: condiff keys noise by (seed, input
digest, slice, member), so a configuration differs from the reference (torch fp32, 50 DDPM steps, all
members) only in what it changes, and "members k" are the first k members with their own noise.
Quality, per configuration:

- healing: ``bench/quality.py``'s synthetic protocol (held-out IXI slices, four tasks at fixed seeds);
  per task the removed share and the map's pixel AP, summarised as the mean map AP over tasks;
- lesions: pixel AP (AP_p) on BraTS T1c tumours (label > 0), over brain pixels in model space, on
  slices picked without looking at the labels (evenly spaced among those with enough brain).

Speed: slices/s of ``run_slices`` (noise, reverse loop, SSIM map, member mean) over all those slices,
timed in the same run (``torch.cuda.synchronize`` around it on CUDA), after a short warm-up; opening
engines and exporting ONNX are timed apart (``build_s``). Relative values divide by the reference.
A configuration that cannot run here is a row "not run: <reason>". Writes ``speed_quality.json``,
``.md`` and ``.png`` (``speed_quality_report.py``).
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from quality import healing_of, healing_restorer, held_out_slices, make_smoke_healthy, make_smoke_inputs
from speed_quality_report import write_markdown, write_plot
from machine import machine_info, versions

SCHEMA = "condiff.bench.speed_quality/1"
TOLERANCE = 0.02          # recommended = fastest configuration at most 2 % below the reference on both measures
ENOUGH_BRAIN = 0.15       # share of a lesion slice inside the brain mask for it to be eligible
LESION_SET = {"folder": "brats-tumour", "mask": "{dir}/{base}_brainmask.nii.gz", "labels": "{dir}/{base}_seg.nii.gz"}


@dataclass(frozen=True)
class Config:
    engine: str
    precision: str
    sampler: str
    steps: int
    members: int | None  # the first k members; None = all

    @property
    def name(self) -> str:
        return f"{self.engine}-{self.precision}-{self.sampler}{self.steps}-{'all' if self.members is None else f'm{self.members}'}"


class NotRun(Exception):
    """A configuration that cannot run here; its message is the row's reason."""


def configurations(n_members: int, smoke: bool = False) -> list[Config]:
    """The reference first, then one axis at a time from it, then a few combinations.

    The same list on every machine, so tables compare: what cannot run here becomes a "not run" row.
    """
    if smoke:  # CI: two DDIM steps; the fast engine (forced CPU) and 5 members (a 2-member set) cannot run
        ref = Config("torch", "fp32", "ddim", 2, None)
        return [ref, Config("torch", "fp32", "ddim", 2, 1), Config("torch", "bf16", "ddim", 2, None),
                Config("fast", "fp16", "ddim", 2, None), Config("torch", "fp32", "ddim", 2, 5)]
    ref = Config("torch", "fp32", "ddpm", 50, None)
    rows = [ref]
    rows += [Config(e, p, "ddpm", 50, None) for e, p in (("torch", "fp16"), ("torch", "bf16"), ("ort", "fp32"), ("fast", "fp16"))]
    rows += [Config("torch", "fp32", "ddim", n, None) for n in (10, 20, 25)]
    rows += [Config("torch", "fp32", "ddpm", n, None) for n in (10, 25)]  # the reference sampler, strided further
    rows += [Config("torch", "fp32", "ddpm", 50, k) for k in (1, 3, 5) if k != n_members]  # k = set size is "all"
    rows += [Config("torch", "fp32", "ddim", 10, 1), Config("ort", "fp32", "ddim", 10, None),
             Config("ort", "fp32", "ddim", 10, 1), Config("fast", "fp16", "ddim", 10, None),
             Config("fast", "fp16", "ddim", 10, 1), Config("ort", "fp32", "ddpm", 10, None),
             Config("fast", "fp16", "ddpm", 10, None)]
    return rows


# ---------------------------------------------------------------- inputs


def lesion_slices(preprocessing: dict, folder: Path, per_case: int) -> dict:
    """BraTS slices in model space: jobs (noise keyed by the file's digest, as condiff-infer), tumour labels
    and brain masks (N, H, W). Slices: ``per_case`` evenly spaced among those with enough brain, labels unseen."""
    from condiff.engine.plan import sha256_path
    from condiff.engine.runner import SliceJob
    from condiff.io.cases import discover, find_mask
    from condiff.io.volumes import read_mask, read_volume
    from condiff.preprocess import PreprocessConfig, mask_to_slices, prepare_volume

    cfg = PreprocessConfig.from_dict(preprocessing)
    jobs, labels, brain, cases = [], [], [], []
    for case in discover([folder]):
        vol = read_volume(case.path)
        prep = prepare_volume(vol, cfg, mask=read_mask(find_mask(case, LESION_SET["mask"]), vol))
        share = prep.foreground.reshape(len(prep.slices), -1).mean(axis=1)
        eligible = np.flatnonzero(share >= ENOUGH_BRAIN)
        k = min(per_case, len(eligible))
        chosen = eligible[((np.arange(k) + 0.5) * len(eligible) / k).astype(int)]  # centres of k equal parts
        # the same path condiff-eval's benchmark protocol takes: label (> 0) on the input grid -> slice space
        tumour = mask_to_slices(read_mask(find_mask(case, LESION_SET["labels"]), vol), prep)
        digest = sha256_path(case.path)
        for k in chosen:
            jobs.append(SliceJob(torch.from_numpy(prep.slices[k]), digest, int(prep.slice_index[k]),
                                 torch.from_numpy(prep.foreground[k])))
        labels.append(tumour[chosen])
        brain.append(prep.foreground[chosen])
        cases.append({"case": case.name, "slice_index": [int(prep.slice_index[k]) for k in chosen]})
    labels, brain = np.concatenate(labels), np.concatenate(brain)
    if not (labels & brain).any():
        raise SystemExit(f"{folder}: the chosen slices hold no tumour pixel inside the brain; raise --lesion-slices")
    return {"jobs": jobs, "labels": labels, "brain": brain, "cases": cases}


# ---------------------------------------------------------------- one configuration


class Stopwatch:
    """Seconds and slices of the timed ``run_slices`` calls (synchronised on CUDA)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.slices = device, 0.0, 0

    def run(self, fn, jobs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = fn(jobs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        self.slices += len(jobs)
        return out


def _cpu_fp16_probe(member_dir: Path) -> str:
    """Measured cost of the network in raw torch fp16 on this CPU against fp32 (one evaluation each, batch 1)."""
    from condiff.modelset import load_model

    model, cfg = load_model(member_dir)
    size, ch = cfg.unet.sample_size, cfg.image_channels
    x, t = torch.rand(1, ch, size, size), torch.tensor([500])
    times = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.float32, torch.float16):  # the first fp32 call warms the allocator
            m = model.to(dtype)
            t0 = time.perf_counter()
            m(x.to(dtype), x.to(dtype), t)
            times[dtype] = time.perf_counter() - t0
    return (f"raw torch fp16 on this CPU takes {times[torch.float16]:.3g} s per network evaluation against "
            f"{times[torch.float32]:.3g} s in fp32, {times[torch.float16] / times[torch.float32]:.0f}x slower")


def _onnx_member(member_dir: Path, scratch: Path) -> tuple[Path, float]:
    """The member's folder when it already holds model.onnx, else a copy in ``scratch`` with a checked export."""
    from condiff.export.onnx_export import export_onnx

    if (member_dir / "model.onnx").is_file():
        return member_dir, 0.0
    copy = scratch / member_dir.name
    if not copy.exists():
        shutil.copytree(member_dir, copy)
        return copy, export_onnx(copy).seconds
    return copy, 0.0


def _check_ort_provider(device: torch.device) -> None:
    from condiff.errors import BackendUnavailableError
    from condiff.optional import require

    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    offered = require("onnxruntime", "ort").get_available_providers()
    if provider not in offered:
        raise BackendUnavailableError(None, f"this onnxruntime has no {provider} (it offers {', '.join(offered)})")


def open_members(cfg: Config, model_set, device: torch.device, batch_size: int, scratch: Path,
                 threads: int | None = None) -> list:
    from condiff.engine.backends import open_denoiser
    from condiff.errors import CondiffError

    n = len(model_set) if cfg.members is None else cfg.members
    if n > len(model_set):
        raise NotRun(f"the set has {len(model_set)} members")
    try:
        dirs = model_set.member_dirs[:n]
        if cfg.engine == "ort":
            _check_ort_provider(device)  # before minutes of export
            dirs = [_onnx_member(d, scratch)[0] for d in dirs]
        extra = {"threads": threads} if cfg.engine == "ort" and threads else {}
        return [open_denoiser(cfg.engine, d, device=device, precision=cfg.precision, max_batch=batch_size, **extra)
                for d in dirs]
    except (CondiffError, ImportError) as exc:
        reason = exc.message if isinstance(exc, CondiffError) else f"{type(exc).__name__}: {exc}"
        if cfg.engine == "torch" and cfg.precision == "fp16" and device.type == "cpu":
            reason += f" Measured: {_cpu_fp16_probe(model_set.member_dirs[0])}."
        raise NotRun(reason) from exc


def measure(cfg: Config, model_set, inputs: dict, args, device: torch.device, scratch: Path) -> dict:
    """Open the members, warm up, then restore the healing and lesion slices under the stopwatch."""
    from condiff.engine.runner import run_slices
    from condiff.metrics import average_precision
    from condiff.sampler import make_plan

    t0 = time.perf_counter()
    denoisers = open_members(cfg, model_set, device, args.batch_size, scratch, args.threads)
    build_s = time.perf_counter() - t0
    schedule = model_set.configs[0].schedule
    plan = make_plan(cfg.sampler, cfg.steps, schedule)
    ids = list(range(len(denoisers)))

    def restore(p):
        return lambda jobs: run_slices(denoisers, jobs, p, seed=args.seed, batch_size=args.batch_size, member_ids=ids)

    # warm-up: on CUDA the full loop (the fast engine captures its graph per plan and batch shape);
    # on the CPU two steps suffice to create the kernels' primitives
    restore(plan if device.type == "cuda" else make_plan(cfg.sampler, 2, schedule))(inputs["lesions"]["jobs"][:1])
    watch = Stopwatch(device)
    healing = healing_of(healing_restorer(lambda jobs: watch.run(restore(plan), jobs)), inputs["clean"])
    results = watch.run(restore(plan), inputs["lesions"]["jobs"])
    maps = np.stack([r.amap.numpy() for r in results])
    brain = inputs["lesions"]["brain"]
    del denoisers
    gc.collect()
    return {"build_s": build_s, "n_slices": watch.slices, "time_s": watch.seconds,
            "slices_per_s": watch.slices / watch.seconds, "unet_evals_per_slice": len(ids) * plan.n_steps,
            "member_ids": ids, "healing": healing,
            "healing_ap": float(np.mean([row["ap"] for row in healing.values()])),
            "healing_removed": float(np.mean([row["removed"] for row in healing.values()])),
            "lesion_ap": average_precision(inputs["lesions"]["labels"][brain], maps[brain])}


# ---------------------------------------------------------------- the table


def summarise(rows: list[dict], reference: str) -> str | None:
    """Fill ratios to the reference and Pareto flags; return the recommended configuration's name or None.

    Pareto: no other row that ran is at least as fast and at least as good (min of the two relative
    qualities) and strictly better in one. Recommended: the fastest row faster than the reference whose
    healing AP, healing removal (mean removed share over the tasks) and lesion AP_p are all at least
    (1 - TOLERANCE) x the reference's. (Removal joined the rule after a single-member row passed on map
    AP while removing 10-13 % less of two anomaly kinds: a map can rank pixels as well from a worse restoration.)
    """
    ok = [r for r in rows if r["status"] == "ok"]
    ref = next(r for r in ok if r["name"] == reference)
    for r in ok:
        r["speed_ratio"] = r["slices_per_s"] / ref["slices_per_s"]
        r["healing_rel"] = r["healing_ap"] / ref["healing_ap"]
        r["removed_rel"] = r["healing_removed"] / ref["healing_removed"]
        r["lesion_rel"] = r["lesion_ap"] / ref["lesion_ap"]
        r["quality_rel"] = min(r["healing_rel"], r["lesion_rel"])
    for r in ok:
        r["pareto"] = not any(o is not r and o["slices_per_s"] >= r["slices_per_s"] and o["quality_rel"] >= r["quality_rel"]
                              and (o["slices_per_s"] > r["slices_per_s"] or o["quality_rel"] > r["quality_rel"]) for o in ok)
    # removal as "at most TOLERANCE x |reference| below it": a copier set's reference removal can be negative
    removal_floor = ref["healing_removed"] - TOLERANCE * abs(ref["healing_removed"])
    good = [r for r in ok if r["speed_ratio"] > 1 and min(r["healing_rel"], r["lesion_rel"]) >= 1 - TOLERANCE
            and r["healing_removed"] >= removal_floor]
    return max(good, key=lambda r: r["slices_per_s"])["name"] if good else None


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="model set folder")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                    help="data kit with ixi-t1/ and brats-tumour/ [../shared/data]")
    ap.add_argument("--out", help="output folder")
    ap.add_argument("--configs", help="comma-separated configuration names (--list-configs); the reference always runs")
    ap.add_argument("--list-configs", action="store_true", help="print the configuration names and exit")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--batch-size", type=int, help="slices per device batch [1 on the CPU: no padded rows; 16 on CUDA]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime [their defaults]; 1 keeps "
                    "timings sane on a machine other jobs load (spinning thread pools oversubscribe it)")
    ap.add_argument("--holdout", type=int, default=2, help="held-out IXI subjects for the healing metric")
    ap.add_argument("--healing-slices", type=int, default=6, help="clean slices (each corrupted by every task)")
    ap.add_argument("--lesion-slices", type=int, default=8, help="BraTS slices per case")
    ap.add_argument("--smoke", action="store_true", help="CI: tiny random set on generated phantoms, 2 DDIM steps, CPU")
    return ap.parse_args(argv)


def select(all_configs: list[Config], names: str | None) -> list[Config]:
    if not names:
        return all_configs
    by_name = {c.name: c for c in all_configs}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [all_configs[0]] + [by_name[n] for n in dict.fromkeys(wanted) if n != all_configs[0].name]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from condiff.engine.pipeline import resolve_device
    from condiff.modelset import open_model_set

    start = time.perf_counter()
    if args.list_configs:
        n = len(open_model_set(args.models)) if args.models else 3
        print("\n".join(c.name for c in configurations(n, args.smoke)))
        return 0
    if not args.out:
        raise SystemExit("--out is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.models, data = map(str, make_smoke_inputs(out / "smoke-inputs"))
        make_smoke_healthy(Path(data))
        args.data, args.device, args.lesion_slices = data, "cpu", 6
    if not args.models:
        raise SystemExit("--models is required (or --smoke)")
    device = torch.device(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch_size = args.batch_size or (1 if device.type == "cpu" else 16)
    model_set = open_model_set(args.models)
    configs = select(configurations(len(model_set), args.smoke), args.configs)
    subjects, clean = held_out_slices(model_set.preprocessing, Path(args.data) / "ixi-t1", args.holdout, args.healing_slices)
    lesions = lesion_slices(model_set.preprocessing, Path(args.data) / LESION_SET["folder"], args.lesion_slices)
    inputs = {"clean": clean, "lesions": lesions}
    report = {"schema": SCHEMA, "meta": {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/speed_quality.py", *argv]), "machine": machine_info(device),
        "versions": versions(), "models": str(args.models), "n_members": len(model_set), "device": str(device),
        "batch_size": args.batch_size, "threads": args.threads, "seed": args.seed, "reference": configs[0].name, "tolerance": TOLERANCE,
        "healing_inputs": {"subjects": subjects, "n_clean_slices": int(len(clean))},
        "lesion_inputs": {"cases": lesions["cases"], "n_slices": len(lesions["jobs"]),
                          "brain_pixels": int(lesions["brain"].sum()),
                          "chance": float(lesions["labels"][lesions["brain"]].mean())}}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="speed-quality-") as scratch:
        for cfg in configs:
            row = {"name": cfg.name, "engine": cfg.engine, "precision": cfg.precision, "sampler": cfg.sampler,
                   "steps": cfg.steps, "members": len(model_set) if cfg.members is None else cfg.members,
                   "reference": cfg is configs[0]}
            print(f"[speed-quality] {cfg.name} ...", file=sys.stderr, flush=True)
            try:
                row.update(status="ok", **measure(cfg, model_set, inputs, args, device, Path(scratch)))
            except NotRun as exc:
                row.update(status="not run", reason=str(exc))
            print(f"[speed-quality] {cfg.name}: {row.get('reason') or '%.4g slices/s' % row['slices_per_s']}",
                  file=sys.stderr, flush=True)
            report["rows"].append(row)
    if report["rows"][0]["status"] != "ok":
        raise SystemExit(f"the reference {configs[0].name} did not run: {report['rows'][0]['reason']}")
    report["meta"]["recommended"] = summarise(report["rows"], configs[0].name)
    report["meta"]["loadavg_end"] = machine_info(device)["loadavg_start"]
    report["meta"]["wall_s"] = time.perf_counter() - start
    note = write_plot(report, out / "speed_quality.png")
    report["meta"]["notes"] = [note] if note else []
    (out / "speed_quality.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    write_markdown(report, out / "speed_quality.md")
    print((out / "speed_quality.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
