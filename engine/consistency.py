"""One output folder, one method: refuse to mix results of different model sets or methods.

``cases.csv`` and ``condiff-eval`` pool every record in ``OUT/records``, including cases the
current run does not touch. If a folder held cases made with another model set, seed, sampler,
step count, member subset, brain-mask rule or preprocessing, the tables and the evaluation would
silently average two methods. So ``condiff-infer`` stops (exit 2) when such records exist, and
``--overwrite`` replaces them (ecosystem.md C.27). Options that only change how a result is
computed (engine, precision, device: equal up to rounding) or which files are written
(restorations, model space, layout) are not a different method: a rerun with them recomputes
its own cases as before.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from condiff.errors import CondiffError

logger = logging.getLogger(__name__)

# RunOptions fields that change what a map means, not just its last bits or which files exist
METHOD_OPTIONS = ("sampler", "steps", "members", "seed", "mask", "preprocessing", "schedule", "volume_index")


def method_keys(record: dict[str, Any]) -> tuple[str, ...]:
    """The method options that apply to a record's case: ``volume_index`` picks nothing in a 3-D file."""
    legacy = 1 if record.get("status") == "ok" and (record.get("options") or {}).get("volume_index") is None else None
    if record.get("series_volumes", legacy) == 1:  # older records: an ok case read without an index was 3-D
        return tuple(k for k in METHOD_OPTIONS if k != "volume_index")
    return METHOD_OPTIONS


def series_volume_index(records: Iterable[dict[str, Any]]) -> int | None:
    """The ``--volume-index`` the folder's 4-D series were read with (None when none was, or they disagree)."""
    values = {repr(v): v for v in ((r.get("options") or {}).get("volume_index") for r in records
                                   if method_keys(r) == METHOD_OPTIONS)}
    return next(iter(values.values())) if len(values) == 1 else None


def method_signature(model_set_digest: str | None, options: dict[str, Any] | None) -> tuple:
    """A hashable summary of the method a record was made with (options may be absent in old failed records)."""
    opts = options or {}
    return (model_set_digest,) + tuple(repr(opts.get(k)) if options is not None else None for k in METHOD_OPTIONS)


def differences(record: dict[str, Any], model_set_digest: str, options: dict[str, Any],
                against: str = "this run") -> list[str]:
    """What differs between ``record`` and the method of ``against``, in words; empty when the methods agree."""
    out = []
    theirs = record.get("model_set_digest")
    if theirs != model_set_digest:
        out.append(f"model set {str(theirs)[:12]} ({against}: {str(model_set_digest)[:12]})")
    rec_options = record.get("options")
    if rec_options is None:  # failed records of older versions carry no options: the model set decides
        return out
    for key in method_keys(record):
        a, b = rec_options.get(key), options.get(key)
        if a != b:
            if isinstance(a, dict) or isinstance(b, dict):
                out.append(f"another {key} than {against}'s")
            else:
                out.append(f"{key} {a} ({against}: {b})")
    return out


def foreign_records(records: Iterable[dict[str, Any]], model_set_digest: str,
                    options: dict[str, Any]) -> list[tuple[dict[str, Any], list[str]]]:
    """The records made with another method, each with its differences."""
    found = []
    for rec in records:
        diffs = differences(rec, model_set_digest, options)
        if diffs:
            found.append((rec, diffs))
    return found


def conflict_message(foreign: list[tuple[dict[str, Any], list[str]]]) -> str:
    """``N case(s) ... made with <the most common difference>`` plus two example cases."""
    common = Counter("; ".join(d) for _, d in foreign).most_common(1)[0][0]
    names = ", ".join(rec.get("case", "?") for rec, _ in foreign[:2]) + (", ..." if len(foreign) > 2 else "")
    return (f"holds {len(foreign)} case(s) made with another method ({common}; e.g. {names}); "
            "mixing them would pool two methods in cases.csv and condiff-eval")


