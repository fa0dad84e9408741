"""Assemble a model set from member folders of separate training runs (e.g. one fold per CPU run).

    python bench/assemble_set.py --out examples/models-healing --name "..." --dtype fp16 \
        RUN_A/fold0 RUN_B/fold5 RUN_C/fold9

Each member folder (config.json + model.safetensors) is loaded, checked, and written to
``OUT/fold<f>`` in the chosen storage dtype (fp16 halves a shipped set; loading casts back to
float32), then ``set.json`` lists them with their digests. Two members of the same fold get
``fold<f>``, ``fold<f>b``, ... The members must agree on the preprocessing (one set, one input space).
The output folder must not exist yet, so a set is never half-overwritten.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from condiff.modelset import load_model, open_model_set, save_model, save_model_set

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def assemble(out: Path, members: list[Path], name: str, dtype: str = "fp16") -> list[Path]:
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
    args = ap.parse_args(argv)
    written = assemble(args.out, args.members, args.name, args.dtype)
    print(json.dumps({"out": str(args.out), "members": [w.name for w in written]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
