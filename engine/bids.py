"""``--layout bids``: maps and restorations as a BIDS derivative dataset (ecosystem B.4).

OUT is then meant as ``<dataset>/derivatives/condiff``; each BIDS-named input volume
``sub-<label>[_ses-<label>]..._<suffix>.nii[.gz]`` gives

    sub-<label>/[ses-<label>/]<datatype>/<entities>_desc-anomaly_<suffix>.nii[.gz]    the map
    sub-<label>/[ses-<label>/]<datatype>/<entities>_desc-restored_<suffix>.nii[.gz]   the restoration

plus ``dataset_description.json`` (DatasetType "derivative", GeneratedBy condiff) and a ``.bidsignore``
naming condiff's own files (overlays, records, tables, logs), which keep their usual places; each map
and restoration gets a JSON sidecar (``Description``, ``Sources`` as BIDS URIs resolved through the
description's ``DatasetLinks``, and the run's settings), made from the records. BIDS
has no suffix for an anomaly map, so the source's suffix stays and ``desc`` tells the kind. A source
that already has ``desc-<label>`` keeps it inside the new one (``desc-<label>Anomaly``), so two
inputs never end on one output name. Discovery skips the dataset's ``derivatives/``, ``sourcedata/``
and ``code/`` folders, so OUT may live inside the input dataset.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from condiff.io.cases import BIDS_EXCLUDE, BIDS_RESERVED_FOLDERS, Case, split_suffix

BIDS_VERSION = "1.9.0"
DATATYPES = ("anat", "func", "dwi", "fmap", "perf", "pet")
RESERVED_FOLDERS = BIDS_RESERVED_FOLDERS  # never inputs in a BIDS dataset (skipped at a dataset's root by any layout)
EXCLUDE = BIDS_EXCLUDE
BIDSIGNORE = ("overlays/", "records/", "model_space/", "eval-overlays/", "cases.csv", "scores.csv", "run*.json",
              "condiff.log", "metrics-*", ".condiff.lock*", ".condiff-eval.lock")
_ENTITY = re.compile(r"^([a-z]+)-([a-zA-Z0-9]+)$")
_SUFFIX = re.compile(r"^[a-zA-Z0-9]+$")


@dataclass(frozen=True)
class BidsName:
    entities: tuple[tuple[str, str], ...]  # (key, label) in file order, "sub" first
    suffix: str                            # e.g. "T1w"
    extension: str                         # ".nii" or ".nii.gz"


def parse_name(filename: str) -> BidsName | None:
    """The entities of a BIDS NIfTI file name, or None when the name is not one."""
    stem, ext = split_suffix(filename)
    if ext not in (".nii", ".nii.gz"):
        return None
    *parts, suffix = stem.split("_")
    pairs = []
    for part in parts:
        match = _ENTITY.match(part)
        if match is None:
            return None
        pairs.append((match.group(1), match.group(2)))
    keys = [k for k, _ in pairs]
    if not pairs or keys[0] != "sub" or len(set(keys)) != len(keys) or not _SUFFIX.match(suffix):
        return None
    return BidsName(tuple(pairs), suffix, ext)


def contrasts(cases: Sequence[Case]) -> dict[str, int]:
    """How many BIDS-named volume cases of each suffix (``T1w``, ``T2w``, ``FLAIR``, ...), most common first."""
    from collections import Counter

    found = Counter(n.suffix for n in (parse_name(c.path.name) for c in cases if c.kind == "volume") if n is not None)
    return dict(found.most_common())


def derived_stem(name: BidsName, desc: str) -> str:
    """``sub-01_ses-1_T1w`` + ``anomaly`` -> ``sub-01_ses-1_desc-anomaly_T1w`` (desc is the last entity)."""
    old = dict(name.entities).get("desc")
    label = desc if old is None else old + desc[:1].upper() + desc[1:]
    pairs = [(k, v) for k, v in name.entities if k != "desc"] + [("desc", label)]
    return "_".join(f"{k}-{v}" for k, v in pairs) + "_" + name.suffix


def folder_of(name: BidsName, path: Path) -> str:
    """``sub-<label>/[ses-<label>/]<datatype>``: the datatype folder the source sits in (``anat`` if none)."""
    entities = dict(name.entities)
    parts = [f"sub-{entities['sub']}"] + ([f"ses-{entities['ses']}"] if "ses" in entities else [])
    datatype = path.parent.name if path.parent.name in DATATYPES else "anat"
    return "/".join([*parts, datatype])


def derivative_paths(case: Case) -> dict[str, str]:
    """Paths (relative to OUT) of a case's map and restoration in the BIDS layout."""
    name = parse_name(case.path.name)
    if name is None:
        raise ValueError(f"{case.path}: not a BIDS-named NIfTI file")
    folder = folder_of(name, case.path)
    return {kind: f"{folder}/{derived_stem(name, desc)}{name.extension}"
            for kind, desc in (("map", "anomaly"), ("restoration", "restored"))}