def replaced_inputs(records: Iterable[dict[str, Any]], cases: Iterable[Any]) -> list[tuple[str, str, str]]:
    """``(case, recorded input, this run's input)`` for every case whose finished record was made from another
    file that still exists with other bytes: two runs into one folder whose inputs share a case name
    (``siteA/sub-01.nii.gz`` and ``siteB/sub-01.nii.gz`` given as separate runs). A moved input (the
    recorded path is gone) or a copy (same size and sampled bytes: no hashing of a staged cohort here) is the
    same case, resumed as before; a failed record holds no result to lose."""
    import os

    by_case = {r.get("case"): r.get("input") for r in records if r.get("status") == "ok" and r.get("input")}
    found = []
    for case in cases:
        old, new = by_case.get(case.name), os.path.abspath(case.path)
        if old is None or not os.path.isfile(old):
            continue
        try:
            if os.path.samefile(old, new) or _same_sample(old, new):
                continue
        except OSError:  # unreadable now: the case fails on its own, naming the file
            continue
        found.append((case.name, old, new))
    return found


def _same_sample(a: str, b: str, n: int = 1 << 16) -> bool:
    """Same size and the same ``n`` bytes at the start, middle and end: a copy. (The start alone is not
    enough: two uncompressed scans of one protocol share a header and begin with background zeros.)"""
    import os

    size = os.path.getsize(a)
    if size != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for offset in (0, max(0, size // 2 - n // 2), max(0, size - n)):
            fa.seek(offset), fb.seek(offset)
            if fa.read(n) != fb.read(n):
                return False
    return True


def renamed_inputs(records: Iterable[dict[str, Any]], cases: Iterable[Any]) -> list[tuple[str, str, str]]:
    """``(this run's case, the folder's case, file)`` for every input file a finished case of the folder
    already holds under another name: the same cohort given from another root (``cohort/`` once, then
    ``cohort/siteA``) would add each scan twice, and condiff-eval would pool it twice."""
    import os

    by_file = {os.path.realpath(r["input"]): r.get("case") for r in records
               if r.get("status") == "ok" and r.get("input")}
    found = []
    for case in cases:
        other = by_file.get(os.path.realpath(case.path))
        if other is not None and other != case.name:
            found.append((case.name, other, os.path.abspath(case.path)))
    return found


def remove_foreign(out_dir: Path, foreign: list[tuple[dict[str, Any], list[str]]], keep: set[str]) -> int:
    """Delete the outputs and records of foreign cases, except those named in ``keep``."""
    from .writer import remove_record_and_outputs

    n = 0
    for rec, diffs in foreign:
        name = rec.get("case")
        if not name or name in keep:
            continue
        remove_record_and_outputs(out_dir, rec)
        logger.warning("%s: removed (made with %s; --overwrite replaces another method's results)", name, "; ".join(diffs))
        n += 1
    return n


def check_single_method(records: list[dict[str, Any]], out_dir: Path) -> None:
    """condiff-eval: all finished records must come from one method, else a ``CondiffError`` naming both."""
    # --volume-index picks nothing in a 3-D file: such cases take the index the folder's series were read with
    index = series_volume_index(records)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        options = rec.get("options")
        if options is not None and method_keys(rec) != METHOD_OPTIONS:
            options = {**options, "volume_index": index}
        groups.setdefault(method_signature(rec.get("model_set_digest"), options), []).append(rec)
    if len(groups) <= 1:
        return
    (_, first), (_, second) = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:2]
    diffs = differences(second[0], first[0].get("model_set_digest"), first[0].get("options") or {},
                        against=str(first[0].get("case")))
    raise CondiffError(out_dir, f"holds cases of {len(groups)} different methods ({len(first)} like "
                                f"{first[0].get('case')}, {len(second)} like {second[0].get('case')}: "
                                f"{'; '.join(diffs) or 'options differ'}); their metrics cannot be pooled",
                       "Evaluate each run's own output folder (rerun condiff-infer with --overwrite to make one method)")


__all__ = ["METHOD_OPTIONS", "method_signature", "differences", "foreign_records", "conflict_message", "replaced_inputs", "renamed_inputs", "method_keys",
           "series_volume_index",
           "remove_foreign",
           "check_single_method"]
