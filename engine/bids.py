"""``--layout bids``: maps and restorations as a BIDS derivative dataset (ecosystem B.4).

OUT is then meant as ``<dataset>/derivatives/condiff``; each BIDS-named input volume
``sub-<label>[_ses-<label>]..._<suffix>.nii[.gz]`` gives

    sub-<label>/[ses-<label>/]<datatype>/<entities>_desc-anomaly_<suffix>.nii[.gz]    the map
    sub-<label>/[ses-<label>/]<datatype>/<entities>_desc-restored_<suffix>.nii[.gz]   the restoration

plus ``dataset_description.json`` (DatasetType "derivative", GeneratedBy condiff) and a ``.bidsignore``
naming condiff's own files (overlays, records, tables, logs), which keep their usual places. BIDS
has no suffix for an anomaly map, so the source's suffix stays and ``desc`` tells the kind. A source
that already has ``desc-<label>`` keeps it inside the new one (``desc-<label>Anomaly``), so two
inputs never end on one output name. Discovery skips the dataset's ``derivatives/``, ``sourcedata/``
and ``code/`` folders, so OUT may live inside the input dataset.
"""
from __future__ import annotations

import json
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
              "condiff.log", "metrics-*", ".condiff.lock*")
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


def dataset_description(inputs: Iterable[str | Path], version: str) -> dict:
    """The derivative dataset's description; deterministic (no dates), so reruns rewrite the same bytes."""
    sources = [{"URL": Path(p).resolve().as_uri()} for p in inputs if Path(p).is_dir()]
    doc = {"Name": "condiff anomaly maps", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
           "GeneratedBy": [{"Name": "condiff", "Version": version,
                            "Description": "image-conditioned diffusion restoration and SSIM anomaly maps "
                                           "(Baugh et al., 2024)"}]}
    if sources:
        doc["SourceDatasets"] = sources
    return doc


def write_dataset_files(out_dir: Path, inputs: Iterable[str | Path]) -> None:
    """``dataset_description.json`` and ``.bidsignore`` in OUT (atomically)."""
    from condiff import __version__
    from condiff.io.atomic import write_bytes_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dataset_description(inputs, __version__), indent=2) + "\n"
    write_bytes_atomic(out_dir / "dataset_description.json", text.encode())
    write_bytes_atomic(out_dir / ".bidsignore", ("\n".join(BIDSIGNORE) + "\n").encode())


__all__ = ["BidsName", "parse_name", "derived_stem", "derivative_paths", "check_cases", "dataset_description",
           "write_dataset_files", "EXCLUDE", "RESERVED_FOLDERS", "BIDSIGNORE", "contrasts"]
