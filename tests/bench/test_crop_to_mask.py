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
