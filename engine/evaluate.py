"""``condiff-eval``: metrics of a finished output folder against label masks.

Two protocols, always named in the table:

- ``native`` (default): the maps as written (the input's grid) against the user's masks as
  they are, restricted to the brain mask where inference used one. Pixels: every voxel
  (inside the brain mask) of every case, pooled. Samples: the analysed axial slices (label =
  the slice holds a positive voxel, score = the slice score in the record), or whole images.
- ``benchmark``: reference-method.md §8–§9 exactly: the model-space maps saved by
  ``condiff-infer --save-model-space``, masks brought into slice space through the case's
  recorded preprocessing (``mask_to_slices``: the label's values resampled, then > 0.4; with label
  values chosen, those classes as a 0/1 label), empty image slices dropped,
  metrics pooled over all slices of all cases. With ``--save-member-maps`` each member is
  scored too and summarised as avg/max/std (population std).

Beyond the benchmark's four metrics, both protocols report Dice at 5 % pixel FPR and AUPRO (the
per-lesion overlap to 30 % FPR; lesions are the label's connected components: 3-D per volume on
the input grid, 2-D per slice in model space, 8/26-connected), and ``threshold`` applies a
threshold chosen elsewhere (a number, or the best-Dice threshold of another folder's
``metrics-<protocol>.json``, e.g. of validation cases): an honest Dice, where the benchmark picks
its threshold on the evaluated data. At the table's threshold (best Dice, or the given one) the
lesions are also counted one by one (``engine.lesions``: matched to the called regions at IoU >= 0.25,
as the Shifts MS track's lesion F1): found, missed, and false called regions, per case and in all;
each row's lesion F1 is taken at its own best-Dice threshold.

A case whose label is missing or on another grid fails alone (listed, exit 1); the others are
evaluated. So does what is absent or not as inference made it: a case condiff-infer failed on, the
cases of an interrupted run or of shards that never ran here, a map, model-space file or brain mask
whose bytes differ from its record's digest, a map with NaN/Inf values.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from condiff.errors import CondiffError, InputImageError
from condiff.io.cases import Case, find_mask
from condiff.metrics import (DetectionMetrics, average_precision, best_dice, detection_metrics, dice_at,
                             slice_metrics, summarise)
from condiff.preprocess import analysed_box

from .lesions import MIN_IOU, LesionDetection, lesion_detection, lesion_regions, offset_regions

logger = logging.getLogger(__name__)
PROTOCOLS = ("native", "benchmark")
MISSING_LABEL = ("error", "normal")
METRIC_KEYS = ("ap_image", "auroc", "ap_pixel", "dice", "threshold", "dice_fpr5", "aupro")
METRIC_LABELS = {"ap_image": "AP_i", "auroc": "AUROC", "ap_pixel": "AP_p", "dice": "best Dice", "threshold": "thr",
                 "dice_fpr5": "Dice@5%FPR", "aupro": "AUPRO@30%", "lesion_f1": "lesion F1",
                 "dice_given": "Dice@given"}
AUPRO_MAX_FPR = 0.3


@dataclass(frozen=True)
class GivenThreshold:
    """A threshold chosen outside the evaluated data (``--threshold``) and where it came from."""

    value: float
    source: str  # "command line" or the metrics JSON it was read from
    label_values: tuple[int, ...] | None = None  # the lesion classes that JSON was evaluated on
    provenance: dict[str, Any] | None = None  # that JSON's: the model set and method whose maps chose it


@dataclass
class Evaluation:
    protocol: str
    rows: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    per_case: list[dict[str, Any]] = field(default_factory=list)
    label_values: tuple[int, ...] | None = None  # None: every label value > 0 is lesion
    given: GivenThreshold | None = None
    intervals: Any = None  # bootstrap.Intervals with --bootstrap
    lesion_threshold: float | None = None  # where the lesion-wise counts were taken
    lesion_counts: LesionDetection | None = None  # all cases' lesion-wise counts at it
    lesion_iou: float = MIN_IOU  # the IoU at which lesions and called regions match
    provenance: dict[str, Any] = field(default_factory=dict)  # label source, model set and method evaluated
    without_label: list[str] = field(default_factory=list)  # --missing-label normal: the cases it applied to

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "description": DESCRIPTIONS[self.protocol], "provenance": self.provenance,
                "label_values": list(self.label_values) if self.label_values else None,
                "threshold_chosen_on_evaluated_data": self.given is None,
                "given_threshold": None if self.given is None else {"value": self.given.value,
                                                                     "source": self.given.source},
                "aupro_max_fpr": AUPRO_MAX_FPR,
                "rows": [{"row": name, **values} for name, values in self.rows], "counts": self.counts,
                "bootstrap": None if self.intervals is None else self.intervals.to_dict(),
                "lesion_detection": None if self.lesion_counts is None else
                {"threshold": self.lesion_threshold, **self.lesion_counts.to_dict(), "min_iou": self.lesion_iou},
                "cases": self.cases, "per_case": self.per_case, "cases_without_label": self.without_label,
                "failures": [{"case": c, "error": e} for c, e in self.failures]}


CASE_KEYS = ("case", "score", "pixels", "positive_pixels", "ap_pixel", "dice", "dice_at_threshold",
             "pixels_at_threshold", "lesions", "lesions_found", "false_regions")
CASE_LABELS = {"case": "case", "score": "score", "pixels": "pixels", "positive_pixels": "lesion px",
               "ap_pixel": "AP_p", "dice": "best Dice", "dice_at_threshold": "Dice@thr",
               "pixels_at_threshold": "px@thr", "lesions": "lesions", "lesions_found": "found",
               "false_regions": "false rgn"}
PRINTED_CASES = 20


def case_row(case: str, score: float, labels: np.ndarray, values: np.ndarray, threshold: float,
             lesions: LesionDetection | None = None) -> dict[str, Any]:
    """One case's pixels alone: its AP_p and best Dice (NaN without lesion), and the Dice and the
    number of pixels called at the pooled table's threshold (where a lesion-free case's false
    positives show); ``lesions``: its lesion-wise counts at that threshold."""
    labels = np.asarray(labels, dtype=bool).ravel()
    values = np.asarray(values, dtype=np.float64).ravel()
    dice, _ = best_dice(labels, values)
    return {"case": case, "score": float(score), "pixels": int(labels.size), "positive_pixels": int(labels.sum()),
            "ap_pixel": average_precision(labels, values), "dice": dice,
            "dice_at_threshold": dice_at(labels, values, threshold),
            "pixels_at_threshold": int(np.sum(values >= threshold)),
            **({} if lesions is None else {"lesions": lesions.lesions, "lesions_found": lesions.found,
                                           "false_regions": lesions.false_regions})}


DESCRIPTIONS = {
    "native": "input grid; user's masks as they are (lesion: > 0, or the chosen label values); restricted to the "
              "inference brain mask where one was used (photos: to the analysed centre square, within the field-of-view mask where one was used); pixels pooled over cases; samples = analysed axial slices "
              "(volumes) or images",
    "benchmark": "the reference code's evaluation: model slice space, masks (lesion: > 0, or the chosen label values) through "
                 "the recorded preprocessing and > 0.4, "
                 "empty image slices dropped, pooled over all slices",
}


def _case_of(rec: dict[str, Any]) -> Case:
    return Case(name=rec["case"], path=Path(rec["input"]), kind=rec.get("kind", "volume"))


def _used_auto_mask(rec: dict[str, Any]) -> bool:
    """Whether inference used the scan's own foreground as the brain (records before ``mask_auto``: no mask
    file under the default ``--mask auto`` with a contract that masks)."""
    if "mask_auto" in rec:
        return bool(rec["mask_auto"])
    options = rec.get("options") or {}
    return (rec.get("kind") == "volume" and not rec.get("mask") and options.get("mask") == "auto"
            and bool((options.get("preprocessing") or {}).get("use_mask")))


def _auto_brain(rec: dict[str, Any]) -> np.ndarray:
    """The brain inference used for a scan without a mask file: its non-background voxels, rebuilt from
    the input (which must still hold the bytes the record names)."""
    from condiff.io.volumes import read_volume_or_slice
    from condiff.preprocess import auto_foreground

    from .plan import sha256_path

    path = Path(rec["input"])
    if not path.is_file():
        raise InputImageError(path, "is not there any more; its case used the scan's own non-background voxels as "
                                    "the brain, which evaluation rebuilds from the input",
                              "if the scans moved, rerun condiff-infer on them where they are now (finished cases "
                              "are kept, their records then point there), or give brain masks")
    if sha256_path(path) != rec.get("input_sha256"):
        raise InputImageError(path, "changed since its map was made; its case used the scan's own non-background "
                                    "voxels as the brain, which evaluation rebuilds from it", "rerun condiff-infer")
    options = rec.get("options") or {}
    source = read_volume_or_slice(path, nan_policy=options.get("nan_policy", "error"),
                                  volume_index=options.get("volume_index"))
    return auto_foreground(source.data)


def _like_volume(path: Path):
    """The written map as an ``io.volumes.Volume`` (its grid is the input's)."""
    import nibabel as nib

    from condiff.io.volumes import Volume

    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim == 2:
        data = data[:, :, None]
    elif data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])  # an (X, Y, Z, 1) input's map: its volume, as the input was read
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=str(path))


