"""Writing a run's outputs: per-case files, records, the two CSVs, run.json and the lock.

Every file goes through ``condiff.io.atomic`` (temporary name in the same folder, fsync,
rename), the record last. ``cases.csv`` and ``scores.csv`` are never appended to: they are
rebuilt from all records in ``OUT/records``, sorted by case name, so a resumed, sharded or
distributed run ends with the same bytes. Nothing here writes timings, host names or
timestamps except ``run.json`` and the lock file.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np

from condiff.errors import OutputConflictError
from condiff.io.atomic import (check_creatable, create_folder, dumps_json, nearest_existing, write_bytes_atomic, write_json_atomic,
                               write_text_atomic)

from condiff.io.lock import OutputLock, shard_suffix

from .plan import OUTPUT_FOLDERS, CasePlan, read_record, record_path, sha256_bytes

logger = logging.getLogger(__name__)

CASES_COLUMNS = ["case", "input", "input_sha256", "status", "error_type", "error", "kind", "shape", "spacing",
                 "orientation", "n_slices", "score", "max_slice_score", "map_max", "n_members", "seed", "engine", "precision",
                 "warnings"]
# slice: the index along the input file's stored axis ``axis`` (the overlay's "slice 52 of axis 1"); empty on
# a case's total row; photographs are one slice 0 with no axis
SCORES_COLUMNS = ["case", "axis", "slice", "score"]


def run_json_name(shard: tuple[int, int] | None) -> str:
    return "run.json" if shard is None else f"run{shard_suffix(shard)}.json"


OUTPUT_PER_INPUT_BYTE = 4.0  # inputs whose header says nothing (photos): float32 outputs per input byte
OUTPUT_PER_CASE_BYTES = 256 * 1024  # overlay PNG, record, CSV rows
GZIP_OUTPUT_RATIO = 0.6  # float32 map or restoration through gzip (IXI T1: ~0.3; generous on purpose)


def estimated_output_bytes(path, restorations: bool = True) -> int:
    """Roughly what one case's outputs take. NIfTI inputs: from the header's voxel count, since the map
    and restoration are float32 whatever the input's type (an 8-bit .nii scan makes 8x its size; the
    old 4-bytes-per-input-byte rule said 4x and the warning stayed silent); other inputs: by size."""
    name = str(path).lower()
    n_outputs = 2 if restorations else 1
    if name.endswith((".nii", ".nii.gz")):
        try:
            import nibabel as nib

            shape = nib.load(str(path)).shape  # the header only
            voxels = int(np.prod(shape[:3], dtype=np.int64))
            ratio = 1.0 if name.endswith(".nii") else GZIP_OUTPUT_RATIO  # outputs keep the input's compression
            return int((voxels * 4 + 1024) * n_outputs * ratio) + OUTPUT_PER_CASE_BYTES  # + each file's header
        except Exception:  # an unreadable header: the run names it; here the size rule stands in
            pass
    return int(OUTPUT_PER_INPUT_BYTE / 2 * n_outputs * os.path.getsize(path)) + OUTPUT_PER_CASE_BYTES


def free_space_warning(out_dir: Path, input_paths, restorations: bool = True) -> str | None:
    """A warning when the disk under OUT has less free space than the run's outputs will roughly take
    (a rough, generous estimate: ``estimated_output_bytes``); None otherwise. Never refuses: the
    estimate can be wrong both ways, and a full disk mid-run stops cleanly anyway."""
    import shutil

    try:
        free = shutil.disk_usage(nearest_existing(out_dir)).free
        sizes = [estimated_output_bytes(p, restorations) for p in input_paths]
    except OSError:
        return None
    if not sizes:
        return None
    need = sum(sizes)
    if free >= need:
        return None
    return (f"{out_dir}: {free / 2**20:.0f} MiB free, and the outputs of {len(sizes)} case(s) may take about "
            f"{need / 2**20:.0f} MiB; the run stops cleanly if the disk fills (rerun to finish)")


def ensure_writable(out_dir: Path) -> None:
    """Create OUT (and parents); a folder we cannot create or write is a configuration error."""
    create_folder(out_dir)
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputConflictError(out_dir, "is not writable", "choose a folder you can write to")


# ----------------------------------------------------------------------------------------- per case


def write_output(out_dir: Path, rel: str, data: bytes) -> dict[str, str]:
    """Write one output atomically (creating sub-folders); returns its record entry."""
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
    return {"path": rel, "sha256": sha256_bytes(data)}


def _gzip_if(rel: str, raw: bytes) -> bytes:
    """``.nii.gz`` outputs: gzip with mtime 0 and a fixed OS byte, so identical data give identical bytes."""
    from condiff.io.volumes import gzip_bytes

    return gzip_bytes(raw) if rel.lower().endswith(".gz") else raw


def _native_foreground(prepared, brain_mask: np.ndarray | None) -> np.ndarray:
    """Where a map may be non-zero on the input grid: the brain mask itself when one was given,
    else the slice-space foreground brought back (> 0.5). Linear interpolation of the inverse
    would otherwise bleed map values into the background along the brain's edge."""
    from condiff.preprocess import invert_to_input

    if brain_mask is not None:
        return brain_mask
    return invert_to_input(prepared, prepared.foreground.astype(np.float32), fill=0.0) > 0.5


