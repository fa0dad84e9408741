"""Lesion-wise counts the way the Shifts 2.0 MS track's lesion F1 computes them, mask by mask with
skimage's labelling: the independent oracle of ``condiff.engine.lesions``."""
import numpy as np
from skimage.measure import label as connected


def shifts_counts(label, called, connectivity, min_iou=0.25):
    """(lesions, found, called regions, false regions) of one grid: a lesion is found, and a region
    true, when its best IoU with a component of the other side is at least ``min_iou``."""
    label, called = np.asarray(label, dtype=bool), np.asarray(called, dtype=bool)
    lesions, n_lesions = connected(label, connectivity=connectivity, return_num=True)
    regions, n_regions = connected(called, connectivity=connectivity, return_num=True)

    def iou(i, j):
        a, b = lesions == i, regions == j
        return np.sum(a & b) / np.sum(a | b)

    found = sum(any(iou(i, j) >= min_iou for j in np.unique(regions[lesions == i]) if j)
                for i in range(1, n_lesions + 1))
    true = sum(any(iou(i, j) >= min_iou for i in np.unique(lesions[regions == j]) if i)
               for j in range(1, n_regions + 1))
    return n_lesions, found, n_regions, n_regions - true


def shifts_f1(lesions, found, called, false):
    """The Shifts track's lesion F1 from those counts: true regions / (true + (false + missed) / 2)."""
    return (called - false) / (called - false + 0.5 * (false + lesions - found))