def _read_label(path: Path | None, like=None, shape: tuple[int, ...] | None = None,
                values: tuple[int, ...] | None = None, raw: bool = False) -> np.ndarray:
    """The label on the map's grid; ``path`` None (no label, ``--missing-label normal``): all normal.
    ``values``: only these label values count as lesion (NIfTI label maps); ``raw``: a NIfTI label's
    own values (float32, 0 outside ``values``) instead of bool, for resampling before the threshold."""
    from condiff.io import images, volumes

    if path is None:
        return np.zeros(like.data.shape if like is not None else tuple(shape), dtype=bool)

    low = path.name.lower()
    if low.endswith((".nii", ".nii.gz")):
        if like is None:
            raise InputImageError(path, "a NIfTI mask for a 2-D image", "give the mask as PNG or TIFF")
        return volumes.read_mask(path, like, values, raw=raw)
    if values:
        raise InputImageError(path, "label values select classes of a NIfTI label map, not of an image mask",
                              "drop --label-values, or give the mask as NIfTI")
    label = images.read_label_image(path)
    if shape is not None and label.shape != tuple(shape):
        raise InputImageError(path, f"mask shape {label.shape} differs from the image's {tuple(shape)}",
                              "give a mask on the image's pixel grid")
    return label


def _output(out_dir: Path, rec: dict[str, Any], kind: str) -> Path:
    """A case's output file of ``kind`` ("map", "model_space"), checked against the digest its record
    holds: a file changed or replaced since condiff-infer wrote it (another case's map copied over it,
    an edit) would be scored as this case's without a word."""
    from .plan import sha256_path

    entry = rec["outputs"][kind]
    path = out_dir / entry["path"]
    if not path.is_file():
        raise CondiffError(path, f"is missing (the {kind.replace('_', '-')} output of case {rec['case']})",
                           "rerun condiff-infer into this folder (the case is recomputed)")
    if entry.get("sha256") and sha256_path(path) != entry["sha256"]:
        raise CondiffError(path, f"changed since condiff-infer wrote it (its record's digest differs): it is not "
                                 f"case {rec['case']}'s output as made", "rerun condiff-infer into this folder "
                                                                       "(the case is recomputed)")
    return path


def _finite(path: Path, values: np.ndarray) -> np.ndarray:
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise CondiffError(path, f"holds {bad} NaN/Inf values", "rerun condiff-infer into this folder")
    return values


def _brain_mask(rec: dict[str, Any], like=None):
    """The brain mask file inference used (a photo's field-of-view mask: ``like`` None), checked against
    the digest in the record: a mask edited since would change which pixels are evaluated."""
    from condiff.io.images import read_label_image
    from condiff.io.volumes import read_mask

    from .plan import sha256_path

    path = Path(rec["mask"])
    if not path.is_file():
        raise InputImageError(path, f"is not there any more: it is the brain mask case {rec['case']} was made with",
                              "restore it, or rerun condiff-infer with the masks where they are now (a pattern "
                              "with {root} moves with the dataset)")
    if rec.get("mask_sha256") and sha256_path(path) != rec["mask_sha256"]:
        raise InputImageError(path, f"changed since case {rec['case']}'s map was made with it: the evaluated pixels "
                                    "would not be the brain inference used", "restore it, or rerun condiff-infer "
                                                                             "(the case is recomputed with it)")
    return read_label_image(path) if like is None else read_mask(path, like)


def _native_inputs(out_dir: Path, rec: dict[str, Any], label_path: Path | None, values: tuple[int, ...] | None):
    """(map, label, evaluated pixels, brain mask or None) of one case on the input grid: the map as an
    array (photos) or a ``Volume`` (volumes); a volume's label already restricted to the brain mask, a
    photo's not yet (its evaluated pixels are the analysed centre square)."""
    map_path = _output(out_dir, rec, "map")
    if rec.get("kind") == "image":
        import tifffile

        amap = _finite(map_path, np.asarray(tifffile.imread(map_path), dtype=np.float32))
        label = _read_label(label_path, shape=amap.shape, values=values)
        r0, r1, c0, c1 = analysed_box(rec["geometry"])  # a photo that is not square: its analysed centre square
        sel = np.zeros(label.shape, dtype=bool)
        sel[r0:r1, c0:c1] = True
        if rec.get("mask"):  # a field-of-view mask: the map is 0 outside it, so those pixels are not evaluated
            fov = _brain_mask(rec)
            if fov.shape != sel.shape:
                raise InputImageError(rec["mask"], f"mask shape {fov.shape} differs from the map's {sel.shape}",
                                      "restore the mask condiff-infer used")
            sel &= fov
        return amap, label, sel, None
    like = _like_volume(map_path)
    _finite(map_path, like.data)
    label = _read_label(label_path, like=like, values=values)
    brain = _brain_mask(rec, like) if rec.get("mask") else _auto_brain(rec) if _used_auto_mask(rec) else None
    if brain is not None:
        label = label & brain
    sel = brain if brain is not None else np.ones(label.shape, dtype=bool)
    return like, label, sel, brain


