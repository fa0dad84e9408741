"""Input discovery: files and folders -> named cases, checked for collisions before any work.

A case is one input file. Its name is the path relative to the input folder it was found
under, without the extension(s) (``sub-01/anat/T1w.nii.gz`` -> ``sub-01/anat/T1w``), or the
bare stem for a file given directly; output files mirror case names (DESIGN §3). Discovery
is recursive, sorted and deterministic; hidden files and folders and files matching the
exclude globs (by default: masks and label maps that live beside their images) are skipped.
Two inputs that would write the same outputs (``a.nii`` and ``a.nii.gz``) are an error.
"""
from __future__ import annotations

import fnmatch
import functools
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from condiff.errors import InputImageError, OutputConflictError

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# Masks and label maps that live beside their images, recognised by a "_"-separated name part that is
# one of these words, or the word followed by a digit, "s", "-..." (x_mask.nii.gz, x_seg_v2, x_mask1,
# x_masks, x_seg-manual, IDRiD_01_EX.png), also as a folder name (lesion_masks/): a part that merely
# starts with one (x_masked, patient_EXAM2) is a scan, and is warned about. Case-sensitive; every
# excluded file is logged and reported.
LABEL_WORDS = ("mask", "brainmask", "seg", "segmentation", "lesionmask", "EX", "dlmuse", "dseg", "probseg")
# A BIDS dataset's folders that never hold raw inputs (derivatives may hold preprocessed copies and label maps)
BIDS_RESERVED_FOLDERS = ("derivatives", "sourcedata", "code")
BIDS_EXCLUDE = tuple(f"{folder}/*" for folder in BIDS_RESERVED_FOLDERS)
DEFAULT_EXCLUDE = tuple(p for w in LABEL_WORDS for v in (w, f"{w}s")
                        for p in (f"*_{v}.*", f"*_{v}_*", f"*_{v}-*", f"*_{v}[0-9]*", f"*_{v}/*"))
_LOOKS_LIKE_A_LABEL = re.compile(r"(?:^|_)(?:brain|lesion)?(?:mask|seg)", re.IGNORECASE)
# The one recommended DICOM -> NIfTI recipe, quoted by every message about DICOM input (here and in
# io.volumes): gzip output, a BIDS JSON sidecar (-b y) with identifying fields left out (-ba y).
DCM2NIIX_RECIPE = "dcm2niix -z y -b y -ba y -o OUT IN"
DICOM_HINT = f"Convert DICOM to NIfTI first: {DCM2NIIX_RECIPE}"
_HINTS = {".dcm": DICOM_HINT, ".mha": "Convert it to NIfTI (.nii.gz)",
          ".nrrd": "Convert it to NIfTI (.nii.gz)", ".mgz": "Convert it to NIfTI: mri_convert IN OUT.nii.gz"}


@dataclass(frozen=True)
class Case:
    """One input: ``name`` (output name, ``/``-separated), ``path`` (the file), ``kind`` ("volume" or "image").

    A 2-D NIfTI is still a "volume": its shape decides later.
    """

    name: str
    path: Path
    kind: str


def split_suffix(filename: str) -> tuple[str, str | None]:
    """``("T1w", ".nii.gz")`` for ``"T1w.nii.gz"``; ``(filename, None)`` for an unsupported suffix."""
    low = filename.lower()
    for suffix in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
        if low.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)], suffix
    return filename, None


def _kind(suffix: str) -> str:
    return "volume" if suffix in VOLUME_SUFFIXES else "image"


