"""Connected lesions, and lesion-wise detection at one threshold.

A lesion is a fully connected component of the label (8-connected in 2-D, 26 in 3-D; per slice in
model space). At a threshold, the called pixels form regions of their own, connected the same way.
A lesion is *found* when at least one of its pixels is called; a called region is *false* when it
touches no lesion. Lesion recall = found / lesions, lesion precision = called regions touching a
lesion / called regions, lesion F1 their harmonic mean: the counts MS lesion studies report beside
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


def _ratio(num: int, den: int) -> float:
    return float("nan") if den == 0 else num / den


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
        """Called regions that touch a lesion / called regions; NaN when nothing is called."""
        return _ratio(self.called_regions - self.false_regions, self.called_regions)

    @property
    def f1(self) -> float:
        """Harmonic mean of lesion recall and precision; 0 when either is 0, NaN when either is undefined."""
        r, p = self.recall, self.precision
        if np.isnan(r) or np.isnan(p):
            return float("nan")
        return 0.0 if r + p == 0 else 2 * r * p / (r + p)

    def to_dict(self) -> dict[str, float]:
        return {"lesions": self.lesions, "found": self.found, "called_regions": self.called_regions,
                "false_regions": self.false_regions, "recall": self.recall, "precision": self.precision,
                "f1": self.f1}


def lesion_detection(lesion_ids: np.ndarray, called: np.ndarray, per_slice: bool = False) -> LesionDetection:
    """Counts of one case: ``lesion_ids`` (ids > 0 per lesion, e.g. ``lesion_regions``) and ``called``
    (the binarised map) on the same grid; ``per_slice`` as in ``lesion_regions``."""
    lesion_ids = np.asarray(lesion_ids)
    called = np.asarray(called, dtype=bool)
    if lesion_ids.shape != called.shape:
        raise ValueError(f"lesion ids {lesion_ids.shape} and called pixels {called.shape} differ in shape")
    in_lesion = lesion_ids > 0
    found = np.unique(lesion_ids[in_lesion & called]).size
    regions = lesion_regions(called, per_slice=per_slice)
    touching = np.unique(regions[in_lesion & called]).size  # every such pixel is in some called region
    n_regions = int(regions.max(initial=0))
    return LesionDetection(int(np.unique(lesion_ids[in_lesion]).size), int(found), n_regions, n_regions - int(touching))


__all__ = ["lesion_regions", "offset_regions", "LesionDetection", "lesion_detection"]