def _native_case(out_dir: Path, rec: dict[str, Any], label_path: Path | None, values: tuple[int, ...] | None = None):
    """(pixel labels, pixel scores, sample labels, sample scores, lesion ids, grid) of one case on the
    input grid (``label_path`` None: no label, all normal); ``grid`` = (shape, packed bits of the
    evaluated voxels or None for all) places the pixels back for lesion-wise counts."""
    from nibabel.orientations import apply_orientation  # the exact permutation/flip inference used

    data, label, sel, brain = _native_inputs(out_dir, rec, label_path, values)
    if rec.get("kind") == "image":
        label = label & sel
        grid = (label.shape, None if sel.all() else np.packbits(sel))
        return (label[sel], data[sel], np.array([label.any()]), np.array([rec["score"]]),
                lesion_regions(label)[sel], grid)
    ornt = np.asarray(rec["geometry"]["ornt"], dtype=float)
    canon = np.asarray(apply_orientation(label, ornt), dtype=bool)
    slice_scores = dict((int(k), float(s)) for k, s in rec["slice_scores"])
    ks = sorted(slice_scores)
    sample_labels = np.array([canon[:, :, k].any() for k in ks])
    sample_scores = np.array([slice_scores[k] for k in ks])
    grid = (label.shape, None if brain is None else np.packbits(sel))  # 1 bit a voxel: where the pixels lie
    return label[sel], data.data[sel], sample_labels, sample_scores, lesion_regions(label)[sel], grid


def _native_figure(out_dir: Path, rec: dict[str, Any], label_path: Path | None, values: tuple[int, ...] | None,
                   threshold: float, given: bool, vmax: float | None = None) -> np.ndarray:
    """``eval-overlays/<case>.png``'s image (``eval_overlay``): the label's outline and the pixels the
    table calls at ``threshold`` (map >= threshold on the evaluated pixels, as the per-case rows count
    them; ``given``: a ``--threshold``, else the pooled best-Dice one; ``vmax``: a fixed top of the colour
    scale, else the case's maximum). The case is read again, after
    the table, so no case's volumes are held until the threshold is known."""
    from nibabel.orientations import apply_orientation

    data, label, sel, _ = _native_inputs(out_dir, rec, label_path, values)
    if rec.get("kind") == "image":
        return _image_figure(rec, data, label, (data >= threshold) & sel, threshold, given, vmax)
    ornt = np.asarray(rec["geometry"]["ornt"], dtype=float)
    canon = np.asarray(apply_orientation(label, ornt), dtype=bool)
    called = np.asarray(apply_orientation((data.data >= threshold) & sel, ornt), dtype=bool)
    slice_scores = dict((int(k), float(s)) for k, s in rec["slice_scores"])
    return _volume_figure(rec, data, canon, ornt, slice_scores, called, threshold, given, vmax)


def _volume_figure(rec: dict[str, Any], like, canon_label: np.ndarray, ornt: np.ndarray, slice_scores,
                   called: np.ndarray | None = None, threshold: float | None = None, given: bool = False,
                   vmax: float | None = None) -> np.ndarray:
    from nibabel.orientations import apply_orientation

    from condiff.io.volumes import read_volume_or_slice

    from .eval_overlay import volume_figure
    from .overlay import slice_name

    image = read_volume_or_slice(rec["input"], nan_policy="zero",
                                 volume_index=(rec.get("options") or {}).get("volume_index")).data
    if image.shape != like.data.shape:
        raise ValueError(f"input {rec['input']} is {image.shape}, its map {like.data.shape}: the input changed")
    geometry = rec.get("geometry") or {}
    name = (lambda s: slice_name(geometry, s)) if "ornt" in geometry else None
    voxel_mm = geometry.get("voxel_size_mm")  # on the contract's axes
    return volume_figure(np.asarray(apply_orientation(image, ornt)), np.asarray(apply_orientation(like.data, ornt)),
                         canon_label, slice_scores, name=name, called=called, threshold=threshold, given=given,
                         case=rec["case"], vmax=vmax, orientation=geometry.get("orientation", "RAS"),
                         voxel_mm=None if voxel_mm is None else tuple(float(v) for v in voxel_mm))


def _image_figure(rec: dict[str, Any], amap: np.ndarray, label: np.ndarray, called: np.ndarray | None = None,
                  threshold: float | None = None, given: bool = False, vmax: float | None = None) -> np.ndarray:
    from condiff.io.images import read_image

    from .eval_overlay import image_figure

    rgb = read_image(rec["input"])
    if rgb.shape[:2] != amap.shape:
        raise ValueError(f"input {rec['input']} is {rgb.shape[:2]}, its map {amap.shape}: the input changed")
    return image_figure(rgb, amap, label, called=called, threshold=threshold, given=given, case=rec["case"],
                        vmax=vmax)


def _write_figure(out_dir: Path, rec: dict[str, Any], draw) -> None:
    """Draw and write a case's figure; a figure that cannot be drawn (input moved or changed) is a
    warning, never a reason to drop the case from the metrics."""
    from condiff.io.atomic import write_bytes_atomic
    from condiff.io.images import png_bytes

    path = out_dir / "eval-overlays" / f"{rec['case']}.png"
    try:
        image = draw()
    except (CondiffError, OSError, ValueError) as exc:
        text = exc.message if isinstance(exc, CondiffError) else f"{type(exc).__name__}: {exc}"
        logger.warning("case %s: no eval overlay (%s)", rec["case"], text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, png_bytes(image))


def read_given_threshold(text: str, protocol: str) -> GivenThreshold:
    """``--threshold``: a number, or a ``metrics-<protocol>.json`` of condiff-eval whose ensemble row's
    best-Dice threshold is taken (its protocol must be this one: the two score different pixels)."""
    import json
    import math

    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None:
        if not math.isfinite(value):
            raise CondiffError(text, "is not a finite threshold", "give a number or a metrics-<protocol>.json")
        return GivenThreshold(value, "command line")
    path = Path(text)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise CondiffError(path, f"cannot be read ({exc.strerror or exc})",
                           "give a number or the metrics-<protocol>.json of another condiff-eval run") from None
    except ValueError as exc:
        raise CondiffError(path, f"is not JSON ({exc})", "give a metrics-<protocol>.json of condiff-eval") from None
    rows = {r.get("row"): r for r in doc.get("rows", [])} if isinstance(doc, dict) else {}
    value = rows.get("ensemble", {}).get("threshold")
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CondiffError(path, "holds no ensemble best-Dice threshold",
                           "give the metrics-<protocol>.json of a condiff-eval run on labelled cases")
    if doc.get("protocol") != protocol:
        raise CondiffError(path, f"was evaluated with the {doc.get('protocol')} protocol, this evaluation uses "
                           f"{protocol}", "evaluate both with the same --protocol")
    values = doc.get("label_values")
    origin = doc.get("provenance") if isinstance(doc.get("provenance"), dict) else None
    return GivenThreshold(float(value), str(path), tuple(values) if values else None, origin)


