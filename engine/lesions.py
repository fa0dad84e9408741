"""Connected lesions, and lesion-wise detection at one threshold.

A lesion is a fully connected component of the label (8-connected in 2-D, 26 in 3-D; per slice in
model space). At a threshold, the called pixels form regions of their own, connected the same way.
Matching follows the lesion F1 of the Shifts 2.0 MS lesion track (Malinin et al., 2022): a lesion is
*found* when some called region overlaps it with IoU >= 0.25, and a called region is *true* when it
overlaps some lesion with IoU >= 0.25, else *false* (so one region flooding the brain finds nothing).
Lesion recall = found / lesions, precision = true regions / called regions, and
F1 = true / (true + (false regions + missed lesions) / 2): the counts MS lesion studies report beside
the pixel Dice, because one large lesion can carry the Dice while small ones go unseen.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def lesion_regions(label: np.ndarray, per_slice: bool = False) -> np.ndarray:
    """Connected lesions of a boolean label as ids > 0 (0 = normal), fully connected (8 in 2-D, 26
    in 3-D); ``per_slice``: components of each ``label[k]`` of an ``(N, H, W)`` stack on their own."""
    from scipy import ndimage

    label = np.asarray(label, dtype=bool)
    structure = np.ones((3,) * label.ndim, dtype=bool)
    if per_slice:
        structure[0] = structure[2] = False  # no connection between neighbouring slices
    ids, _ = ndimage.label(label, structure=structure)
    return ids


def offset_regions(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-case region ids so that every case's lesions keep ids of their own."""
    out, offset = [], 0
    for ids in parts:
        ids = np.asarray(ids)
        out.append(np.where(ids > 0, ids + np.int64(offset), 0).astype(np.int32))  # 4 bytes a pixel: cohorts are big
        offset += int(ids.max(initial=0))
    if offset >= np.iinfo(np.int32).max:
        raise ValueError(f"{offset} lesions do not fit 32-bit region ids")
    return np.concatenate(out)


MIN_IOU = 0.25


def _ratio(num: float, den: float) -> float:
    return float("nan") if den == 0 else num / den


def lesion_f1(lesions: float, found: float, called_regions: float, false_regions: float) -> float:
    """Shifts' lesion F1 from (possibly weighted) counts: true / (true + (false + missed) / 2), where
    true = called - false regions and missed = lesions - found; NaN without lesion and without call."""
    true = called_regions - false_regions
    return _ratio(true, true + 0.5 * (false_regions + lesions - found))


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise counts at one threshold (add them over cases)."""

    lesions: int = 0
    found: int = 0
    called_regions: int = 0
    false_regions: int = 0

    def __add__(self, other: "LesionDetection") -> "LesionDetection":
        return LesionDetection(self.lesions + other.lesions, self.found + other.found,
                               self.called_regions + other.called_regions, self.false_regions + other.false_regions)

    @property
    def recall(self) -> float:
        """Found / lesions; NaN without lesion."""
        return _ratio(self.found, self.lesions)

    @property
    def precision(self) -> float:
        """True regions / called regions; NaN when nothing is called."""
        return _ratio(self.called_regions - self.false_regions, self.called_regions)

    @property
    def f1(self) -> float:
        """Shifts' lesion F1 (``lesion_f1``)."""
        return lesion_f1(self.lesions, self.found, self.called_regions, self.false_regions)

    def to_dict(self) -> dict[str, float]:
        return {"lesions": self.lesions, "found": self.found, "called_regions": self.called_regions,
                "false_regions": self.false_regions, "recall": self.recall, "precision": self.precision,
                "f1": self.f1}


def _best_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For compact ids ``a`` (0..na) and ``b`` (0..nb) on one grid: each a-component's best IoU with a
    b-component, and each b-component's best with an a-component (index 0 unused; 0 where none overlaps)."""
    na, nb = int(a.max(initial=0)), int(b.max(initial=0))
    best_a, best_b = np.zeros(na + 1), np.zeros(nb + 1)
    both = (a > 0) & (b > 0)
    if both.any():
        pairs, inter = np.unique(a[both].astype(np.int64) * (nb + 1) + b[both], return_counts=True)
        ia, ib = pairs // (nb + 1), pairs % (nb + 1)
        size_a, size_b = np.bincount(a.ravel(), minlength=na + 1), np.bincount(b.ravel(), minlength=nb + 1)
        iou = inter / (size_a[ia] + size_b[ib] - inter)
        np.maximum.at(best_a, ia, iou)
        np.maximum.at(best_b, ib, iou)
    return best_a, best_b


def _compact_ids(ids: np.ndarray) -> np.ndarray:
    """Ids > 0 renumbered 1..n in order (they may be offset or sparse), 0 kept: by a lookup table where
    the largest id is small against the grid (a sort of a whole volume costs seconds), else by a sort."""
    if ids.size == 0:
        return ids.astype(np.int64)
    if ids.min() < 0:
        raise ValueError("lesion ids must be >= 0")
    top = int(ids.max())
    if top <= 4 * ids.size + 1024:
        present = np.bincount(ids.ravel(), minlength=top + 1) > 0
        present[0] = False
        return (np.cumsum(present) * present)[ids]
    values, inverse = np.unique(ids, return_inverse=True)
    return inverse.reshape(ids.shape) + (0 if values[0] == 0 else 1)


def lesion_detection(lesion_ids: np.ndarray, called: np.ndarray, per_slice: bool = False,
                     min_iou: float = MIN_IOU) -> LesionDetection:
    """Counts of one case: ``lesion_ids`` (ids > 0 per lesion, e.g. ``lesion_regions``) and ``called``
    (the binarised map) on the same grid; ``per_slice`` as in ``lesion_regions``."""
    lesion_ids = np.asarray(lesion_ids)
    called = np.asarray(called, dtype=bool)
    if lesion_ids.shape != called.shape:
        raise ValueError(f"lesion ids {lesion_ids.shape} and called pixels {called.shape} differ in shape")
    compact = _compact_ids(lesion_ids)
    regions = lesion_regions(called, per_slice=per_slice)
    best_lesion, best_region = _best_iou(compact, regions)
    n_regions = len(best_region) - 1
    return LesionDetection(len(best_lesion) - 1, int(np.sum(best_lesion[1:] >= min_iou)), n_regions,
                           n_regions - int(np.sum(best_region[1:] >= min_iou)))


__all__ = ["lesion_regions", "offset_regions", "LesionDetection", "lesion_detection", "lesion_f1", "MIN_IOU"]
