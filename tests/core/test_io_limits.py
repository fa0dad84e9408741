"""Readers' limits and messages: pixel and voxel limits, singular affines, the gzip OS byte, mask placeholders (mutation audit 3)."""
import gzip

import nibabel as nib
import numpy as np
import pytest

from condiff.errors import InputImageError
from condiff.io import images, volumes
from test_io import gzip_as_python313  # its helper


def _save(path, data, affine=None, dtype=None, slope=None):  # test_io.py's helper, copied
    img = nib.Nifti1Image(np.asarray(data), np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, 0)
    nib.save(img, str(path))
    return path


def _blob(shape=(20, 22, 12)):  # test_io.py's helper, copied
    data = np.zeros(shape, dtype=np.float32)
    data[4:16, 5:18, 2:10] = np.arange(12 * 13 * 8, dtype=np.float32).reshape(12, 13, 8) / 7
    return data


# ---- io/images.py

def test_an_image_of_exactly_the_pixel_limit_is_read(tmp_path, monkeypatch):
    """The limit is the largest allowed size (PIL's own meaning of MAX_IMAGE_PIXELS): 50x40 = 2000 of 2000 reads."""
    import tifffile
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "photo.tif", rgb)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    for name in ("photo.tif", "photo.png"):
        assert images.read_image(tmp_path / name).shape == (40, 50, 3)


def test_a_volumetric_tiff_counts_every_plane_against_the_pixel_limit(tmp_path, monkeypatch):
    """A tiled TIFF with ImageDepth decodes width x length x depth pixels: 32x32 x 16 planes = 16384 > 2000."""
    import tifffile
    from PIL import Image

    tifffile.imwrite(tmp_path / "vol.tif", np.random.default_rng(0).integers(0, 256, (16, 32, 32), dtype=np.uint8),
                     tile=(16, 16, 16), volumetric=True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with pytest.raises(InputImageError, match=r"vol\.tif: image of 32x512 = 16384 pixels is larger than the limit"):
        images.read_image(tmp_path / "vol.tif")


def test_a_tiff_above_the_pixel_limit_is_not_reported_as_damaged(tmp_path, monkeypatch):
    import tifffile
    from PIL import Image

    tifffile.imwrite(tmp_path / "photo.tif", np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputImageError) as info:
        images.read_image(tmp_path / "photo.tif")
    assert str(info.value).startswith(f"{tmp_path / 'photo.tif'}: image of 50x40 = 2000 pixels is larger")
    assert "unreadable or truncated" not in str(info.value)


def test_an_invalid_tiff_orientation_is_reported_as_ignored(tmp_path, caplog):
    import tifffile

    rgb = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "odd.tif", rgb, photometric="rgb", extratags=[(274, "H", 1, 9, True)])
    with caplog.at_level("WARNING", logger="condiff.io.images"):
        got = images.read_image(tmp_path / "odd.tif")
    np.testing.assert_array_equal(got, rgb / np.float32(255))  # nothing rotated
    assert f"{tmp_path / 'odd.tif'}: TIFF orientation 9 is not a valid value (1-8): ignored" in caplog.text


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_label_image_above_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    mask = np.zeros((40, 40), np.uint8)
    mask[5:9, 5:9] = 255
    Image.fromarray(mask).save(tmp_path / "big_mask.png")  # 1600 pixels: above the limit, below PIL's 2x refusal
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputImageError, match=r"big_mask\.png: image of 40x40 = 1600 pixels is larger than the limit"):
        images.read_label_image(tmp_path / "big_mask.png")


# ---- io/volumes.py

def test_a_nearly_singular_affine_is_refused_whatever_the_voxel_size(tmp_path):
    """The test is relative to the column lengths: 50 mm voxels whose third axis leans 1e-7 off the second
    (|det| 0.0125 mm^3, far above 1e-6 in absolute terms) are degenerate all the same."""
    affine = np.diag([50.0, 50.0, 50.0, 1.0])
    affine[:3, 2] = [0.0, 50.0, 50.0 * 1e-7]
    with pytest.raises(InputImageError, match="affine is singular/degenerate"):
        volumes.read_volume(_save(tmp_path / "lean.nii.gz", _blob(), affine))


def test_a_header_longer_than_max_dim_along_one_axis_is_refused(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape((8000, 4, 4))  # 128000 voxels: within the voxel limits, implausible along one axis
    hdr.set_qform(np.eye(4), code=1)
    (tmp_path / "long.nii.gz").write_bytes(gzip.compress(bytes(hdr.binaryblock) + b"\0" * 1004))
    with pytest.raises(InputImageError, match=r"long\.nii\.gz: header declares an implausible size \(8000, 4, 4\) "
                                              r"\(limit 4096 per axis\)"):
        volumes.read_volume(tmp_path / "long.nii.gz")


def test_written_nifti_gz_maps_have_the_fixed_gzip_os_byte_on_every_python(tmp_path, monkeypatch):
    """write_like goes through gzip_bytes: with Python 3.13's gzip (OS byte 255) the map is still the same file."""
    vol = volumes.read_volume(_save(tmp_path / "img.nii.gz", _blob()))
    volumes.write_like(tmp_path / "a.nii.gz", vol.data, vol)
    gzip_as_python313(monkeypatch)
    volumes.write_like(tmp_path / "b.nii.gz", vol.data, vol)
    assert (tmp_path / "b.nii.gz").read_bytes() == (tmp_path / "a.nii.gz").read_bytes()
    assert (tmp_path / "b.nii.gz").read_bytes()[9] == 3


# ---- io/atomic.py (via engine/plan.py's sha256_path)

def test_hashing_a_file_that_is_not_there_is_an_input_error_naming_it(tmp_path):
    from condiff.engine.plan import sha256_path

    with pytest.raises(InputImageError, match=r"gone\.nii\.gz"):
        sha256_path(tmp_path / "gone.nii.gz")


# ---- io/cases.py

@pytest.mark.parametrize("pattern", ["{dir}/{stem}_mask.nii.gz", "{dir}/{base}.mask.nii.gz", "{dir}/{case}_seg.nii.gz",
                                     "/labels/{casedir}/{stem}_seg.nii.gz"])
def test_every_documented_mask_placeholder_passes_the_option_check(pattern):
    from condiff.io.cases import check_mask_pattern

    assert check_mask_pattern(pattern) == pattern
