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


def test_photos_train_as_uncentred_zero_to_one_images(tmp_path):
    """The tasks run on [0, 1] (§1): a photo at the model size comes back as its own pixels / 255."""
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    slices = tdata.load_slices(tmp_path, PreprocessConfig(modality="rgb", image_size=32))
    assert slices.images.shape == (1, 3, 32, 32) and slices.modality == "rgb"
    np.testing.assert_allclose(slices.images[0], rgb.transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-6)


def test_a_mask_pattern_given_for_photos_is_said_to_be_unused(tmp_path, caplog):
    """Photos train whole (the reference gives the black border no special treatment): a retina mask
    pattern was recorded on the card and silently not applied."""
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "a_mask.png")
    with caplog.at_level("WARNING", logger="condiff.train.data"):
        slices = tdata.load_slices(tmp_path, PreprocessConfig(modality="rgb", image_size=32),
                                   mask_pattern="{dir}/{stem}_mask.png")
    assert slices.cases == ["a"]
    assert "the mask pattern is not applied to photographs" in caplog.text
    np.testing.assert_allclose(slices.images[0], rgb.transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-6)


def _masked(tmp_path):
    import nibabel as nib

    folder = tmp_path / "data"
    folder.mkdir()
    phantom_volume(folder / "a.nii", seed=0, mask_path=folder / "a_brainmask.nii.gz")  # uncompressed: fixed size
    cfg = PreprocessConfig(modality="mri", image_size=32, normalisation="percentile", use_mask=True)
    return folder, cfg, nib


def test_the_slice_cache_follows_the_brain_mask_and_the_image_bytes(tmp_path):
    """A cached case is reused only while its image and its mask are the files it was made from."""
    import os

    folder, cfg, nib = _masked(tmp_path)
    pattern, cache = "{dir}/{stem}_brainmask.nii.gz", tmp_path / "cache"
    first = tdata.load_slices(folder, cfg, pattern, cache_dir=cache)
    np.testing.assert_array_equal(first.images, tdata.load_slices(folder, cfg, pattern).images)
    # a smaller brain mask (same shape, other bytes): the cached arrays no longer hold
    mask_img = nib.load(folder / "a_brainmask.nii.gz")
    mask = np.asarray(mask_img.dataobj).copy()
    mask[:, :20] = 0
    nib.save(nib.Nifti1Image(mask, mask_img.affine), str(folder / "a_brainmask.nii.gz"))
    fresh = tdata.load_slices(folder, cfg, pattern).images
    assert not np.array_equal(fresh, first.images)
    np.testing.assert_array_equal(tdata.load_slices(folder, cfg, pattern, cache_dir=cache).images, fresh)
    # the image rewritten in place with other voxels and the same size: only its mtime tells
    st = (folder / "a.nii").stat()
    phantom_volume(folder / "a.nii", seed=3)
    assert (folder / "a.nii").stat().st_size == st.st_size
    os.utime(folder / "a.nii", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh = tdata.load_slices(folder, cfg, pattern).images
    assert not np.array_equal(fresh, first.images)
    np.testing.assert_array_equal(tdata.load_slices(folder, cfg, pattern, cache_dir=cache).images, fresh)


def test_a_damaged_or_foreign_cache_file_is_rebuilt(tmp_path):
    folder, cfg, _ = _masked(tmp_path)
    pattern, cache = "{dir}/{stem}_brainmask.nii.gz", tmp_path / "cache"
    want = tdata.load_slices(folder, cfg, pattern, cache_dir=cache).images
    (path,) = cache.glob("*.npy")
    for stale in (want[0], want.astype(np.float64)):  # a 3-D array, a float64 array: not this version's
        np.save(path, stale)
        got = tdata.load_slices(folder, cfg, pattern, cache_dir=cache).images
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_a_scan_without_a_usable_slice_is_left_out_of_the_cases_and_subjects(tmp_path, caplog):
    import nibabel as nib

    folder, cfg, _ = _masked(tmp_path)
    phantom_volume(folder / "b.nii.gz", seed=1)
    speck = np.zeros((40, 40, 12), np.uint8)
    speck[19:22, 19:22, 6] = 1  # a 3 x 3 voxel brain mask: no slice holds 5 % brain
    nib.save(nib.Nifti1Image(speck, np.diag([4.0, 4.0, 4.0, 1.0])), str(folder / "b_brainmask.nii.gz"))
    cfg = PreprocessConfig.from_dict({**cfg.to_dict(), "min_foreground_fraction": 0.05})
    with caplog.at_level("WARNING", logger="condiff.train.data"):
        slices = tdata.load_slices(folder, cfg, "{dir}/{stem}_brainmask.nii.gz")
    assert slices.cases == ["a"] and slices.subjects == ["a"] and set(slices.case.tolist()) == {0}
    assert "no non-empty slice, skipped" in caplog.text


@pytest.mark.parametrize("name", ["sub-01-extra_T1w", "sub-01.5_T1w", "flat/sub-01+x"])
def test_a_name_that_only_starts_like_a_bids_subject_is_its_own_subject(name):
    assert tdata.subject_of(name) == name


def test_a_long_path_gets_a_cache_file_name_that_fits_and_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """A case whose flattened relative path exceeds a file name's 255 bytes (each folder short) is cached under
    a cut name; a full disk while caching names the cache file and leaves no partial file."""
    import errno
    import os

    from condiff.errors import is_out_of_space
    from condiff.io import atomic

    deep = tmp_path / "data" / ("study-" + "a" * 70) / ("site-" + "b" * 60) / "sub-00"
    deep.mkdir(parents=True)
    phantom_volume(deep / ("sub-00_" + "c" * 80 + "_T1w.nii.gz"))
    cache = tmp_path / "cache"
    got = tdata.load_slices(tmp_path / "data", PRE, cache_dir=cache).images
    (cached,) = cache.glob("*.npy")
    assert len(os.fsencode(cached.name)) <= 255 and cached.name.startswith("study-")
    np.testing.assert_array_equal(tdata.load_slices(tmp_path / "data", PRE, cache_dir=cache).images, got)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write to a full disk: no file name

    monkeypatch.setattr(atomic, "write_bytes_atomic", full)
    with pytest.raises(OSError) as err:
        tdata.load_slices(tmp_path / "data", PRE, cache_dir=tmp_path / "cache2")
    assert is_out_of_space(err.value) and err.value.filename and "cache2" in err.value.filename


def test_empty_and_constant_volumes_say_what_to_do_with_the_training_folder(tmp_path):
    import nibabel as nib

    for name, value in (("empty", 0.0), ("constant", 7.0)):
        folder = tmp_path / name
        folder.mkdir()
        nib.save(nib.Nifti1Image(np.full((20, 20, 8), value, np.float32), np.diag([2.0, 2, 2, 1])), str(folder / "x.nii.gz"))
        with pytest.raises(InputImageError) as err:
            tdata.load_slices(folder, PRE)
        assert "remove it from the training data" in err.value.message, err.value.message
