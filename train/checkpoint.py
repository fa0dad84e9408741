"""Training checkpoints: exact resume, no pickle, atomic, optionally split into parts of bounded size.

A checkpoint is a folder ``checkpoint-<step:09d>/`` holding

    tensors.safetensors          every tensor (model, EMA, optimiser moments, RNG byte states), or
    tensors.safetensors.part000  … the same bytes cut into parts of at most ``part_bytes`` each
    state.json                   everything else (step, counters, RNG states, data order, validation)
    manifest.json                written last: format, step, and the size and SHA-256 of every file and
                                 of the reassembled tensor file

The folder is built under a temporary name and renamed into place, so a folder with the final name is
complete; ``load_checkpoint`` still checks every digest (a checkpoint carried between machines in
parts is reassembled and verified here). Only safetensors and JSON are ever read: no pickle.

Splitting exists for time-boxed runs on machines that can return only small files (≤ 16 MB each).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from condiff.errors import CondiffError
from condiff.io.atomic import fsync_dir

FORMAT = "condiff.checkpoint/1"
TENSORS = "tensors.safetensors"
STATE = "state.json"
MANIFEST = "manifest.json"
MB = 1_000_000  # part sizes are decimal megabytes: "16 MB" limits are met with either reading
_NAME = re.compile(r"^checkpoint-(\d+)$")
_ASIDE = re.compile(r"^\.(checkpoint-\d+)\.\d+\.old$")  # a checkpoint moved aside while a save replaced it


class CheckpointError(CondiffError):
    """A checkpoint is incomplete, corrupt or of an unknown format."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:09d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # a write to a full disk names no file: say which one
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    return {"name": path.name, "bytes": len(data), "sha256": _sha256(data)}


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    part_bytes: int | None = None) -> Path:
    """Write ``root/checkpoint-<step>/`` atomically and return its path.

    ``tensors``: name -> tensor (moved to CPU, made contiguous). ``state``: JSON-serialisable dict.
    ``part_bytes``: split the tensor file into parts of at most this many bytes (None: one file).
    An existing checkpoint of the same step is replaced.
    """
    from safetensors.torch import save as st_save

    if part_bytes is not None and part_bytes < 1:
        raise ValueError(f"part_bytes must be positive, got {part_bytes}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        blob = st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
                       metadata={"format": FORMAT})
        files = []
        if part_bytes is None or len(blob) <= part_bytes:
            files.append(_write_file(tmp / TENSORS, blob))
            parts = [TENSORS]
        else:
            parts = []
            for i, start in enumerate(range(0, len(blob), part_bytes)):
                name = f"{TENSORS}.part{i:03d}"
                files.append(_write_file(tmp / name, blob[start:start + part_bytes]))
                parts.append(name)
        state_bytes = (json.dumps(state, sort_keys=True, indent=1, allow_nan=False) + "\n").encode()
        files.append(_write_file(tmp / STATE, state_bytes))
        manifest = {"format": FORMAT, "step": int(step), "files": files,
                    "tensors": {"parts": parts, "bytes": len(blob), "sha256": _sha256(blob)}}
        _write_file(tmp / MANIFEST, (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode())
        fsync_dir(tmp)
        if final.exists():
            old = root / f".{final.name}.{os.getpid()}.old"
            final.rename(old)
            try:
                tmp.rename(final)
            except BaseException:
                old.rename(final)  # the previous checkpoint goes back under its name
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(path, f"no {MANIFEST}; the checkpoint is incomplete",
                              "resume from an earlier checkpoint or copy all of its files")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(mpath, f"invalid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(mpath, f"unknown checkpoint format {manifest.get('format')!r} (this condiff reads {FORMAT})")
    return manifest


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and verify a checkpoint folder (single file or parts); every SHA-256 must match."""
    from safetensors.torch import load as st_load

    path = Path(path)
    manifest = _read_manifest(path)
    data: dict[str, bytes] = {}
    for entry in manifest["files"]:
        fpath = path / entry["name"]
        if not fpath.is_file():
            raise CheckpointError(fpath, "missing checkpoint file", "copy every file listed in manifest.json")
        raw = fpath.read_bytes()
        if len(raw) != entry["bytes"] or _sha256(raw) != entry["sha256"]:
            raise CheckpointError(fpath, "size or SHA-256 does not match manifest.json (corrupt or truncated)",
                                  "copy the file again or resume from an earlier checkpoint")
        data[entry["name"]] = raw
    blob = b"".join(data[name] for name in manifest["tensors"]["parts"])
    if len(blob) != manifest["tensors"]["bytes"] or _sha256(blob) != manifest["tensors"]["sha256"]:
        raise CheckpointError(path, "reassembled tensor file does not match manifest.json")
    tensors = {k: v.to(map_location) for k, v in st_load(blob).items()}
    state = json.loads(data[STATE])
    return Checkpoint(path=path, step=int(manifest["step"]), tensors=tensors, state=state)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint folder under ``root`` (manifest present), ascending.

    A checkpoint a killed save had moved aside to replace it (``.checkpoint-<step>.<pid>.old``, the
    new one never placed) is put back under its name first."""
    root = Path(root)
    if not root.is_dir():
        return []
    for aside in root.glob(".checkpoint-*.old"):
        m = _ASIDE.match(aside.name)
        if m and aside.is_dir() and (aside / MANIFEST).is_file() and not (root / m.group(1)).exists():
            aside.rename(root / m.group(1))
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints (and stale temporary folders); returns what went."""
    root = Path(root)
    removed = []
    found = list_checkpoints(root)
    for _, p in found[:max(0, len(found) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in root.glob(".checkpoint-*.tmp"):
        if not p.name.endswith(f".{os.getpid()}.tmp"):
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".checkpoint-*.old"):  # replaced: its step was saved anew (list_checkpoints put back the rest)
        m = _ASIDE.match(p.name)
        if m and (root / m.group(1)).is_dir() and not p.name.endswith(f".{os.getpid()}.old"):
            shutil.rmtree(p, ignore_errors=True)
    return removed


# ------------------------------------------------------------------- non-tensor state as JSON / tensors


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors ("optim/<param>/<key>") and JSON scalars."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim/{pid}/{key}"] = value
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": _jsonable(sd["param_groups"])}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore moments and step counts; hyper-parameters come from the optimiser as constructed now."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Python, numpy (global) and torch (CPU and every CUDA device) RNG states."""
    import random

    import numpy as np

    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/torch_cuda/{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    import random

    import numpy as np

    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch_cpu"].cpu())
    cuda = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng/torch_cuda/"))
    if cuda and torch.cuda.is_available():
        for i, s in cuda[:torch.cuda.device_count()]:
            torch.cuda.set_rng_state(s.cpu(), i)
