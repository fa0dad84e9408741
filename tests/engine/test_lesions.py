"""Lesion-wise detection counts against a hand-worked case and an independent skimage/set oracle."""
import numpy as np
import pytest

from condiff.engine.lesions import LesionDetection, lesion_detection, lesion_regions

measure = pytest.importorskip("skimage.measure")


def test_hand_worked_slice():
    label = np.zeros((12, 12), dtype=bool)
    label[1:3, 1:3] = True      # lesion A: hit by a called region that spills over it
    label[1:3, 8:10] = True     # lesion B: missed
    label[6, 1] = True          # lesion C and D: one called region bridges both
    label[6, 4] = True
    called = np.zeros_like(label)
    called[2:5, 2:5] = True     # touches A
    called[9:11, 9:11] = True   # touches nothing: false
    called[6, 1:5] = True       # one region over C and D
    called[11, 0] = True        # a single false pixel
    det = lesion_detection(lesion_regions(label), called)
    assert det == LesionDetection(lesions=4, found=3, called_regions=4, false_regions=2)
    assert det.recall == 0.75 and det.precision == 0.5 and abs(det.f1 - 0.6) < 1e-12


def test_connectivity_decides_what_is_one_region():
    called = np.zeros((2, 4, 4), dtype=bool)
    called[0, 0, 0] = called[1, 1, 1] = True   # diagonal neighbours across slices
    label = np.zeros_like(called)
    label[0, 0, 0] = True
    assert lesion_detection(lesion_regions(label), called) == LesionDetection(1, 1, 1, 0)  # 26-connected: one region
    per_slice = lesion_detection(lesion_regions(label, per_slice=True), called, per_slice=True)
    assert per_slice == LesionDetection(1, 1, 2, 1)  # slice by slice: the second voxel is a region of its own


def _oracle(label, called, connectivity):
    """Counts from skimage's labelling and Python sets, pixel by pixel."""
    lesions, n_lesions = measure.label(label, connectivity=connectivity, return_num=True)
    regions, n_regions = measure.label(called, connectivity=connectivity, return_num=True)
    found, touching = set(), set()
    for idx in zip(*np.nonzero(label & called)):
        found.add(lesions[idx])
        touching.add(regions[idx])
    return n_lesions, len(found), n_regions, n_regions - len(touching)


@pytest.mark.parametrize("seed", range(6))
def test_random_volumes_match_the_oracle(seed):
    rng = np.random.default_rng(seed)
    label = rng.random((6, 14, 14)) < 0.08 + 0.04 * (seed % 3)
    called = rng.random((6, 14, 14)) < 0.1
    det = lesion_detection(lesion_regions(label), called)
    assert (det.lesions, det.found, det.called_regions, det.false_regions) == _oracle(label, called, 3)
    stack = lesion_detection(lesion_regions(label, per_slice=True), called, per_slice=True)
    by_slice = np.sum([_oracle(label[k], called[k], 2) for k in range(len(label))], axis=0)
    assert (stack.lesions, stack.found, stack.called_regions, stack.false_regions) == tuple(by_slice)


def test_undefined_ratios_and_sums():
    nothing = lesion_detection(np.zeros((4, 4), dtype=int), np.zeros((4, 4), dtype=bool))
    assert nothing == LesionDetection() and np.isnan(nothing.recall) and np.isnan(nothing.f1)
    false_only = LesionDetection(0, 0, 3, 3)
    assert false_only.precision == 0.0 and np.isnan(false_only.recall)
    total = LesionDetection(2, 1, 1, 0) + false_only
    assert total == LesionDetection(2, 1, 4, 3) and total.recall == 0.5 and total.precision == 0.25
    missed_all = LesionDetection(3, 0, 2, 2)
    assert missed_all.f1 == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        lesion_detection(np.zeros((3, 3), dtype=int), np.zeros((3, 4), dtype=bool))
