"""How much do maps move across batch sizes, backends and precisions on the GPU? (numbers for the docs)

    python bench/gpu_consistency.py --out DIR

Runs the bundled demo set on the bundled IXI and MS slabs (real slices) with 50 DDPM steps:
eager fp32 at batch 1 and 8, the CUDA-graph engine in fp32 and fp16 at batch 8; and a random
`tiny` network (DDIM 10 steps) at batch 1/3/8 eager vs graphs. Writes JSON + Markdown.
"""
from __future__ import annotations

import argparse
import datetime
import json
from importlib.resources import files
from pathlib import Path

import torch

from condiff.config import preset
from condiff.engine.backends.torch_backend import TorchDenoiser
from condiff.engine.graphs import GraphDenoiser
from condiff.engine.runner import SliceJob, run_slices
from condiff.io.volumes import read_mask, read_volume
from condiff.modelset import load_model, open_model_set
from condiff.preprocess import PreprocessConfig, prepare_volume
from condiff.sampler import make_plan
from condiff.unet import ConditionalUNet


def demo_jobs(ms):
    cfg = PreprocessConfig.from_dict(ms.preprocessing)
    scans = files("condiff.examples") / "scans"
    jobs = []
    for stem, mask in (("ixi132_t1", "ixi132_t1_brainmask"), ("ms_patient26_t1", None)):
        vol = read_volume(Path(str(scans / f"{stem}.nii.gz")))
        m = read_mask(Path(str(scans / f"{mask}.nii.gz")), vol) if mask else (vol.data > 0)
        prep = prepare_volume(vol, cfg, mask=m)
        jobs += [SliceJob(torch.from_numpy(prep.slices[i]), stem, int(prep.slice_index[i]),
                          torch.from_numpy(prep.foreground[i])) for i in range(len(prep.slices))]
    return jobs


def compare(a, b):
    da = max(float((x.amap - y.amap).abs().max()) for x, y in zip(a, b))
    peak = max(float(x.amap.abs().max()) for x in a)
    ds = max(abs(x.score - y.score) / max(abs(x.score), 1e-12) for x, y in zip(a, b))
    return {"max_abs_map": da, "map_peak": peak, "rel_to_peak": da / peak, "max_rel_score": ds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    rep = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "tf32": False, "rows": {}}
    ms = open_model_set(Path(str(files("condiff.examples") / "models")))
    models = [load_model(d)[0] for d in ms.member_dirs]
    jobs = demo_jobs(ms)
    plan = make_plan("ddpm", 50)
    eager8 = run_slices([TorchDenoiser(m, dev, "fp32", 8) for m in models], jobs, plan, batch_size=8)
    eager1 = run_slices([TorchDenoiser(m, dev, "fp32", 1) for m in models], jobs, plan, batch_size=1)
    g32 = run_slices([GraphDenoiser(m, dev, "fp32", 8) for m in models], jobs, plan, batch_size=8)
    g16 = run_slices([GraphDenoiser(m, dev, "fp16", 8) for m in models], jobs, plan, batch_size=8)
    gb16 = run_slices([GraphDenoiser(m, dev, "bf16", 8) for m in models], jobs, plan, batch_size=8)
    rep["demo_slices"] = len(jobs)
    rows = rep["rows"]
    rows["demo: eager fp32 batch 1 vs batch 8"] = compare(eager8, eager1)
    rows["demo: graphs fp32 vs eager fp32 (batch 8)"] = compare(eager8, g32)
    rows["demo: graphs fp16 vs eager fp32 (batch 8)"] = compare(eager8, g16)
    rows["demo: graphs bf16 vs eager fp32 (batch 8)"] = compare(eager8, gb16)
    torch.manual_seed(0)
    tiny = [ConditionalUNet(preset("tiny", 1, sample_size=32)).eval() for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    tjobs = [SliceJob(torch.rand(1, 32, 32, generator=g), "t", i) for i in range(7)]
    tplan = make_plan("ddim", 10)
    base = None
    for bs in (1, 3, 8):
        e = run_slices([TorchDenoiser(m, dev, "fp32", bs) for m in tiny], tjobs, tplan, batch_size=bs)
        gr = run_slices([GraphDenoiser(m, dev, "fp32", bs) for m in tiny], tjobs, tplan, batch_size=bs)
        rows[f"random tiny: graphs vs eager fp32 (batch {bs})"] = compare(e, gr)
        if base is None:
            base = e
        else:
            rows[f"random tiny: eager fp32 batch {bs} vs batch 1"] = compare(base, e)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_consistency.json").write_text(json.dumps(rep, indent=1) + "\n")
    lines = [f"# GPU consistency ({rep['gpu']}, torch {rep['torch']}, TF32 off, {rep['date']})", "",
             f"Demo set (3 members), {rep['demo_slices']} real slices, DDPM 50 steps; random tiny nets DDIM 10.", "",
             "| comparison | max abs map diff | map peak | diff / peak | max rel score diff |", "|---|---|---|---|---|"]
    for k, v in rows.items():
        lines.append(f"| {k} | {v['max_abs_map']:.3g} | {v['map_peak']:.3g} | {v['rel_to_peak']:.3g} | {v['max_rel_score']:.3g} |")
    (out / "gpu_consistency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
