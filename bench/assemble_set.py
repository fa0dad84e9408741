"""Assemble a model set from member folders of separate training runs (e.g. one fold per CPU run).

    python bench/assemble_set.py --out examples/models-healing --name "..." --dtype fp16 \
        RUN_A/fold0 RUN_B/fold5 RUN_C/fold9

Each member folder (config.json + model.safetensors) is loaded, checked, and written to
``OUT/fold<f>`` in the chosen storage dtype (fp16 halves a shipped set; loading casts back to
float32), then ``set.json`` lists them with their digests. Two members of the same fold get
``fold<f>``, ``fold<f>b``, ... The members must agree on the preprocessing (one set, one input space).
The output folder must not exist yet, so a set is never half-overwritten.

``--landmarks DATA`` adds intensity landmarks (histogram standardisation, ``condiff-train --landmarks``) to a
set trained without them: fitted on the members' recorded training subjects, read from DATA (their training
folder). The members' weights are unchanged; the training slices were not standardised, so this is a
test-time harmonisation (measure it with ``bench/quality.py``), recorded in each config's ``trained``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from condiff.modelset import load_model, open_model_set, save_model, save_model_set

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def landmarks_for(configs, data: Path) -> list[float]:
    """Landmarks fitted on the training subjects every member records (they must agree), read from ``data``."""
    from condiff.preprocess import PreprocessConfig, fit_landmarks
    from condiff.train import data as tdata

    records = [c.trained.get("data", {}) for c in configs]
    # the training files (``cases``; older cards list them as ``subjects``, which were files then)
    subjects = {tuple(r.get("train", {}).get("cases") or r.get("train", {}).get("subjects") or ()) for r in records}
    patterns = {r.get("mask_pattern") for r in records}
    if len(subjects) != 1 or not next(iter(subjects)):
        raise SystemExit("--landmarks: the members do not record one common list of training subjects")
    if len(patterns) != 1:
        raise SystemExit("--landmarks: the members record different mask patterns")
    wanted, pattern = next(iter(subjects)), next(iter(patterns))
    by_name = {c.name: c for c in tdata.list_cases(data)}
    missing = [s for s in wanted if s not in by_name]
    if missing:
        raise SystemExit(f"--landmarks: {data} lacks the training subjects {', '.join(missing)}")
    cases = [by_name[s] for s in wanted]
    return list(tdata.fit_training_landmarks(cases, PreprocessConfig.from_dict(configs[0].preprocessing), pattern, 0))


def assemble(out: Path, members: list[Path], name: str, dtype: str = "fp16", landmarks_data: Path | None = None) -> list[Path]:
    if out.exists():
        raise SystemExit(f"{out}: exists; choose a new folder (a set is never overwritten)")
    if not members:
        raise SystemExit("give at least one member folder")
    loaded = []
    for path in members:
        model, cfg = load_model(path)
        loaded.append((path, model, cfg))
    first = loaded[0][2].preprocessing
    for path, _, cfg in loaded[1:]:
        if cfg.preprocessing != first:
            raise SystemExit(f"{path}: preprocessing differs from {loaded[0][0]}'s; members of one set must agree")
    if landmarks_data is not None:
        marks = landmarks_for([cfg for _, _, cfg in loaded], landmarks_data)
        loaded = [(path, model, dataclasses.replace(
            cfg, preprocessing={**cfg.preprocessing, "landmarks": marks},
            trained={**cfg.trained, "landmarks_added": {"data": str(landmarks_data), "after_training": True}}))
            for path, model, cfg in loaded]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = []
    for path, model, cfg in loaded:
        stem = f"fold{cfg.fold}" if cfg.fold is not None else path.name
        folder, k = tmp / stem, 0
        while folder.exists():
            k += 1
            folder = tmp / f"{stem}{chr(ord('a') + k)}"
        save_model(folder, model, cfg, dtype=DTYPES[dtype])
        written.append(folder)
    save_model_set(tmp, written, name=name)
    tmp.rename(out)
    open_model_set(out)  # digests and configs check out
    return [out / w.name for w in written]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("members", nargs="+", type=Path, help="member folders (config.json + model.safetensors)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--name", default="condiff model set")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--landmarks", type=Path, metavar="DATA", help="add intensity landmarks fitted on the members' "
                    "training subjects, read from this folder (their training data)")
    args = ap.parse_args(argv)
    written = assemble(args.out, args.members, args.name, args.dtype, args.landmarks)
    print(json.dumps({"out": str(args.out), "members": [w.name for w in written]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