def check_cases(cases: Sequence[Case]) -> None:
    """Refuse (ValueError listing every file) inputs that are not BIDS-named volumes, or two inputs
    whose derivative names coincide (the same scan as .nii and .nii.gz in two copies, say)."""
    problems = [f"{c.path}: not a BIDS-named NIfTI volume (sub-<label>_..._<suffix>.nii[.gz])"
                for c in cases if c.kind != "volume" or parse_name(c.path.name) is None]
    if not problems:
        owners: dict[str, Path] = {}
        for c in cases:
            target = derivative_paths(c)["map"].lower()
            if target in owners:
                problems.append(f"{owners[target]} and {c.path} would both write {derivative_paths(c)['map']}")
            owners.setdefault(target, c.path)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError("--layout bids: " + "; ".join(shown))


def dataset_description(inputs: Iterable[str | Path], version: str, links: dict[str, str] | None = None) -> dict:
    """The derivative dataset's description; deterministic (no dates), so reruns rewrite the same bytes.
    ``links``: DatasetLinks, the source datasets the sidecars' BIDS URIs name."""
    sources = [{"URL": Path(p).resolve().as_uri()} for p in inputs if Path(p).is_dir()]
    doc = {"Name": "condiff anomaly maps", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
           "GeneratedBy": [{"Name": "condiff", "Version": version,
                            "Description": "image-conditioned diffusion restoration and SSIM anomaly maps "
                                           "(Baugh et al., 2024)"}]}
    if links:
        doc["DatasetLinks"] = dict(sorted(links.items()))
    if sources:
        doc["SourceDatasets"] = sources
    return doc


def write_dataset_files(out_dir: Path, inputs: Iterable[str | Path]) -> None:
    """``dataset_description.json`` (keeping the DatasetLinks of the sidecars already there) and
    ``.bidsignore`` in OUT (atomically)."""
    from condiff.io.atomic import write_bytes_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_description(out_dir, inputs, None)
    write_bytes_atomic(out_dir / ".bidsignore", ("\n".join(BIDSIGNORE) + "\n").encode())


def _write_description(out_dir: Path, inputs: Iterable[str | Path] | None, links: dict[str, str] | None) -> None:
    """``inputs`` None keeps the file's SourceDatasets, ``links`` None its DatasetLinks."""
    from condiff import __version__
    from condiff.io.atomic import write_bytes_atomic

    path = out_dir / "dataset_description.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    old = old if isinstance(old, dict) else {}
    if links is None and isinstance(old.get("DatasetLinks"), dict):
        links = old["DatasetLinks"]
    doc = dataset_description(inputs or [], __version__, links)
    if inputs is None and isinstance(old.get("SourceDatasets"), list):
        doc["SourceDatasets"] = old["SourceDatasets"]
    write_bytes_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())


