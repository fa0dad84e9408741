"""Training data: subjects (BIDS sessions stay on one side of the holdout) and training-specific read errors."""
import numpy as np
import pytest

from condiff.errors import InputImageError
from condiff.preprocess import PreprocessConfig
from condiff.train import data as tdata
from _train_helpers import phantom_volume

PRE = PreprocessConfig(modality="mri", image_size=32, normalisation="percentile", use_mask=False)


@pytest.mark.parametrize("name, subject", [
    ("bids/sub-02/ses-1/anat/sub-02_ses-1_T1w", "sub-02"),
    ("sub-02/anat/sub-02_T1w", "sub-02"),
    ("sub-02_ses-2_T1w", "sub-02"),             # a flat folder: the file name's entity
    ("flat/sub-A1_run-1_T1w", "sub-A1"),
    ("IXI132-HH-1415-T1", "IXI132-HH-1415-T1"),  # no BIDS: the file is the subject
    ("x/sub-/y", "x/sub-/y"),
    ("subject-02_T1w", "subject-02_T1w"),
])
def test_subject_of_a_case(name, subject):
    assert tdata.subject_of(name) == subject


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids")
    for i, (sub, ses) in enumerate([("sub-01", "ses-1"), ("sub-02", "ses-1"), ("sub-02", "ses-2")]):
        anat = root / sub / ses / "anat"
        anat.mkdir(parents=True)
        phantom_volume(anat / f"{sub}_{ses}_T1w.nii.gz", seed=i)
    return root


def test_holdout_keeps_every_session_of_a_bids_subject_on_one_side(bids):
    slices = tdata.load_slices(bids, PRE)
    assert slices.subjects == ["sub-01", "sub-02"] and len(slices.cases) == 3
    train, val = slices.split_holdout(1)
    assert train.subjects == ["sub-01"] and val.subjects == ["sub-02"]
    assert val.cases == ["sub-02/ses-1/anat/sub-02_ses-1_T1w", "sub-02/ses-2/anat/sub-02_ses-2_T1w"]
    assert not set(train.cases) & set(val.cases)
    assert len(train) + len(val) == len(slices)
    # every slice keeps its case: the slices of each side are those of its cases
    whole = {c: slices.images[slices.case == i] for i, c in enumerate(slices.cases)}
    for side in (train, val):
        for i, c in enumerate(side.cases):
            assert np.array_equal(side.images[side.case == i], whole[c])
    described = val.describe()
    assert described["subjects"] == ["sub-02"] and described["cases"] == val.cases
    with pytest.raises(Exception, match="holding out 2 of 2 subjects"):
        slices.split_holdout(2)
    # landmarks are fitted on the training subjects' cases: the same split
    cases = tdata.list_cases(bids)
    assert [c.name for c in tdata._training_cases(cases, 1)] == train.cases
    assert tdata.case_subjects(cases) == ["sub-01", "sub-02"]


@pytest.mark.parametrize("kind, expect, infer_only", [
    ("series", "fslroi IN OUT N 1", "--volume-index"),
    ("nan", "training needs finite voxels", "--nan-policy"),
])
def test_bad_volumes_advise_what_training_can_do(tmp_path, kind, expect, infer_only):
    path = tmp_path / "bad.nii.gz"
    phantom_volume(path, series=3 if kind == "series" else 0, nan=kind == "nan")
    with pytest.raises(InputImageError) as err:
        tdata.load_slices(tmp_path, PRE)
    assert expect in err.value.message and infer_only not in err.value.message, err.value.message
    assert str(path) in err.value.message
    # condiff-infer's reader keeps its own advice
    from condiff.io import volumes

    with pytest.raises(InputImageError, match=infer_only):
        volumes.read_volume(path)
