"""Where healthy brain tissue lands on the model's intensity scale, per scan, with and without landmarks.

    python bench/intensity_check.py --models SET --data ../shared/data --out bench/results/DIR/intensity.md

For each IXI T1 scan (training and held-out) and each BraTS T1c case (tumour voxels excluded via its
labels), the brain's 10th/50th/90th percentiles after the set's percentile step, and after the landmark
map too: the set's landmarks, or for a set without them landmarks fitted on its recorded training subjects.
Computed on the native grid inside the brain mask, so it measures the contract, not the resampling.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from condiff.io.volumes import read_mask, read_volume
from condiff.modelset import open_model_set
from condiff.preprocess import PreprocessConfig, fit_landmarks, normalised_intensities


def healthy_percentiles(image: Path, mask: Path, labels: Path | None, cfg: PreprocessConfig) -> list[float]:
    vol = read_volume(image)
    brain = np.asarray(read_mask(mask, vol), bool)
    scaled = normalised_intensities(vol, brain, cfg)
    keep = brain if labels is None else brain & ~(np.asarray(read_volume(labels).data) > 0)
    return [float(v) for v in np.percentile(scaled[keep], (10, 50, 90))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path, help="the data kit (ixi-t1/, brats-tumour/)")
    ap.add_argument("--out", type=Path, help="Markdown file to write (also printed)")
    args = ap.parse_args(argv)
    ms = open_model_set(args.models, verify=False)
    cfg = PreprocessConfig.from_dict(ms.preprocessing)
    trained_on = ms.configs[0].trained.get("data", {}).get("train", {})
    train_subjects = trained_on.get("cases") or trained_on.get("subjects", [])  # files (older cards: "subjects")
    ixi, brats = args.data / "ixi-t1", args.data / "brats-tumour"
    plain = dataclasses.replace(cfg, landmarks=None)
    marks, source = cfg.landmarks, "the set's landmarks"
    if marks is None:
        source = f"landmarks fitted on its {len(train_subjects)} training subjects"
        marks = fit_landmarks(((v, read_mask(ixi / f"{s}_brainmask.nii.gz", v))
                               for s in train_subjects for v in [read_volume(ixi / f"{s}.nii.gz")]), plain)
    standard = dataclasses.replace(plain, landmarks=tuple(marks))
    cases = [(f"IXI {p.name[:-7]}" + (" (train)" if p.name[:-7] in train_subjects else " (held out)"),
              p, p.with_name(p.name[:-7] + "_brainmask.nii.gz"), None)
             for p in sorted(ixi.glob("IXI*-T1.nii.gz"))]
    cases += [(f"BraTS {p.name[:-11]} (healthy tissue)", p, p.with_name(p.name.replace("_t1c", "_brainmask")),
               p.with_name(p.name.replace("_t1c", "_seg"))) for p in sorted(brats.glob("*_t1c.nii.gz"))]
    lines = [f"Healthy brain on the model's intensity scale (set {args.models}, {source}; 10th / 50th / 90th percentile "
             "inside the brain mask, BraTS tumour labels excluded).", "",
             "| scan | percentile step only | + landmarks |", "|---|---|---|"]
    for name, image, mask, labels in cases:
        a = healthy_percentiles(image, mask, labels, plain)
        b = healthy_percentiles(image, mask, labels, standard)
        lines.append(f"| {name} | {' / '.join(f'{v:.3f}' for v in a)} | {' / '.join(f'{v:.3f}' for v in b)} |")
    lines += ["", "landmarks: " + json.dumps([round(v, 4) for v in marks])]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