# ----------------------------------------------------------------------------------------- sidecars
# BIDS says each derivative file SHOULD have a JSON sidecar naming its Sources as BIDS URIs
# (``bids:<dataset>:<path within it>``, the dataset resolved through dataset_description.json's
# DatasetLinks). They are made from the records at the end of every run and by ``--merge``, so they
# follow cases that were skipped, moved, recomputed or failed, and cost nothing in the resume check.

SIDECAR_MARK = "CondiffVersion"  # only JSON files carrying it are condiff's to replace or remove
_LINK_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def sidecar_path(rel: str) -> str:
    """``.../x_desc-anomaly_T1w.nii.gz`` -> ``.../x_desc-anomaly_T1w.json``."""
    stem, _ = split_suffix(rel)
    return stem + ".json"


def dataset_root(path: Path, known: dict[Path, bool] | None = None) -> Path | None:
    """The nearest folder above ``path`` holding ``dataset_description.json`` (a BIDS dataset), or None.
    ``known``: folders already looked at (a cohort's files share their few parents)."""
    from condiff.io.cases import is_bids_root

    known = {} if known is None else known
    for folder in path.parents:
        if folder not in known:
            known[folder] = is_bids_root(folder)
        if known[folder]:
            return folder
    return None


def link_name(root: Path, out_dir: Path) -> str:
    """The DatasetLinks name of a source dataset: ``raw`` for the dataset OUT is the derivative of (OUT =
    ``<root>/derivatives/<name>``, the layout BIDS recommends), else its folder name plus a digest of its
    path (two sites' ``rawdata/`` stay apart). A pure function of the paths, so every shard agrees."""
    import hashlib

    if Path(os.path.abspath(out_dir)).parent.parent == root:
        return "raw"
    base = _LINK_CHARS.sub("-", root.name).strip("-") or "source"
    return f"{base}-{hashlib.sha256(os.fsencode(root.as_posix())).hexdigest()[:8]}"


def link_target(root: Path, out_dir: Path) -> str:
    """Where a link points: relative to OUT when OUT lies inside the dataset (so the pair moves
    together), else the dataset's file URI."""
    out_abs = Path(os.path.abspath(out_dir))
    if root in out_abs.parents:
        return Path(os.path.relpath(root, out_abs)).as_posix()
    return root.as_uri()


def _bids_uri(path_text: str | None, out_dir: Path, links: dict[str, str], known: dict[Path, bool]) -> str | None:
    if not path_text:
        return None
    path = Path(path_text)
    root = dataset_root(path, known)
    if root is None:
        return None
    name = link_name(root, out_dir)
    links[name] = link_target(root, out_dir)
    return f"bids:{name}:{path.relative_to(root).as_posix()}"


def sidecars_of(record: dict, out_dir: Path, links: dict[str, str],
                known: dict[Path, bool] | None = None) -> dict[str, dict]:
    """The sidecars (path relative to OUT -> document) of one ok record; adds the links they use to ``links``.
    An input outside any BIDS dataset (loose files) has no BIDS URI, so no ``Sources``."""
    outputs = record.get("outputs") or {}
    known = {} if known is None else known
    sources = [uri for uri in (_bids_uri(record.get("input"), out_dir, links, known),
                               _bids_uri(record.get("mask"), out_dir, links, known)) if uri]
    common = {SIDECAR_MARK: record.get("condiff_version"), "ModelSetDigest": record.get("model_set_digest"),
              "Members": record.get("members"), "Sampler": record.get("sampler"), "Steps": record.get("steps"),
              "Seed": record.get("seed"), "Engine": record.get("engine"), "Precision": record.get("precision")}
    docs: dict[str, dict] = {}
    rest = (outputs.get("restoration") or {}).get("path")
    if rest:
        docs[sidecar_path(rest)] = {
            "Description": "condiff pseudo-healthy restoration: each analysed slice restored by the image-conditioned "
                           "diffusion model, averaged over the members, in the input's intensity units; 0 on slices "
                           "not analysed",
            **({"Sources": sources} if sources else {}), **common}
    m = (outputs.get("map") or {}).get("path")
    if m:
        docs[sidecar_path(m)] = {
            "Description": "condiff anomaly map: 1 - SSIM between each analysed slice and its restoration, averaged "
                           "over the members (higher: more anomalous); 0 outside the brain mask and on slices not "
                           "analysed",
            **({"Sources": sources + ([f"bids::{rest}"] if rest else [])} if sources or rest else {}),
            "CaseScore": record.get("score"), **common}
    return docs


