"""Lesion-wise detection counts against a hand-worked case and an independent Shifts-style oracle."""
import numpy as np
import pytest

from condiff.engine.lesions import LesionDetection, lesion_detection, lesion_regions

pytest.importorskip("skimage.measure")
from lesion_oracle import shifts_counts  # noqa: E402  (needs skimage)


def _hand_worked():
    label = np.zeros((12, 12), dtype=bool)
    called = np.zeros_like(label)
    label[1:3, 1:3] = True      # A (4 px): covered by a 6-px region, IoU 4/6: found, the region true
    called[1:3, 1:4] = True
    label[1:3, 8:10] = True     # B: nothing called there: missed
    label[6:8, 0:2] = True      # C (4 px) inside a 25-px region: IoU 4/25 < 0.25, missed, the region false
    called[5:10, 0:5] = True
    label[9:11, 6:8] = True     # D (4 px) touched by a 1-px region: IoU exactly 1/4, found, the region true
    called[10, 6] = True
    called[10:12, 10:12] = True  # a region away from every lesion: false
    return label, called


def test_hand_worked_slice():
    label, called = _hand_worked()
    det = lesion_detection(lesion_regions(label), called)
    assert det == LesionDetection(lesions=4, found=2, called_regions=4, false_regions=2)
    assert det.recall == 0.5 and det.precision == 0.5 and det.f1 == 2 / (2 + 0.5 * (2 + 2))
    # any overlap instead of IoU 0.25: the flooding region finds C and counts as true
    assert lesion_detection(lesion_regions(label), called, min_iou=1e-9) == LesionDetection(4, 3, 4, 1)


def test_a_region_flooding_the_brain_finds_nothing():
    label = np.zeros((20, 20), dtype=bool)
    label[3:5, 3:5] = label[12:14, 12:14] = True
    det = lesion_detection(lesion_regions(label), np.ones_like(label))
    assert det == LesionDetection(2, 0, 1, 1) and det.f1 == 0.0


def test_connectivity_decides_what_is_one_region():
    called = np.zeros((2, 4, 4), dtype=bool)
    called[0, 0, 0] = called[1, 1, 1] = True   # diagonal neighbours across slices
    label = np.zeros_like(called)
    label[0, 0, 0] = True
    assert lesion_detection(lesion_regions(label), called) == LesionDetection(1, 1, 1, 0)  # 26-connected: one region
    per_slice = lesion_detection(lesion_regions(label, per_slice=True), called, per_slice=True)
    assert per_slice == LesionDetection(1, 1, 2, 1)  # slice by slice: the second voxel is a region of its own


@pytest.mark.parametrize("seed", range(6))
def test_random_volumes_match_theshifts_counts(seed):
    rng = np.random.default_rng(seed)
    label = rng.random((6, 14, 14)) < 0.08 + 0.04 * (seed % 3)
    # a map that catches most lesion pixels, plus scattered false calls
    called = (label & (rng.random(label.shape) < 0.7)) | (rng.random(label.shape) < 0.03 + 0.03 * (seed % 2))
    det = lesion_detection(lesion_regions(label), called)
    assert (det.lesions, det.found, det.called_regions, det.false_regions) == shifts_counts(label, called, 3)
    assert det.found > 0 and det.false_regions > 0  # the draws exercise both outcomes
    stack = lesion_detection(lesion_regions(label, per_slice=True), called, per_slice=True)
    by_slice = np.sum([shifts_counts(label[k], called[k], 2) for k in range(len(label))], axis=0)
    assert (stack.lesions, stack.found, stack.called_regions, stack.false_regions) == tuple(by_slice)
    # ids offset (as pooled over cases) or sparse give the same counts
    ids = lesion_regions(label)
    assert lesion_detection(np.where(ids > 0, 3 * ids + 1000, 0), called) == det
    assert lesion_detection(np.where(ids > 0, ids.astype(np.int64) * 10**9, 0), called) == det  # renumbered by a sort


def test_undefined_ratios_and_sums():
    nothing = lesion_detection(np.zeros((4, 4), dtype=int), np.zeros((4, 4), dtype=bool))
    assert nothing == LesionDetection() and np.isnan(nothing.recall) and np.isnan(nothing.f1)
    everything = lesion_detection(np.ones((4, 4), dtype=int), np.ones((4, 4), dtype=bool))  # no 0 id at all
    assert everything == LesionDetection(1, 1, 1, 0) and everything.f1 == 1.0
    false_only = LesionDetection(0, 0, 3, 3)
    assert false_only.precision == 0.0 and np.isnan(false_only.recall) and false_only.f1 == 0.0
    total = LesionDetection(2, 1, 1, 0) + false_only
    assert total == LesionDetection(2, 1, 4, 3) and total.recall == 0.5 and total.precision == 0.25
    with pytest.raises(ValueError, match=">= 0"):
        lesion_detection(-np.ones((3, 3), dtype=int), np.zeros((3, 3), dtype=bool))
    with pytest.raises(ValueError, match="differ in shape"):
        lesion_detection(np.zeros((3, 3), dtype=int), np.zeros((3, 4), dtype=bool))