def write_case_files(out_dir: Path, plan: CasePlan, *, kind: str, prepared, source, brain_mask: np.ndarray | None,
                     maps: np.ndarray, restorations: np.ndarray, scores: np.ndarray,
                     model_space: dict[str, np.ndarray] | None = None,
                     overlay_max: float | None = None) -> dict[str, dict[str, str]]:
    """Write a case's map, restoration, overlay (and model-space npz); returns the record's ``outputs``.

    ``maps`` ``(S, H, W)``, ``restorations`` ``(S, C, H, W)``, ``scores`` ``(S,)`` in model slice
    space; ``prepared`` the case's ``Prepared``; ``source`` its ``Volume`` (None for a photo).
    Volumes: NIfTI on the input's grid and header (restoration in input intensity units).
    Photos: float32 TIFF plus 8-bit PNG preview (map scaled to its maximum, or to ``overlay_max``;
    restoration in [0, 1]). ``overlay_max``: the fixed top of the previews' colour scale (None: per case).
    """
    from condiff import __version__
    from condiff.io import images, volumes
    from condiff.preprocess import invert_to_input, to_input_units

    from .overlay import input_slice_names, overlay_png

    outs = plan.outputs
    written: dict[str, dict[str, str]] = {}
    if kind == "volume":
        native = invert_to_input(prepared, maps, fill=0.0) * _native_foreground(prepared, brain_mask)
        raw = volumes.nifti_bytes_like(native, source, descrip=f"condiff {__version__} anomaly map")
        written["map"] = write_output(out_dir, outs["map"], _gzip_if(outs["map"], raw))
        if "restoration" in outs:
            # back to the input's intensity units, so the restoration reads like the scan
            native_rest = to_input_units(prepared, invert_to_input(prepared, restorations[:, 0], fill=0.0))
            raw = volumes.nifti_bytes_like(native_rest, source, descrip=f"condiff {__version__} restoration")
            written["restoration"] = write_output(out_dir, outs["restoration"], _gzip_if(outs["restoration"], raw))
    else:
        native = invert_to_input(prepared, maps, fill=0.0)
        if brain_mask is not None:  # a photo's field-of-view mask, on the photo's grid
            native = native * brain_mask
        written["map"] = write_output(out_dir, outs["map"], images.tiff_bytes(native))
        written["map_png"] = write_output(out_dir, outs["map_png"],
                                          images.png_bytes(images.to_png8(native, 0.0, overlay_max or float(native.max()))))
        if "restoration" in outs:
            rest01 = np.clip((restorations + 1.0) / 2.0, 0.0, 1.0)
            native_rest = np.clip(invert_to_input(prepared, rest01, fill=0.0), 0.0, 1.0)
            written["restoration"] = write_output(out_dir, outs["restoration"], images.tiff_bytes(native_rest))
            written["restoration_png"] = write_output(out_dir, outs["restoration_png"],
                                                      images.png_bytes(images.to_png8(native_rest, 0.0, 1.0)))
    written["overlay"] = write_output(out_dir, outs["overlay"],
                                      overlay_png(prepared.slices, restorations, maps, scores, kind=kind,
                                                  row_names=input_slice_names(prepared.geometry),
                                                  case=plan.case.name, vmax=overlay_max,
                                                  orientation=prepared.geometry.get("orientation", "RAS")))
    if "model_space" in outs:
        written["model_space"] = write_output(out_dir, outs["model_space"], npz_bytes(model_space or {}))
    return written


