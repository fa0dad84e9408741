"""Training data: copies of a scan, unreadable scans and reader hints (mutation audit 3)."""
import shutil

import numpy as np
import pytest

from condiff.errors import InputImageError
from condiff.preprocess import PreprocessConfig
from condiff.train import data as tdata
from _train_helpers import phantom_volume

PRE = PreprocessConfig(modality="mri", image_size=32, normalisation="percentile", use_mask=False)


def test_every_copy_of_a_scan_is_warned_about_naming_the_original(tmp_path, caplog):
    """Three byte-identical files: the second and third are dropped, each warning naming the first
    (the file that is trained on), never a copy that was itself dropped."""
    phantom_volume(tmp_path / "a.nii.gz", seed=1)
    shutil.copy(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
    shutil.copy(tmp_path / "a.nii.gz", tmp_path / "c.nii.gz")
    phantom_volume(tmp_path / "d.nii.gz", seed=2)
    with caplog.at_level("WARNING"):
        cases = tdata.list_cases(tmp_path)
    assert [c.name for c in cases] == ["a", "d"]
    for copy in ("b", "c"):
        assert f"{tmp_path / copy}.nii.gz: the same bytes as {tmp_path / 'a.nii.gz'};" in caplog.text, caplog.text


def test_a_scan_that_cannot_be_hashed_is_an_input_error_naming_it(tmp_path, monkeypatch):
    phantom_volume(tmp_path / "a.nii.gz", seed=1)
    shutil.copy(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")  # equal sizes: both are hashed

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(tdata, "file_sha256", denied)
    with pytest.raises(InputImageError) as info:
        tdata.list_cases(tmp_path)
    assert info.value.message.startswith(f"{tmp_path / 'a.nii.gz'}: cannot be read (Permission denied)")


def test_a_reader_error_without_training_advice_keeps_its_own_hint(tmp_path):
    """Only condiff-infer's option advice (series, NaN) and no advice at all become training advice; the
    reader's own fix (here: a degenerate affine) is kept."""
    import nibabel as nib

    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 2] = affine[:3, 1]  # two parallel axes
    data = np.random.default_rng(0).uniform(1, 2, (20, 20, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(InputImageError) as info:
        tdata.read_training_volume(tmp_path / "flat.nii.gz")
    assert "Fix the qform/sform of the file" in info.value.message
    assert "remove it from the training data" not in info.value.message


def test_the_other_data_pool_warns_about_a_copy_once(tmp_path, caplog):
    """load_source_pool lists the folder once (listing again repeated every warning)."""
    for i in range(2):
        phantom_volume(tmp_path / f"s{i}.nii.gz", seed=i)
    shutil.copy(tmp_path / "s0.nii.gz", tmp_path / "zcopy.nii.gz")
    with caplog.at_level("WARNING"):
        pool = tdata.load_source_pool(tmp_path, 32, fov_mm=None)
    assert len(pool.images) > 0
    assert caplog.text.count("zcopy.nii.gz: the same bytes as") == 1, caplog.text


def test_same_size_scans_are_hashed_whole_only_when_their_ends_agree(tmp_path, monkeypatch):
    """Uncompressed scans of one shape all have one size: distinct ones are told apart by their first and
    last MiB without a whole read; a copy, and a file that differs only in its middle, are hashed whole
    (the whole digest decides: the middle-edited file is no copy)."""
    rng = np.random.default_rng(0)
    size = 3 << 20  # three MiB: a middle the ends' digest does not see
    base = rng.integers(0, 256, size, dtype=np.uint8)
    (tmp_path / "a.nii").write_bytes(base.tobytes())
    (tmp_path / "b.nii").write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())  # distinct
    (tmp_path / "c.nii").write_bytes(base.tobytes())  # a copy of a
    middle = base.copy()
    middle[size // 2] ^= 1
    (tmp_path / "d.nii").write_bytes(middle.tobytes())  # a's ends, another middle
    whole = []
    real = tdata.file_sha256
    monkeypatch.setattr(tdata, "file_sha256", lambda path: whole.append(path.name) or real(path))
    cases = [tdata.Case(name=p.stem, path=p, kind="volume") for p in sorted(tmp_path.glob("*.nii"))]
    kept = tdata.distinct_content(cases)
    assert [c.name for c in kept] == ["a", "b", "d"]
    assert sorted(whole) == ["a.nii", "c.nii", "d.nii"]  # b's ends differ: never read whole