def other_maps(given: GivenThreshold, provenance: dict[str, Any]) -> list[str]:
    """How the maps a threshold JSON was chosen on differ from the evaluated ones (model set, method
    options); empty when they were made the same way or the JSON does not say."""
    if not given.provenance:
        return []
    diff = []
    if given.provenance.get("model_set_digest") != provenance.get("model_set_digest"):
        diff.append("another model set")
    theirs, ours = given.provenance.get("method") or {}, provenance.get("method") or {}
    diff += [f"{k} {theirs.get(k)!r} (here {ours.get(k)!r})" for k in sorted(set(theirs) | set(ours))
             if theirs.get(k) != ours.get(k)]
    return diff


def _has_label(rec: dict[str, Any], mask_pattern: str) -> bool:
    try:
        return find_mask(_case_of(rec), mask_pattern, required=False) is not None
    except (CondiffError, OSError, ValueError, KeyError):
        return True  # a case the loop will name with its own error


def unfinished_runs(out_dir: Path, where: str = "from these metrics") -> list[tuple[str, str]]:
    """What the folder's run files say is missing: a condiff-infer run that was interrupted, or shards of
    a split (``run.I-of-N.json``) that never ran here (unless a whole-folder run finished after them),
    whose cases would silently be absent from the metrics (``--merge``: ``where`` "from the tables")."""
    import json
    import re

    found: dict[int, dict[int, float]] = {}
    whole_done = None
    notes = []
    for path in sorted(out_dir.glob("run*.json")):
        m = re.fullmatch(r"run(?:\.(\d+)-of-(\d+))?\.json", path.name)
        if m is None:
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        left = list(doc.get("not_finished") or [])
        if doc.get("interrupted") or left:
            why = (f"was interrupted ({doc.get('signal') or 'stopped'})" if doc.get("interrupted")
                   else f"stopped early ({doc.get('stopped') or 'see its log'})")
            names = f" ({', '.join(left[:5])}{', ...' if len(left) > 5 else ''})" if left else ""
            notes.append((path.name, f"condiff-infer {why} before every case finished: {len(left) or 'the'} "
                                     f"case(s) it did not finish{names} are missing {where}"))
        if m.group(1) is None:
            whole_done = None if doc.get("interrupted") or left else path.stat().st_mtime
        else:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = path.stat().st_mtime
    for n, shards in sorted(found.items()):
        if whole_done is not None and whole_done >= max(shards.values()):
            continue  # a whole-folder run finished after the split's shards: it did every case
        notes += [(f"shard {i}/{n}", f"has not run into this folder (no run.{i}-of-{n}.json): its cases are missing "
                                     f"{where}; run condiff-infer --shard {i}/{n} -o {out_dir}")
                  for i in range(n) if i not in shards]
    from condiff.io.lock import lock_holders

    # a run killed by SIGKILL (out of memory, a node lost) writes no run.json: its lock stays behind
    for name, holder, state in lock_holders(out_dir):
        notes.append((name, unfinished_lock_text(out_dir, name, holder, state, where)))
    return [(what, why + (" (rerun condiff-infer to finish them)" if what.startswith("run") else ""))
            for what, why in notes]


def unfinished_lock_text(out_dir: Path, name: str, holder: str, state: str, where: str) -> str:
    """What a run lock left in an output folder means (``io.lock.lock_holders``' state), in words."""
    who = "a whole-folder run" if name == ".condiff.lock" else f"shard {name.rsplit('.', 1)[-1].replace('-of-', '/')}"
    if state == "stale":
        return (f"{who} of condiff-infer was killed before it finished ({holder or 'an empty lock'} is not running): "
                f"the cases it did not finish are missing {where}; rerun the same condiff-infer command to finish them")
    if state == "live":
        return (f"{who} of condiff-infer is writing to this folder now ({holder or 'unknown'}): its unfinished cases "
                f"are missing {where} until it ends")
    return (f"{who} of condiff-infer holds this folder from another host or container ({holder or 'unreadable lock'}), "
            f"running or lost: its unfinished cases are missing {where}; if no run is active there, rerun its "
            f"command (or delete {out_dir / name})")


def kept_slices(rec: dict[str, Any], slices: np.ndarray) -> np.ndarray:
    """The slices the benchmark protocol scores: every image; of volumes, the non-empty slices (reference §8)."""
    if rec.get("kind") == "image":
        return np.ones(len(slices), dtype=bool)
    return slices.reshape(len(slices), -1).sum(axis=1) != 0


def _benchmark_case(out_dir: Path, rec: dict[str, Any], label_path: Path | None,
                    values: tuple[int, ...] | None = None, single_coded: list | None = None):
    """(maps, masks, scores, member maps or None) of one case in model slice space. ``single_coded``
    collects (label file, K) of binary masks stored as 0/K with K other than 1 (e.g. 0/255)."""
    from condiff.preprocess import mask_to_slices

    if rec["outputs"].get("model_space") is None:
        raise CondiffError(rec["input"], "no model-space maps were saved for this case",
                           "rerun condiff-infer with --save-model-space (or --save-member-maps)")
    path = _output(out_dir, rec, "model_space")
    with np.load(path) as z:
        maps, slices, scores = _finite(path, z["maps"]), z["slices"], z["scores"]
        member_maps = _finite(path, z["member_maps"]) if "member_maps" in z.files else None
    if rec.get("kind") == "image":
        label = _read_label(label_path, shape=tuple(rec["geometry"]["input_shape"]), values=values)
        masks = mask_to_slices(label, rec["geometry"])
    else:
        like = _like_volume(out_dir / rec["outputs"]["map"]["path"])
        # the label map's own values are resampled, then > 0.4, as the reference does (§8 item 6); chosen
        # classes (--label-values) as 0/1, so a class's extent does not depend on its numeric code
        label = _read_label(label_path, like=like, values=values, raw=True)
        if single_coded is not None and values is None:
            coded = label[label != 0]
            if coded.size and coded.min() == coded.max() != 1:
                single_coded.append((label_path, float(coded.max())))
        masks = mask_to_slices(label, rec["geometry"])
    keep = kept_slices(rec, slices)
    return maps[keep], masks[keep], scores[keep], None if member_maps is None else member_maps[:, keep]


def _warn_single_coded(found: list[tuple[Path, float]]) -> None:
    """The benchmark resamples a label's own values before ``> 0.4`` (the reference's rule, meant for 0/1
    masks and class maps): a binary mask stored as 0/255 then spreads about a model pixel all round
    (an audit saw 4x the lesion pixels). Said once, with the remedy, since the numbers change silently."""
    if not found:
        return
    path, value = found[0]
    codes = sorted({v for _, v in found})
    logger.warning("%d label file(s) hold a single lesion value other than 1 (e.g. %s: 0/%g): the benchmark protocol "
                   "resamples label values before thresholding at 0.4, as the reference does, so such a mask covers "
                   "more than the same mask stored as 0/1 would; give --label-values %s to count it as 0/1",
                   len(found), path, value, ",".join(f"{v:g}" for v in codes))