def write_record(out_dir: Path, plan: CasePlan, record: dict[str, Any]) -> None:
    path = out_dir / plan.record
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


def remove_outputs(out_dir: Path, plan: CasePlan) -> None:
    """Delete a case's outputs (before recomputing, or after it failed): never leave stale maps
    that look new. The record goes first, so an interruption here cannot leave a record whose
    outputs are gone (it would be distrusted anyway). Files the old record lists but this run
    does not plan (a rerun with --no-restoration) go too."""
    old = read_record(out_dir / plan.record)
    if old is not None and old.get("case") == plan.case.name:
        remove_record_and_outputs(out_dir, old)
    for rel in [plan.record, *plan.outputs.values()]:
        (out_dir / rel).unlink(missing_ok=True)


def remove_record_and_outputs(out_dir: Path, record: dict[str, Any]) -> None:
    """Delete a case known only by its record (a case this run does not plan): record first, as above."""
    rels = [record_path(record["case"])]
    rels += [entry["path"] for entry in (record.get("outputs") or {}).values()
             if isinstance(entry, dict) and isinstance(entry.get("path"), str)]
    for rel in rels:
        parts = PurePosixPath(rel).parts
        # a record is data: only relative paths without "..", judged as written (a symlinked
        # records/ or maps/ folder the user set up is still inside OUT)
        if rel and "\x00" not in rel and not PurePosixPath(rel).is_absolute() and ".." not in parts:
            (out_dir / rel).unlink(missing_ok=True)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A ``.npz`` (readable by ``np.load``) with fixed zip timestamps: same arrays, same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


TEMP_GRACE_S = 600.0  # a temporary file younger than this may belong to a live writer on another node


def clean_orphans(out_dir: Path, dead_writers_only: bool = False) -> int:
    """Remove temporary files a killed run left in the output folder. A whole-folder run, which holds the
    folder alone, removes every one in the case output folders; elsewhere (the folder's top level and
    ``eval-overlays/``, which condiff-eval writes without the run's lock) and with ``dead_writers_only`` (a shard,
    ``--merge``, condiff-eval: other runs may be writing) only those whose writer process has exited and
    that are older than ``TEMP_GRACE_S``. Returns how many were removed."""
    import re

    from condiff.io.atomic import TEMP_NAME, temp_writer_pid
    from condiff.io.lock import process_exited

    def writer_gone(path: Path) -> bool:
        # the name's pid is checked on this host only, and another node may write the same folder: a file
        # also has to be older than any write takes (an interrupted run's leftovers are removed later)
        pid = temp_writer_pid(path.name)
        try:
            old = time.time() - path.stat().st_mtime > TEMP_GRACE_S
        except OSError:
            return False
        return pid is not None and old and process_exited(pid)

    def remove(path: Path) -> int:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # not ours to remove (another user's folder): leave it, say so
            logger.warning("%s: could not remove a temporary file left by an interrupted run (%s)", path, exc.strerror)
            return 0
        return 1

    n = 0
    owned = [out_dir / folder for folder in OUTPUT_FOLDERS] + sorted(out_dir.glob("sub-*"))  # sub-*: --layout bids
    shared = [out_dir / "eval-overlays"]
    for root in owned + shared:
        if not root.is_dir():
            continue
        for p in root.rglob(".*.tmp"):
            if (dead_writers_only or root in shared) and not writer_gone(p):
                continue
            n += remove(p)
    for p in out_dir.glob(".*.tmp"):
        m = TEMP_NAME.fullmatch(p.name)
        tables = m is not None and re.fullmatch(r"cases\.csv|scores\.csv|run(?:\.\d+-of-\d+)?\.json", m.group("final"))
        # the tables are a whole-folder run's alone, but a --merge begun before it took the lock may still write
        pid = temp_writer_pid(p.name)
        if (tables and not dead_writers_only and pid is not None and process_exited(pid)) or writer_gone(p):
            n += remove(p)
    if n:
        logger.info("removed %d temporary files left by an interrupted run", n)
    return n