def write_sidecars(out_dir: Path, records: Sequence[dict], inputs: Iterable[str | Path] | None = None) -> int:
    """Sidecars for every ok record's map and restoration, DatasetLinks for the datasets they name (in
    ``dataset_description.json``), and removal of condiff's sidecars whose case is gone or failed.
    ``inputs``: this run's inputs for SourceDatasets (None, as in ``--merge``: kept from the file).
    Returns how many sidecar files were (re)written."""
    from condiff.io.atomic import dumps_json, write_text_atomic

    links: dict[str, str] = {}
    wanted: dict[str, str] = {}
    known: dict[Path, bool] = {}
    old_links = _read_json(out_dir / "dataset_description.json").get("DatasetLinks") or {}
    for rec in records:
        if rec.get("status") == "ok":
            moved = bool(rec.get("input")) and not Path(rec["input"]).exists()
            for rel, doc in sidecars_of(rec, out_dir, links, known).items():
                if moved:  # a dataset moved since its record was written (no run has repointed it yet, e.g. a
                    # --merge): its sources cannot be found from the record, so the sidecar keeps what it said
                    _keep_sources(doc, _read_json(out_dir / rel), old_links, links)
                wanted[rel] = dumps_json(doc)
    written = 0
    for rel, text in wanted.items():
        path = out_dir / rel
        try:
            same = path.read_text(encoding="utf-8") == text
        except (OSError, UnicodeDecodeError):
            same = False
        if not same:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)
            written += 1
    for folder in sorted(out_dir.glob("sub-*")):
        for path in folder.rglob("*.json"):
            rel = path.relative_to(out_dir).as_posix()
            # only beside a data file that is gone (a failed or removed case): a shard's older view of the
            # records must not remove the sidecars another shard has just written with its map
            if rel not in wanted and _is_condiff_sidecar(path) and not _data_file_of(path).exists():
                path.unlink(missing_ok=True)
    _write_description(out_dir, inputs, links)
    return written


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _is_condiff_sidecar(path: Path) -> bool:
    return SIDECAR_MARK in _read_json(path)


def _data_file_of(sidecar: Path) -> Path:
    """The NIfTI a sidecar describes (``.nii.gz`` if present, else ``.nii``)."""
    stem = sidecar.with_suffix("")
    gz = stem.with_name(stem.name + ".nii.gz")
    return gz if gz.exists() else stem.with_name(stem.name + ".nii")


def _keep_sources(doc: dict, old: dict, old_links: dict, links: dict[str, str]) -> None:
    """``doc`` takes the earlier sidecar's ``Sources``, and ``links`` the DatasetLinks they name."""
    sources = old.get("Sources")
    if not isinstance(sources, list) or SIDECAR_MARK not in old:
        return
    doc["Sources"] = sources
    for uri in sources:
        name = uri.split(":")[1] if isinstance(uri, str) and uri.count(":") >= 2 else ""
        if name and isinstance(old_links.get(name), str):
            links.setdefault(name, old_links[name])


__all__ = ["BidsName", "parse_name", "derived_stem", "derivative_paths", "check_cases", "dataset_description",
           "write_dataset_files", "write_sidecars", "sidecars_of", "sidecar_path", "EXCLUDE", "RESERVED_FOLDERS", "BIDSIGNORE", "contrasts"]