BASELINES = ("bright", "dark", "median", "area")


def local_median_window(size: int) -> int:
    """The local-median baseline's window: an eighth of the slice side, odd, at least 3 (32 px: 5, 128 px: 17)."""
    return max(3, (size // 8) | 1)


def baseline_maps(slices: np.ndarray, foreground: np.ndarray,
                  value_range: tuple[float, float]) -> dict[str, np.ndarray]:
    """Non-learned reference maps on model-space slices ``(S, C, H, W)`` (channels averaged):
    "bright" = intensity above the range's floor, "dark" = below its ceiling, "median" = the absolute
    deviation from the median of a ``local_median_window`` square around the pixel (a generic
    "unlike its surroundings" detector), "area" = the brain mask itself (what slice size alone
    tells: its slice score is the brain's share of the slice); all 0 outside the foreground (brain
    mask), so background never outranks tissue. For MRI ([0, 1]) the first two are x · brain and
    (1 − x) · brain."""
    x = np.asarray(slices, dtype=np.float64)
    x = x.mean(axis=1) if x.ndim == 4 else x
    fg = np.asarray(foreground, dtype=bool).reshape(x.shape)
    lo, hi = value_range
    # outside the brain the slice's brain median stands in, so the brain's edge is not measured against the black
    filled = np.where(fg, x, np.array([np.median(s[m]) if m.any() else lo for s, m in zip(x, fg)])[:, None, None])
    local = _slice_medians(filled, local_median_window(x.shape[-1]))
    return {"bright": (x - lo) * fg, "dark": (hi - x) * fg, "median": np.abs(x - local) * fg,
            "area": fg.astype(np.float64)}


def _slice_medians(stack: np.ndarray, window: int) -> np.ndarray:
    """Each slice's ``window`` x ``window`` median filter (edges repeated), slices spread over the CPU
    cores: at 128 px a BraTS case takes seconds per core, and scipy's filter runs without the GIL."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from scipy import ndimage

    out = np.empty_like(stack)
    chunks = [c for c in np.array_split(np.arange(len(stack)), min(len(stack), os.cpu_count() or 1)) if c.size]

    def run(idx: np.ndarray) -> None:
        out[idx] = ndimage.median_filter(stack[idx], size=(1, window, window), mode="nearest")

    with ThreadPoolExecutor(max(1, len(chunks))) as pool:
        list(pool.map(run, chunks))
    return out


def case_baselines(out_dir: str | Path, rec: dict[str, Any]) -> dict[str, np.ndarray]:
    """``baseline_maps`` of one case on exactly the slices ``_benchmark_case`` keeps (read-only arrays,
    cached per model-space file: the table, each label class and bench/healthy_response.py ask for
    the same case in one process, and the local median costs seconds a case at 128 px)."""
    from condiff.preprocess import PreprocessConfig

    path = Path(out_dir) / rec["outputs"]["model_space"]["path"]
    stat = path.stat()
    value_range = tuple(PreprocessConfig.from_dict(rec["options"]["preprocessing"]).value_range)
    return _cached_baselines(str(path), stat.st_mtime_ns, stat.st_size, rec.get("kind", "volume"), value_range)


@functools.lru_cache(maxsize=4)
def _cached_baselines(path: str, mtime_ns: int, size: int, kind: str, value_range: tuple) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        slices, foreground = z["slices"], z["foreground"]
    keep = kept_slices({"kind": kind}, slices)
    maps = baseline_maps(slices[keep], foreground[keep], value_range)
    for array in maps.values():
        array.flags.writeable = False
    return maps


def benchmark_arrays(out_dir: Path, rec: dict[str, Any], mask_pattern: str,
                     label_values: tuple[int, ...] | None = None):
    """(maps, masks, scores, member maps or None) of one finished case in model slice space, as the
    benchmark protocol scores it (for tools that score other maps on exactly the same pixels)."""
    return _benchmark_case(Path(out_dir), rec, find_mask(_case_of(rec), mask_pattern), label_values)


def _row(m: DetectionMetrics) -> dict[str, float]:
    return {k: getattr(m, k) for k in METRIC_KEYS}


def _with_given(row: dict[str, float], given: GivenThreshold | None, labels, values) -> dict[str, float]:
    if given is not None:
        row["dice_given"] = dice_at(labels, values, given.value)
    return row


def provenance(records: list[dict[str, Any]], mask_pattern: str, missing_label: str) -> dict[str, Any]:
    """Where the labels came from and what produced the maps (one method: ``check_single_method``)."""
    from condiff import __version__

    from .consistency import METHOD_OPTIONS, method_keys, series_volume_index

    first = records[0]
    options = dict(first.get("options") or {})
    if any(method_keys(r) == METHOD_OPTIONS for r in records):  # a 3-D case says nothing of --volume-index
        options["volume_index"] = series_volume_index(records)
    return {"masks": mask_pattern, "missing_label": missing_label, "model_set_digest": first.get("model_set_digest"),
            "method": {k: options.get(k) for k in METHOD_OPTIONS if k not in ("preprocessing", "schedule")},
            "engines": sorted({f"{r.get('engine')} {r.get('precision')}" for r in records}),
            "condiff_version": __version__}


def evaluate(out_dir: str | Path, mask_pattern: str, protocol: str = "native", overlays: bool = False,
             missing_label: str = "error", label_values: tuple[int, ...] | None = None,
             baselines: bool = False, threshold: GivenThreshold | None = None, bootstrap: int = 0,
             bootstrap_seed: int = 0, progress=None, lesion_iou: float = MIN_IOU,
             overlay_max: float | str | None = None) -> Evaluation:
    """Evaluate every ``ok`` record in ``out_dir`` (see the module docstring); ``overlays`` (native
    protocol) also draws ``eval-overlays/<case>.png``: the label's outline on the input and on the map,
    and the pixels called at the table's threshold (drawn after the table, once that is known), colours
    scaled to each case's maximum or, with ``overlay_max``, to that map value in every case ("shared":
    the largest map value of the evaluated pixels of all cases).
    ``missing_label``: ``error`` (a case without a label file is not evaluated) or ``normal`` (it
    counts as a case without lesion; counted in ``counts["cases_without_label"]``).
    ``label_values``: only these values of the label maps are lesion (e.g. BraTS (4,): enhancing
    tumour; default: every value > 0). ``baselines`` (benchmark protocol): also rows for the
    non-learned ``baseline_maps`` and chance on the same pixels. ``threshold``: a threshold chosen
    elsewhere (``read_given_threshold``); the ensemble's Dice at it is the ``dice_given`` column and
    the per-case rows use it instead of the pooled best-Dice threshold. ``bootstrap`` > 0: that many
    case resamples give 95 % intervals of every bootstrapped row and of the ensemble's difference to
    each other row (``engine.bootstrap``; ``progress(1)`` after each resample). ``lesion_iou``: the IoU
    at which lesions and called regions match in the lesion-wise counts (``engine.lesions``)."""
    from .consistency import check_single_method
    from .writer import clean_orphans, load_records

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}")
    if missing_label not in MISSING_LABEL:
        raise ValueError(f"missing_label must be one of {MISSING_LABEL}")
    if baselines and protocol != "benchmark":
        raise ValueError("baselines are computed on the model-space slices: use the benchmark protocol")
    required = missing_label == "error"
    out_dir = Path(out_dir)
    clean_orphans(out_dir, dead_writers_only=True)  # a killed eval's (or run's) temporary files
    # before the records: a run that finishes in between is then seen as unfinished, never as a whole folder
    unfinished = unfinished_runs(out_dir)
    every = load_records(out_dir)
    records = [r for r in every if r.get("status") == "ok"]
    if not records:
        raise CondiffError(out_dir, "holds no finished cases (records/*.json with status ok)",
                           "run condiff-infer into this folder first")
    check_single_method(records, out_dir)
    ev = Evaluation(protocol, label_values=tuple(label_values) if label_values else None, given=threshold,
                    lesion_iou=lesion_iou, provenance=provenance(records, mask_pattern, missing_label))
    if threshold is not None and threshold.source != "command line" and threshold.label_values != ev.label_values:
        logger.warning("the threshold from %s was chosen for label values %s, these data are evaluated for %s",
                       threshold.source, threshold.label_values or "all > 0", ev.label_values or "all > 0")
    differ = [] if threshold is None else other_maps(threshold, ev.provenance)
    if differ:
        logger.warning("the threshold from %s was chosen on maps made another way (%s): a threshold carries over "
                       "only between maps of one model set and method", threshold.source, "; ".join(differ))
    # cases that are not here to evaluate: failed in condiff-infer, or never reached (interrupted, shards)
    for rec in every:
        if rec.get("status") != "ok":
            ev.failures.append((rec.get("case", "?"), f"condiff-infer failed on it ({rec.get('error_type') or 'error'}: "
                                                      f"{rec.get('error') or 'see its record'}): no map to evaluate"))
    ev.failures += unfinished
    if not required and not any(_has_label(r, mask_pattern) for r in records):
        # --missing-label normal and no label file for any case: a mistyped --masks, said once, before any
        # map is read (at 4,000 cases the maps were all scored first, then 4,000 identical lines printed)
        ev.failures.append((f"all {len(records)} cases", f"no label file matches --masks {mask_pattern!r} for any case "
                                                           "(a mistyped pattern?): nothing to evaluate against"))
        return ev
    parts: list[tuple] = []
    scores_of: list[float] = []
    without_label: list[str] = []
    figures: list[tuple[dict[str, Any], Path | None]] = []  # (record, label file) of each case to draw
    label_of: dict[str, Path | None] = {}
    labels_found = 0  # label files the pattern found, usable or not
    single_coded: list[tuple[Path, float]] = []
    for rec in records:
        try:
            label_path = find_mask(_case_of(rec), mask_pattern, required=required)
            if label_path is None:
                without_label.append(rec["case"])
            else:
                labels_found += 1
            if protocol == "native":
                part = _native_case(out_dir, rec, label_path, values=ev.label_values)
            else:
                part = _benchmark_case(out_dir, rec, label_path, ev.label_values, single_coded)
                if baselines:
                    part = (*part, case_baselines(out_dir, rec))
        except (CondiffError, OSError, ValueError, KeyError) as exc:
            text = exc.message if isinstance(exc, CondiffError) else f"{type(exc).__name__}: {exc}"
            ev.failures.append((rec["case"], text))
            logger.info("case %s not evaluated: %s", rec["case"], text)  # the CLI lists them once, at the end
            continue
        parts.append(part)
        if overlays and protocol == "native":
            figures.append((rec, label_path))
        ev.cases.append(rec["case"])
        label_of[rec["case"]] = label_path
        scores_of.append(rec["score"])
    if parts and len(without_label) == len(parts) and not required:
        # no case has a label file: a mistyped --masks, not a healthy cohort (whose metrics would all be
        # undefined anyway); nothing is evaluated, so the CLI keeps an earlier evaluation's files
        why = (f"no label file matches --masks {mask_pattern!r} (nor for any other case: a mistyped pattern?)"
               if not labels_found else
               f"no label file matches --masks {mask_pattern!r}, and the {labels_found} that matched other cases "
               "could not be used (see those cases): no lesion to evaluate this case's map against")
        ev.failures += [(c, why) for c in ev.cases]
        ev.cases, parts = [], []
    if not parts:
        return ev
    _warn_shared_labels(label_of)
    _warn_single_coded(single_coded)
    lesions_of: dict[str, list[LesionDetection]] = {}  # per row: each case's lesion-wise counts at its threshold

    def with_lesion_f1(name: str, row: dict[str, float], case_maps: list | None = None) -> dict[str, float]:
        """``row`` with its lesion F1 at its own best-Dice threshold (of the ensemble's maps or
        ``case_maps``: one per case on the same pixels); the per-case counts go to ``lesions_of``."""
        lesions_of[name] = _lesion_counts(protocol, parts, case_regions, row["threshold"], lesion_iou, case_maps)
        row["lesion_f1"] = sum(lesions_of[name], LesionDetection()).f1
        return row

    if protocol == "native":
        py = np.concatenate([p[0] for p in parts])
        ps = np.concatenate([p[1] for p in parts])
        sy = np.concatenate([p[2] for p in parts])
        ss = np.concatenate([p[3] for p in parts])
        case_regions = [p[4] for p in parts]
        m = detection_metrics(sy, ss, py, ps, offset_regions(case_regions))
        ev.rows.append(("ensemble", _with_given(_row(m), threshold, py, ps)))
        pixels_of = [(p[0], p[1]) for p in parts]
    else:
        maps = np.concatenate([p[0] for p in parts])
        masks = np.concatenate([p[1] for p in parts])
        scores = np.concatenate([p[2] for p in parts])
        regions = lesion_regions(masks, per_slice=True)
        case_regions = np.split(regions, np.cumsum([len(p[1]) for p in parts])[:-1])  # per case; ids stay unique
        m = slice_metrics(maps, masks, scores, regions)
        ev.rows.append(("ensemble", _with_given(_row(m), threshold, masks, maps)))
        pixels_of = [(p[1], p[0]) for p in parts]
        if all(p[3] is not None for p in parts) and len({p[3].shape[0] for p in parts}) == 1:
            member_maps = np.concatenate([p[3] for p in parts], axis=1)
            per_member = [with_lesion_f1(f"member {k}", _row(slice_metrics(member_maps[k], masks, regions=regions)),
                                         [p[3][k] for p in parts]) for k in range(len(member_maps))]
            for k, row in enumerate(per_member):
                ev.rows.append((f"member {k}", row))
            for stat in ("avg", "max", "std"):
                ev.rows.append((f"members {stat}", {key: summarise([r[key] for r in per_member])[stat]
                                                     for key in (*METRIC_KEYS, "lesion_f1") if key != "threshold"}))
        if baselines:
            for name in BASELINES:
                row = _row(slice_metrics(np.concatenate([p[4][name] for p in parts]), masks, regions=regions))
                ev.rows.append((f"baseline: {name}", with_lesion_f1(f"baseline: {name}", row, [p[4][name] for p in parts])))
            # a random map: PRO = FPR along the curve, so the normalised area is max_fpr / 2
            ev.rows.append(("chance", {"ap_image": m.n_positive_samples / m.n_samples, "auroc": 0.5,
                                       "ap_pixel": m.n_positive_pixels / m.n_pixels, "aupro": AUPRO_MAX_FPR / 2}))
    with_lesion_f1("ensemble", ev.rows[0][1])
    if bootstrap > 0:
        from .bootstrap import bootstrap as case_bootstrap

        ev.intervals = case_bootstrap(_pooled_rows(protocol, parts, ev.rows, case_regions, lesions_of,
                                                   None if threshold is None else threshold.value),
                                      bootstrap, bootstrap_seed, progress=progress)
    case_threshold = m.threshold if threshold is None else threshold.value
    detections = (lesions_of["ensemble"] if threshold is None else
                  _lesion_counts(protocol, parts, case_regions, case_threshold, lesion_iou))
    ev.lesion_threshold = float(case_threshold)
    if overlay_max == "shared":  # one scale for every figure: the largest evaluated map value of any case
        top = max((float(np.max(p[1])) for p in parts if np.size(p[1])), default=0.0)
        overlay_max = top if top > 0 else None
        logger.info("eval figures share one colour scale: 0 to %s", overlay_max)
    for rec, label_path in figures:  # drawn once the threshold they show is known
        _write_figure(out_dir, rec, functools.partial(_native_figure, out_dir, rec, label_path, ev.label_values,
                                                      float(case_threshold), threshold is not None, overlay_max))
    ev.lesion_counts = sum(detections, LesionDetection())
    ev.per_case = [{**case_row(case, score, labels, values, case_threshold, det),
                    "label": None if label_of[case] is None else str(label_of[case])}
                   for case, score, (labels, values), det in zip(ev.cases, scores_of, pixels_of, detections)]
    ev.counts = {"cases": len(parts), "samples": m.n_samples, "positive_samples": m.n_positive_samples,
                 "pixels": m.n_pixels, "positive_pixels": m.n_positive_pixels, "lesions": m.n_regions}
    if not required:
        ev.counts["cases_without_label"] = len(without_label)
        ev.without_label = list(without_label)
    if label_values and not m.n_positive_pixels:
        logger.warning("no label holds any of the values %s: every case counts as lesion-free (values are exact "
                       "integers; check --label-values against the label maps)", ",".join(map(str, label_values)))
    if figures:
        _remove_stale_figures(out_dir, {rec["case"] for rec, _ in figures})
    return ev


def _warn_shared_labels(label_of: dict[str, Path | None]) -> None:
    """One label file scored as the lesions of several cases is almost always a --masks pattern
    without the case's name in it ({stem}, {base}, {case}): said once per such file."""
    users: dict[Path, list[str]] = {}
    for case, path in label_of.items():
        if path is not None:
            users.setdefault(Path(path).resolve(), []).append(case)
    for path, cases in sorted(users.items()):
        if len(cases) > 1:
            logger.warning("%s is the label of %d cases (%s): does --masks name each case's own file?", path,
                           len(cases), ", ".join(cases[:5]) + (", ..." if len(cases) > 5 else ""))


def _remove_stale_figures(out_dir: Path, drawn: set[str]) -> None:
    """eval-overlays/*.png of cases this evaluation did not draw (no longer evaluated): left, they would
    show another evaluation's threshold beside metrics that no longer count them."""
    root = out_dir / "eval-overlays"
    for path in sorted(root.rglob("*.png")) if root.is_dir() else []:
        case = path.relative_to(root).with_suffix("").as_posix()
        if case not in drawn:
            path.unlink(missing_ok=True)
            logger.info("removed %s: case %s was not evaluated this time", path, case)


def _lesion_counts(protocol: str, parts: list[tuple], case_regions: list[np.ndarray], threshold: float,
                   min_iou: float, case_maps: list | None = None) -> list[LesionDetection]:
    """Each case's lesion-wise counts at ``threshold``, its lesions as the table labelled them
    (``case_regions``); ``case_maps`` (benchmark): another map per case instead of the ensemble's."""
    maps = case_maps if case_maps is not None else [None] * len(parts)
    return [_case_lesions(protocol, part, ids, threshold, m, min_iou) for part, ids, m in zip(parts, case_regions, maps)]


def _case_lesions(protocol: str, part: tuple, regions: np.ndarray, threshold: float, case_map: np.ndarray | None,
                  min_iou: float) -> LesionDetection:
    """One case's lesion-wise counts; ``regions``: its lesion ids (benchmark: its slices; native: its
    evaluated voxels, placed back on the grid here)."""
    if protocol == "benchmark":
        maps = part[0] if case_map is None else case_map
        return lesion_detection(regions, maps >= threshold, per_slice=True, min_iou=min_iou)
    _, values, _, _, _, (shape, packed) = part
    size = int(np.prod(shape))
    sel = np.ones(shape, dtype=bool) if packed is None else np.unpackbits(packed, count=size).reshape(shape).astype(bool)
    called, ids = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=np.int32)
    called[sel], ids[sel] = values >= threshold, regions
    return lesion_detection(ids, called, min_iou=min_iou)