# ----------------------------------------------------------------------------------------- tables


def load_records(out_dir: Path) -> list[dict[str, Any]]:
    """Every readable record under OUT/records, sorted by case name."""
    root = out_dir / "records"
    if not root.is_dir():
        return []
    records = []
    for path in root.rglob("*.json"):
        if path.name.startswith("."):
            continue
        rec = read_record(path)
        if rec is None:
            logger.warning("%s: unreadable record ignored (the case will be recomputed)", path)
            continue
        records.append(rec)
    return sorted(records, key=lambda r: r.get("case", ""))


def _num(x: Any) -> str:
    return "" if x is None else repr(float(x))


def _join(values: Iterable[Any] | None, fmt=str) -> str:
    return "" if not values else "x".join(fmt(v) for v in values)


def case_row(rec: dict[str, Any]) -> list[str]:
    return [
        rec.get("case", ""), rec.get("input", ""), rec.get("input_sha256") or "", rec.get("status", ""),
        rec.get("error_type") or "", rec.get("error") or "", rec.get("kind", ""),
        _join(rec.get("shape")), _join(rec.get("spacing"), lambda v: f"{float(v):.6g}"), rec.get("orientation") or "",
        "" if rec.get("n_slices") is None else str(rec["n_slices"]), _num(rec.get("score")),
        _num(rec.get("max_slice_score")), _num(rec.get("map_max")), "" if rec.get("members") is None else str(len(rec["members"])),
        "" if rec.get("seed") is None else str(rec["seed"]), rec.get("engine") or "", rec.get("precision") or "",
        "; ".join(rec.get("warnings") or []),
    ]


def _csv_text(header: list[str], rows: Iterable[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _slice_position(rec: dict[str, Any], k: int) -> list[str]:
    """[axis, index] of a record's canonical slice ``k`` in its input file's numbering."""
    geometry = rec.get("geometry") or {}
    if geometry.get("kind") != "volume":
        return ["", str(int(k))]
    from condiff.preprocess import input_slice

    return [str(v) for v in input_slice(geometry, k)]


def rebuild_tables(out_dir: Path, records: list[dict[str, Any]] | None = None) -> dict[str, int]:
    """Rewrite ``cases.csv`` and ``scores.csv`` from all records (``records``: already loaded by
    ``load_records``); returns counts by status."""
    records = load_records(out_dir) if records is None else records
    score_rows: list[list[str]] = []
    for rec in records:
        if rec.get("status") != "ok":
            continue
        score_rows.append([rec["case"], "", "", _num(rec.get("score"))])
        score_rows.extend([rec["case"], *_slice_position(rec, k), _num(s)] for k, s in rec.get("slice_scores", []))
    write_text_atomic(out_dir / "cases.csv", _csv_text(CASES_COLUMNS, (case_row(r) for r in records)))
    write_text_atomic(out_dir / "scores.csv", _csv_text(SCORES_COLUMNS, score_rows))
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec.get("status", "?")] = counts.get(rec.get("status", "?"), 0) + 1
    return counts


def write_run_json(out_dir: Path, doc: dict[str, Any], shard: tuple[int, int] | None = None) -> Path:
    path = out_dir / run_json_name(shard)
    write_text_atomic(path, dumps_json(doc))
    return path


__all__ = ["OutputLock", "check_creatable", "free_space_warning", "ensure_writable", "write_output", "write_case_files", "write_record", "remove_outputs", "npz_bytes",
           "remove_record_and_outputs", "clean_orphans", "load_records", "rebuild_tables", "write_run_json", "run_json_name", "shard_suffix",
           "CASES_COLUMNS", "SCORES_COLUMNS"]
