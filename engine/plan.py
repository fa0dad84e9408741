"""Cases -> planned outputs, and whether a case's earlier outputs can be trusted (resume).

A case is done when ``records/<case>.json`` exists (it is written last) and still proves it:
same input digest (and brain-mask digest), same model-set digest, same option digest, and every
output file it lists still has the digest it recorded. Anything else is recomputed. The option
digest covers exactly what changes output bytes (engine, precision, device type, sampler,
steps, members, seed, what is written, preprocessing); batch size and sharding are left out
because results never depend on them.
"""
from __future__ import annotations

import hashlib
import json
import os
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from condiff.errors import CondiffError, InputImageError, OutputConflictError
from condiff.io.atomic import NAME_MAX, check_regular, fit_name, name_bytes
from condiff.io.cases import Case, find_mask, split_suffix

RECORD_SCHEMA = "condiff.record/1"
OUTPUT_FOLDERS = ("maps", "restorations", "overlays", "model_space", "records")


def sha256_path(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes; an unreadable file, or one that is not a regular file (a FIFO or
    device would never end), is an ``InputImageError`` naming it."""
    check_regular(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as exc:
        raise InputImageError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class RunOptions:
    """The options that decide output bytes; their digest goes into every record."""

    engine: str = "torch"
    precision: str = "fp32"
    device_type: str = "cpu"
    sampler: str = "ddpm"
    steps: int = 50
    members: tuple[int, ...] = (0,)
    seed: int = 0
    mask: str | None = None  # the --mask pattern ('auto' by default), None without a mask
    restoration: bool = True
    model_space: bool = False
    member_maps: bool = False
    nan_policy: str = "error"
    preprocessing: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    fast_kernels: str = "torch"  # --fast-kernels: torch | triton (the fast engine's attention and GroupNorm)
    layout: str = "flat"  # --layout: flat (DESIGN §3) | bids (engine/bids.py); it decides the output paths
    volume_index: int | None = None  # --volume-index: which volume of a 4-D series (None: 3-D inputs only)
    overlay_max: float | None = None  # --overlay-max: a fixed top of the preview colour scale (None: per case)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["members"] = list(self.members)
        for key, default in (("fast_kernels", "torch"), ("layout", "flat"), ("volume_index", None), ("overlay_max", None)):
            if d[key] == default:
                del d[key]  # absent at its default, so records written before it existed stay current
        return d

    def digest(self) -> str:
        return _digest(self.to_dict())

    def case_digest(self, nonfinite_voxels: int | None = None, series_volumes: int | None = None) -> str:
        """The digest of the options that decide one case's bytes: ``--nan-policy`` only matters for a file
        with NaN/Inf voxels and ``--volume-index`` only for a 4-D series, so a rerun that adds either (as
        the errors of such files advise) keeps every other finished case. None: not known, both count."""
        d = self.to_dict()
        if nonfinite_voxels == 0:
            d.pop("nan_policy")
        if series_volumes == 1:
            d.pop("volume_index", None)
        return _digest(d)


def _digest(options: dict[str, Any]) -> str:
    text = json.dumps(options, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class CasePlan:
    """Where one case's outputs go: ``outputs`` kind -> path relative to OUT (``/``-separated)."""

    case: Case
    outputs: dict[str, str]
    record: str


def record_path(case_name: str) -> str:
    """Where a case's record lives, relative to OUT (``/``-separated), whatever the layout. A case name too
    long for ``<name>.json`` gets its name cut, plus a digest of the whole name (records are read by their
    ``case`` field, never by file name): even a case whose outputs cannot be named gets its failed
    record, and so its ``cases.csv`` row."""
    folder, _, base = case_name.rpartition("/")
    name = f"{base}.json"
    if name_bytes(name) > NAME_MAX:
        digest = hashlib.sha256(os.fsencode(case_name)).hexdigest()[:16]
        name = f"{fit_name(base, NAME_MAX - len(digest) - 6)}~{digest}.json"
    return f"records/{folder}/{name}" if folder else f"records/{name}"


def check_output_names(plan: CasePlan) -> None:
    """Refuse a case whose output file names cannot exist (longer than ``NAME_MAX`` bytes, as a long input name
    plus an output's extension can be): an ``InputImageError`` naming the input, before any work."""
    for rel in plan.outputs.values():
        name = rel.rsplit("/", 1)[-1]
        if name_bytes(name) > NAME_MAX:
            raise InputImageError(plan.case.path, f"its output file name {name!r} would be {name_bytes(name)} bytes "
                                                  f"long; file names may have at most {NAME_MAX}",
                                  "Rename the input file to a shorter name")


def plan_case(case: Case, options: RunOptions) -> CasePlan:
    """Output paths of ``case`` (DESIGN §3): volumes mirror their extension, images get TIFF + PNG."""
    name = case.name
    out: dict[str, str] = {}
    if options.layout == "bids":
        from .bids import derivative_paths

        paths = derivative_paths(case)  # BIDS-named volumes only (checked before any work)
        out["map"] = paths["map"]
        if options.restoration:
            out["restoration"] = paths["restoration"]
    elif case.kind == "volume":
        _, suffix = split_suffix(case.path.name)
        ext = ".nii" if suffix == ".nii" else ".nii.gz"
        out["map"] = f"maps/{name}{ext}"
        if options.restoration:
            out["restoration"] = f"restorations/{name}{ext}"
    else:
        out["map"] = f"maps/{name}.tiff"
        out["map_png"] = f"maps/{name}.png"
        if options.restoration:
            out["restoration"] = f"restorations/{name}.tiff"
            out["restoration_png"] = f"restorations/{name}.png"
    out["overlay"] = f"overlays/{name}.png"
    if options.model_space or options.member_maps:
        out["model_space"] = f"model_space/{name}.npz"
    return CasePlan(case=case, outputs=out, record=record_path(name))


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """A record as a dict, or None when it is missing or unreadable (then the case is recomputed)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("schema") == RECORD_SCHEMA else None


AUTO_MASK = "auto"
AUTO_MASK_PATTERN = "{dir}/{stem}_brainmask.nii.gz"


def takes_mask(case, pattern: str | None) -> bool:
    """Whether ``case`` looks for a mask file: volumes under any pattern (``auto`` included); photos only
    under an explicit pattern (a field-of-view mask: ``auto``'s ``_brainmask.nii.gz`` is a volume's)."""
    return pattern is not None and (case.kind == "volume" or pattern != AUTO_MASK)


def resolve_mask_path(case, pattern: str | None):
    """The mask file for a case: ``auto`` takes ``{dir}/{stem}_brainmask.nii.gz`` where it exists
    (None otherwise); any other pattern must resolve to a file."""
    if pattern is None:
        return None
    if pattern == AUTO_MASK:
        return find_mask(case, AUTO_MASK_PATTERN, required=False)
    return find_mask(case, pattern)


def digest_for_record(options: RunOptions, rec: dict[str, Any]) -> str:
    """This run's options digest as ``rec``'s case counts it (same input bytes, so the record's NaN count and
    series length hold for this run too). A record written before those were recorded has the digest of
    every option; an ok one made with ``--nan-policy error`` had no NaN, one without ``--volume-index`` was 3-D."""
    if "nonfinite_voxels" in rec or "series_volumes" in rec:
        return options.case_digest(rec.get("nonfinite_voxels"), rec.get("series_volumes"))
    old = rec.get("options") or {}
    same = {}
    if old.get("nan_policy", "error") == "error":
        same["nan_policy"] = "error"
    if old.get("volume_index") is None:
        same["volume_index"] = None
    return dataclasses.replace(options, **same).digest()


def resume_check(out_dir: Path, plan: CasePlan, *, input_sha256: str, mask_sha256: str | None,
                 model_set_digest: str, options: RunOptions, network_digest: str | None = None) -> str | None:
    """None when the case's record proves its outputs current; otherwise why it must be recomputed.
    ``network_digest`` (``ModelSet.network_digest``) is compared where the record holds one (records
    written before it was recorded cannot tell)."""
    rec = read_record(out_dir / plan.record)
    if rec is None:
        return "no record"
    if rec.get("status") != "ok":
        return "failed before"
    options_digest = digest_for_record(options, rec)
    for key, want in (("input_sha256", input_sha256), ("mask_sha256", mask_sha256),
                      ("model_set_digest", model_set_digest), ("options_digest", options_digest)):
        if rec.get(key) != want:
            return f"{key.replace('_', ' ')} changed"
    if network_digest is not None and rec.get("network_digest") not in (None, network_digest):
        return "network config changed"
    outputs = rec.get("outputs") or {}
    if {k: v.get("path") for k, v in outputs.items()} != plan.outputs:
        return "different outputs planned"
    for kind, entry in outputs.items():
        path = out_dir / entry["path"]
        if not path.is_file():
            return f"{entry['path']} missing"
        if sha256_path(path) != entry.get("sha256"):
            return f"{entry['path']} changed"
    return None


def parse_members(text: str | None, n_available: int) -> list[int]:
    """``None`` -> all; ``"3"`` -> the first 3; ``"0,2"`` (any comma) -> exactly those, in order.

    A single member by index is written with a trailing comma: ``"2,"``.
    """
    if text is None or text.strip() == "":
        return list(range(n_available))
    text = text.strip()
    try:
        if "," in text:
            idx = [int(p) for p in text.split(",") if p.strip() != ""]
        else:
            count = int(text)
            if not 1 <= count <= n_available:
                raise ValueError
            return list(range(count))
    except ValueError:
        raise ValueError(f"--members {text!r}: give a count (1..{n_available}) or indices like '0,2'") from None
    if not idx or len(set(idx)) != len(idx) or any(not 0 <= i < n_available for i in idx):
        raise ValueError(f"--members {text!r}: indices must be distinct and in 0..{n_available - 1}")
    return idx


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N: this process takes sorted cases k with k % N == I."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def select_shard(cases: Sequence[Case], index: int, count: int) -> list[Case]:
    """A deterministic split: cases sorted by name, case k goes to shard k % count."""
    ordered = sorted(cases, key=lambda c: c.name)
    return [c for k, c in enumerate(ordered) if k % count == index]


def check_output_location(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike],
                          excluded_folders: Sequence[str] = ()) -> None:
    """Refuse an output folder that is a file, or equal to / inside an input folder (unless inside
    one of its ``excluded_folders``, which discovery skips: a BIDS dataset's ``derivatives``; at a
    BIDS dataset's root, marked by its ``dataset_description.json``, discovery skips them in any layout)."""
    from condiff.io.cases import BIDS_RESERVED_FOLDERS, is_bids_root

    out = Path(os.path.realpath(out_dir))
    if out.exists() and not out.is_dir():
        raise OutputConflictError(out_dir, "exists and is not a folder", "give a folder for -o")
    for item in inputs:
        item_path = Path(item)
        if not item_path.is_dir():
            continue
        root = Path(os.path.realpath(item_path))
        skipped = tuple(excluded_folders) + (BIDS_RESERVED_FOLDERS if is_bids_root(root) else ())
        if any(root / folder == out or root / folder in out.parents for folder in skipped):
            continue
        if out == root or root in out.parents:
            raise OutputConflictError(out_dir, f"is inside the input folder {item}",
                                      "write outputs outside the input folders, so a rerun never reads its own maps")


# ----------------------------------------------------------------------------------------- dry run


def check_input(case: Case, ctx, mask_path: Path | None = None) -> str | None:
    """``--dry-run``'s check: None if the run would accept the case, else the reason.

    Reads the file (and its brain mask) completely and preprocesses it with the run's own code
    (``pipeline.read_case``), so truncated or corrupt data, NaN voxels, a mask on another grid or a
    scan without foreground are named now, not hours into a run; no model is loaded. ``mask_path``:
    the case's brain mask as ``resolve_mask_path`` found it.
    """
    from .pipeline import read_case

    try:
        read_case(case, ctx, mask_path)
    except CondiffError as exc:
        return exc.message
    except Exception as exc:
        return f"{case.path}: unreadable ({type(exc).__name__}: {exc})"
    return None


def dry_run_status(case: Case, ctx) -> tuple[str, str | None, CasePlan]:
    """("run" | "skip" | "invalid", reason, plan) for one case, loading no model (``ctx``: a RunContext).
    A case whose outputs are current is "skip" without reading it again (the run will not either)."""
    plan = plan_case(case, ctx.options)
    reason = "--overwrite"
    try:
        check_output_names(plan)
        mask_path = None
        if takes_mask(case, ctx.mask_pattern):
            mask_path = resolve_mask_path(case, ctx.mask_pattern)
        if ctx.resume:
            mask_sha = None if mask_path is None else sha256_path(mask_path)
            reason = resume_check(ctx.out_dir, plan, input_sha256=sha256_path(case.path), mask_sha256=mask_sha,
                                  model_set_digest=ctx.model_set.digest, options=ctx.options,
                                  network_digest=ctx.model_set.network_digest)
    except CondiffError as exc:
        return "invalid", exc.message, plan
    if reason is None:
        return "skip", "outputs up to date", plan
    problem = check_input(case, ctx, mask_path)
    if problem is not None:
        return "invalid", problem, plan
    return "run", reason, plan


__all__ = ["RECORD_SCHEMA", "OUTPUT_FOLDERS", "RunOptions", "CasePlan", "record_path", "check_output_names", "plan_case", "read_record", "resume_check",
           "sha256_path", "sha256_bytes", "parse_members", "parse_shard", "select_shard", "check_output_location",
           "check_input", "dry_run_status"]