def _pooled_rows(protocol: str, parts: list[tuple], rows: list[tuple[str, dict]], case_regions: list[np.ndarray],
                 lesions_of: dict, given: float | None = None) -> dict:
    """``bootstrap.PooledCases`` per bootstrapped row (ensemble first; members and baselines where
    the table has them), case by case, on exactly the pixels and samples of the table.
    ``case_regions``: each case's lesion ids, as the table labelled them; ``lesions_of``: each row's
    per-case lesion-wise counts; ``given``: the --threshold whose Dice the ensemble row also bootstraps."""
    from .bootstrap import PooledCases

    names = [name for name, _ in rows]
    if protocol == "native":
        return {"ensemble": PooledCases([p[0] for p in parts], [p[1] for p in parts], case_regions,
                                        [p[2] for p in parts], [p[3] for p in parts],
                                        lesion_counts=lesions_of.get("ensemble"), given=given)}
    masks = [p[1] for p in parts]
    positive = [m.reshape(len(m), -1).any(axis=1) for m in masks]

    def pooled(name: str, maps: list[np.ndarray], scores: list[np.ndarray] | None = None,
               given: float | None = None) -> PooledCases:
        if scores is None:  # slice_metrics' sample score: the map's mean over the slice
            scores = [m.reshape(len(m), -1).astype(np.float64).mean(axis=1) for m in maps]
        return PooledCases(masks, maps, case_regions, positive, scores, lesion_counts=lesions_of.get(name), given=given)

    out = {"ensemble": pooled("ensemble", [p[0] for p in parts], [p[2] for p in parts], given)}
    for name in names:
        if name.startswith("member ") and name[7:].isdigit():
            out[name] = pooled(name, [p[3][int(name[7:])] for p in parts])
        elif name.startswith("baseline: "):
            out[name] = pooled(name, [p[4][name[10:]] for p in parts])
    return out


