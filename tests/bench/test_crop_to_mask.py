"""bench/crop_to_mask.py: cropped scans give the same masked training slices in fewer bytes."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from condiff.io.volumes import read_mask, read_volume
from condiff.preprocess import PreprocessConfig, prepare_volume

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CONDIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
spec = importlib.util.spec_from_file_location("crop_to_mask", REPO / "bench" / "crop_to_mask.py")
crop_to_mask = importlib.util.module_from_spec(spec)
spec.loader.exec_module(crop_to_mask)


def test_cropped_ixi_scan_gives_the_same_training_slices(tmp_path):
    image = SHARED / "ixi-t1" / "IXI132-HH-1415-T1.nii.gz"
    if not image.is_file():
        pytest.skip(f"{image} not present (the data kit is not on this machine)")
    mask = image.with_name("IXI132-HH-1415-T1_brainmask.nii.gz")
    before, after = crop_to_mask.crop_pair(image, mask, tmp_path)
    assert after < 0.8 * before
    cfg = PreprocessConfig(modality="mri", normalisation="percentile", use_mask=True, image_size=64)
    slices = {}
    for name, folder in (("whole", image.parent), ("cropped", tmp_path)):
        vol = read_volume(folder / image.name)
        slices[name] = prepare_volume(vol, cfg, read_mask(folder / mask.name, vol))
    assert read_volume(tmp_path / image.name).data.size < read_volume(image).data.size
    # The same axial slices, numbered from the crop's first plane.
    shift = slices["whole"].slice_index - slices["cropped"].slice_index
    assert len(shift) == len(slices["whole"].slice_index) and np.all(shift == shift[0])
    np.testing.assert_allclose(slices["cropped"].slices, slices["whole"].slices, atol=1e-5)
    assert slices["whole"].slices.max() == 1.0


def test_help_exits_zero_and_missing_arguments_do_not():
    import subprocess
    import sys

    for flag in ("--help", "-h"):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "crop_to_mask.py"), flag],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "usage:" in proc.stdout and "SRC_DIR DEST_DIR" in proc.stdout
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "crop_to_mask.py")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_crops_every_pair_of_a_folder(tmp_path):
    """main SRC DEST (as bench/prepare_gpu_carry.sh calls it): each scan and its mask, cropped to the mask."""
    import nibabel as nib

    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    data = np.zeros((20, 20, 10), np.float32)
    data[5:10, 6:12, 3:6] = 1.0
    nib.save(nib.Nifti1Image(data * 100, np.eye(4)), src / "X-T1.nii.gz")
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4)), src / "X-T1_brainmask.nii.gz")
    assert crop_to_mask.main([str(src), str(dest)]) == 0
    assert nib.load(str(dest / "X-T1.nii.gz")).shape == (9, 10, 7)  # the mask's box plus 2 voxels each side
    assert nib.load(str(dest / "X-T1_brainmask.nii.gz")).shape == (9, 10, 7)