def _excluded(name: str, rel: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` or ``rel`` matches one of the fnmatch ``patterns`` (case-sensitive, as
    ``fnmatch.fnmatchcase``), by one regular expression per pattern set (a cohort's every file was checked
    against ~90 patterns one by one: 9 % of a 10,000-case resume)."""
    rx = _patterns_regex(tuple(patterns))
    return rx.match(name) is not None or rx.match(rel) is not None


@functools.lru_cache(maxsize=32)
def _patterns_regex(patterns: tuple[str, ...]) -> "re.Pattern[str]":
    return re.compile("|".join(fnmatch.translate(p) for p in patterns) or r"(?!)")  # none: matches nothing

def is_bids_root(folder: Path) -> bool:
    """A BIDS dataset's root: the folder holding its ``dataset_description.json``."""
    return (Path(folder) / "dataset_description.json").is_file()


def in_bids_reserved_folder(path: str | os.PathLike) -> bool:
    """Whether a file left out of discovery lies in a BIDS dataset's derivatives/, sourcedata/ or code/ (a
    folder of that name in a dataset's root) rather than being a mask or label map by its name."""
    path = Path(path)
    if _excluded(path.name, "/".join(path.parts[-4:]), DEFAULT_EXCLUDE):  # left out by its name wherever it lies
        return False
    return any(a.name in BIDS_RESERVED_FOLDERS and is_bids_root(a.parent) for a in path.parents)


def _walk(folder: Path) -> list[Path]:
    """Every non-hidden file below ``folder`` (symlinks followed, loops cut), sorted by relative path."""
    found: list[Path] = []
    seen_dirs: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            dirs[:] = []
            continue
        seen_dirs.add(real)
        if _is_output_folder(root, dirs, files):  # an earlier run's maps are not scans
            logger.warning("%s: skipped (a condiff-infer output folder: records/ beside run.json or condiff.log)", root)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _is_output_folder(root: str, dirs: list[str], files: list[str]) -> bool:
    """A condiff-infer output folder: ``records/`` beside ``run.json`` (a shard's ``run.<i>of<n>.json``), or,
    for a run still going or killed before writing it, beside its ``condiff.log`` or ``.condiff.lock``."""
    return "records" in dirs and any((f.startswith("run") and f.endswith(".json")) or f == "condiff.log"
                                     or f.startswith(".condiff.lock") for f in files)


DICOM_SNIFF = 3  # skipped files per extension whose bytes are checked for DICOM's "DICM" marker


def _is_dicom(path: Path) -> bool:
    """True when ``path`` holds DICOM's preamble marker ("DICM" at byte 128); a FIFO or device is not
    opened (a FIFO would wait for a writer forever)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def discover(inputs: Iterable[str | os.PathLike], exclude_patterns: Iterable[str] | None = None,
             excluded: list[Path] | None = None) -> list[Case]:
    """Turn input files and folders into cases, in a deterministic order.

    ``exclude_patterns``: globs matched (case-sensitively) against a file's name and its path
    relative to the input folder; default ``DEFAULT_EXCLUDE``. Files given directly are never
    excluded. Raises ``InputImageError`` for a missing input, an unsupported file given
    directly, or when nothing usable is found; ``OutputConflictError`` listing every pair of
    files whose case names collide (compared case-insensitively, since outputs may land on a
    case-insensitive file system). The same file reached twice (symlink, repeated argument)
    becomes one case. ``excluded``, when given, receives the files the patterns left out (also
    logged one by one), so a caller can report them.
    """
    patterns = tuple(DEFAULT_EXCLUDE if exclude_patterns is None else exclude_patterns)
    cases: list[Case] = []
    seen_files: set[str] = set()
    skipped: dict[str, int] = {}
    dicom_seen: Path | None = None  # a skipped file that is DICOM by its bytes (scanner exports often have no extension)
    for item in inputs:
        item = Path(item)
        if not item.exists():
            raise InputImageError(item, "input not found")
        item_patterns = patterns
        if item.is_dir():
            candidates = [(p, p.relative_to(item).as_posix()) for p in _walk(item)]
            if is_bids_root(item):
                item_patterns = patterns + tuple(p for p in BIDS_EXCLUDE if p not in patterns)
        else:
            stem, suffix = split_suffix(item.name)
            if suffix is None:
                hint = _HINTS.get(item.suffix.lower(), f"Supported: {', '.join(VOLUME_SUFFIXES + IMAGE_SUFFIXES)}")
                raise InputImageError(item, "unsupported file type", hint)
            candidates = [(item, item.name)]
        for path, rel in candidates:
            stem, suffix = split_suffix(path.name)
            if suffix is None:
                ext = path.suffix.lower() or "(none)"
                skipped[ext] = skipped.get(ext, 0) + 1
                if not dicom_seen and ext not in (".json", ".tsv", ".txt", ".md") and skipped[ext] <= DICOM_SNIFF:
                    dicom_seen = path if ext == ".dcm" or _is_dicom(path) else None
                # Sidecars (.json, .tsv, licences) are normal beside scans; only formats we could
                # have read after conversion deserve a warning.
                if ext in _HINTS:
                    logger.warning("%s: skipped (unsupported file type); %s", path, _HINTS[ext])
                else:
                    logger.info("%s: skipped (unsupported file type)", path)
                continue
            if item.is_dir() and _excluded(path.name, rel, item_patterns):
                if _excluded(path.name, rel, DEFAULT_EXCLUDE):
                    logger.info("%s: skipped (a mask or label map by its name)", path)
                else:  # a caller's own pattern, or a BIDS dataset's derivatives/, sourcedata/, code/
                    logger.info("%s: skipped (matches %s)", path,
                                next(p for p in item_patterns if _excluded(path.name, rel, (p,))))
                if excluded is not None:
                    excluded.append(path)
                continue
            if item.is_dir() and patterns and _LOOKS_LIKE_A_LABEL.search(stem):
                logger.warning("%s: analysed as a scan, though its name looks like a mask's or label map's; "
                               "if it is one, move it out of the input folder", path)
            real = os.path.realpath(path)
            if real in seen_files:
                logger.warning("%s: same file as an earlier input; processed once", path)
                continue
            seen_files.add(real)
            name = rel[: len(rel) - len(path.name)] + stem if item.is_dir() else stem
            cases.append(Case(name=name, path=path, kind=_kind(suffix)))
    if dicom_seen and cases and dicom_seen.suffix.lower() != ".dcm":  # .dcm files were warned about one by one
        logger.warning("%s: skipped (a DICOM file without the .dcm extension; %d files of its kind skipped); %s",
                       dicom_seen, skipped.get(dicom_seen.suffix.lower() or "(none)", 0), DICOM_HINT)
    if not cases:
        looked = ", ".join(VOLUME_SUFFIXES + IMAGE_SUFFIXES)
        extra = f"; skipped {sum(skipped.values())} files with other extensions ({', '.join(sorted(skipped))})" if skipped else ""
        raise InputImageError(", ".join(str(Path(i)) for i in inputs) or "(no inputs)",
                              f"0 supported files found (looked for {looked}{extra})",
                              DICOM_HINT if dicom_seen else None)
    _check_collisions(cases)
    return cases


def _check_collisions(cases: list[Case]) -> None:
    by_name: dict[str, list[Case]] = {}
    for case in cases:
        by_name.setdefault(case.name.casefold(), []).append(case)
    clashes = [group for group in by_name.values() if len(group) > 1]
    if clashes:
        listing = "; ".join(" and ".join(str(c.path) for c in group) + f" -> case {group[0].name!r}" for group in clashes)
        raise OutputConflictError(None, f"input files would write the same outputs: {listing}",
                                  "Rename or move one file of each pair, or give them as separate runs into separate -o folders")


def _is_file(path: Path) -> bool:
    """``path.is_file()``, where a name that cannot exist (too long: ENAMETOOLONG) is no file either."""
    try:
        return path.is_file()
    except OSError:
        return False


MASK_PLACEHOLDERS = ("dir", "stem", "base", "case", "casedir", "root")
_PLACEHOLDER_LIST = ", ".join(f"{{{name}}}" for name in MASK_PLACEHOLDERS)


def check_mask_pattern(pattern: str) -> str:
    """``pattern`` when it formats with ``find_mask``'s placeholders; else ``ValueError`` saying what is wrong
    (checked when the option is read, not at the first case after a model loaded or OUT was made)."""
    try:
        pattern.format(**{name: name for name in MASK_PLACEHOLDERS})
    except (KeyError, IndexError, ValueError) as exc:
        what = f"unknown placeholder {exc}" if isinstance(exc, (KeyError, IndexError)) else f"malformed ({exc})"
        raise ValueError(f"mask pattern {pattern!r}: {what}; use {_PLACEHOLDER_LIST}") from None
    return pattern


def find_mask(case: Case, pattern: str, required: bool = True) -> Path | None:
    """Resolve the mask file of ``case`` from ``pattern``.

    Placeholders: ``{dir}`` the folder holding the input file, ``{stem}`` the input's file name
    without extension(s) (``IXI132-T1`` for ``IXI132-T1.nii.gz``), ``{case}`` the case name
    (may contain ``/``), ``{casedir}`` the case name's folder part (``sub-01/anat`` for the case
    ``sub-01/anat/sub-01_T1w``; empty at the top), ``{base}`` the stem without its last ``_part``
    (``pat1`` for ``pat1_t1c``; a BIDS name's entities, ``sub-01`` for ``sub-01_T1w``), ``{root}`` the input
    folder the case was found in (a file given directly: its folder). Examples:
    ``{dir}/{stem}_brainmask.nii.gz``; a BIDS derivative mask
    ``{root}/derivatives/fmriprep/{casedir}/{base}_desc-brain_mask.nii.gz`` (with ``{root}`` the pattern
    names no path, so a moved dataset keeps its method and resumes). A relative result is relative
    to the current folder. A missing file raises ``InputImageError`` (or returns None when
    ``required`` is False).
    """
    stem, _ = split_suffix(case.path.name)
    try:
        base = stem.rsplit("_", 1)[0]
        casedir = case.name.rsplit("/", 1)[0] if "/" in case.name else ""
        root = case.path.parents[case.name.count("/")]  # the name is the path below the input folder
        mask = Path(pattern.format(dir=str(case.path.parent), stem=stem, base=base, case=case.name, casedir=casedir,
                                   root=str(root)))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"mask pattern {pattern!r}: unknown placeholder {exc}; use {_PLACEHOLDER_LIST}") from None
    if not _is_file(mask):
        if not required:
            return None
        raise InputImageError(case.path, f"mask not found at {mask}", f"Check the mask pattern {pattern!r}")
    return mask


__all__ = ["Case", "discover", "find_mask", "check_mask_pattern", "MASK_PLACEHOLDERS", "BIDS_RESERVED_FOLDERS", "BIDS_EXCLUDE",
           "is_bids_root", "in_bids_reserved_folder", "split_suffix", "DEFAULT_EXCLUDE", "LABEL_WORDS", "VOLUME_SUFFIXES", "IMAGE_SUFFIXES",
           "DCM2NIIX_RECIPE", "DICOM_HINT"]