def format_intervals(ev: Evaluation) -> list[str]:
    """The bootstrap block under the table: each row's interval, then the ensemble minus each other row."""
    from .bootstrap import INTERVAL_KEYS

    iv = ev.intervals
    keys = [*INTERVAL_KEYS, *(["dice_given"] if any("dice_given" in v for v in iv.rows.values()) else [])]
    names = list(iv.rows) + [f"ensemble - {name}" for name in iv.differences]
    width = max(14, *(len(n) + 2 for n in names))
    lines = ["", f"{iv.level:.0%} intervals over {iv.n} case resamples (bootstrap, seed {iv.seed}); "
                 "a difference whose interval excludes 0 is unlikely to be luck of the case draw",
             f"{'':<{width}}" + "".join(f"{METRIC_LABELS[k]:>20}" for k in keys)]

    def cells(values: dict[str, list[float]]) -> str:
        return "".join(f"{'':>20}" if k not in values else f"{'-':>20}" if np.isnan(values[k][0]) else
                       f"  {values[k][0]:>7.4f} ..{values[k][1]:>8.4f}" for k in keys)

    for name, values in iv.rows.items():
        lines.append(f"{name:<{width}}{cells(values)}")
    for name, values in iv.differences.items():
        lines.append(f"{'ensemble - ' + name:<{width}}{cells(values)}")
    return lines


def format_table(ev: Evaluation) -> str:
    """A plain-text table labelled with its protocol."""
    head = f"condiff-eval  protocol: {ev.protocol}  ({DESCRIPTIONS[ev.protocol]})"
    lines = [head]
    if ev.label_values:
        values = ", ".join(str(v) for v in ev.label_values)
        lines.append(f"lesion = label values {values} (other values count as normal)")
    if ev.counts:
        c = ev.counts
        lines.append(f"{c['cases']} cases, {c['samples']} samples ({c['positive_samples']} positive), "
                     f"{c['pixels']} pixels ({c['positive_pixels']} positive"
                     + (f", in {c['lesions']} connected lesions" if c.get("lesions") else "") + ")"
                     + (f"; {c['cases_without_label']} case(s) without a label file counted as normal ("
                        + ", ".join(ev.without_label[:5]) + (", ..." if len(ev.without_label) > 5 else "") + ")"
                        if c.get("cases_without_label") else ""))
    cols = _columns(ev)
    width = max([14] + [len(name) + 2 for name, _ in ev.rows])
    lines.append(f"{'':<{width}}" + "".join(f"{METRIC_LABELS[k]:>11}" for k in cols))
    for name, values in ev.rows:
        cells = "".join(f"{values[k]:>11.4f}" if k in values and values[k] is not None else f"{'':>11}" for k in cols)
        lines.append(f"{name:<{width}}{cells}")
    if ev.rows:
        lines += ["best Dice threshold chosen on the evaluated data (as the benchmark does)",
                  "Dice@5%FPR: the most pixels called at <= 5 % of normal pixels; AUPRO@30%: mean overlap per "
                  f"connected lesion, area to {AUPRO_MAX_FPR:.0%} FPR; lesion F1: lesions and called regions matched "
                  f"at IoU >= {ev.lesion_iou:g}" + (" (the Shifts MS track's matching; 26/8-connected, counts pooled over cases)"
                                               if ev.lesion_iou == MIN_IOU else "")
                  + ", at each row's best-Dice thr"]
        if ev.given is not None:
            lines.append(f"Dice@given: threshold {ev.given.value:.6g} chosen outside these data ({ev.given.source})")
        if ev.counts.get("positive_pixels") == 0:
            lines.append("no label holds a lesion pixel: AP, AUROC, Dice and the best-Dice threshold are undefined; "
                         + ("the per-case rows count the pixels the given threshold calls (false positives)"
                            if ev.given is not None else "give --threshold (e.g. a labelled evaluation's "
                            "metrics-<protocol>.json) to count the false positives of these lesion-free cases"))
    if ev.lesion_counts is not None and ev.lesion_counts.lesions + ev.lesion_counts.called_regions > 0:
        lines.append(_lesion_line(ev))
    if ev.intervals is not None:
        lines += format_intervals(ev)
    if ev.per_case:
        shown = ev.per_case[:PRINTED_CASES]
        width = min(max(len(r["case"]) for r in shown), 40) + 2
        at = "the pooled thr" if ev.given is None else f"the given thr {ev.given.value:.6g}"
        lines += ["", f"per case (AP_p and best Dice of the case's pixels alone; Dice and pixels called at {at})",
                  f"{'case':<{width}}" + "".join(f"{CASE_LABELS[k]:>11}" for k in CASE_KEYS[1:])]
        for row in shown:
            lines.append(f"{row['case'][:width - 2]:<{width}}" + f"{row['score']:>11.3e}"
                         + "".join(_cell(row[k]) for k in CASE_KEYS[2:]))
        more = len(ev.per_case) - len(shown)
        lines.append((f"... {more} more; " if more else "") + f"every case: metrics-{ev.protocol}-cases.csv")
    for case, err in ev.failures:
        lines.append(f"not evaluated: {case}: {err}")
    return "\n".join(lines)


def _lesion_line(ev: Evaluation) -> str:
    d, thr = ev.lesion_counts, ev.lesion_threshold
    at = "the best-Dice thr" if ev.given is None else "the given thr"
    return (f"lesion-wise at {at} {thr:.6g}: {d.found} of {d.lesions} lesions found (recall {_ratio_text(d.recall)}); "
            f"{d.called_regions} called regions, {d.false_regions} false (precision "
            f"{_ratio_text(d.precision)}); lesion F1 {_ratio_text(d.f1)}")


def _ratio_text(value: float) -> str:
    return "-" if np.isnan(value) else f"{value:.3f}"


def _columns(ev: Evaluation) -> list[str]:
    return [*METRIC_KEYS, "lesion_f1", *(["dice_given"] if ev.given is not None else [])]


def _cell(value) -> str:
    if isinstance(value, int):
        return f"{value:>11d}"
    return f"{'-':>11}" if value is None or np.isnan(value) else f"{value:>11.4f}"


def cases_csv(ev: Evaluation) -> str:
    """Per-case rows; an undefined metric (no lesion in the case) is an empty cell."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["protocol", *CASE_KEYS])
    for row in ev.per_case:
        w.writerow([ev.protocol, *["" if isinstance(row[k], float) and np.isnan(row[k]) else
                                   repr(row[k]) if isinstance(row[k], float) else row[k] for k in CASE_KEYS]])
    return buf.getvalue()


def table_csv(ev: Evaluation) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = _columns(ev)
    w.writerow(["protocol", "row", *[METRIC_LABELS[k] for k in cols]])
    for name, values in ev.rows:
        w.writerow([ev.protocol, name, *["" if values.get(k) is None else repr(float(values[k])) for k in cols]])
    return buf.getvalue()


__all__ = ["PROTOCOLS", "BASELINES", "Evaluation", "GivenThreshold", "read_given_threshold", "lesion_regions", "evaluate", "benchmark_arrays", "baseline_maps", "case_baselines", "kept_slices", "case_row",
           "format_table", "table_csv", "cases_csv"]
