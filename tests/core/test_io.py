"""Image I/O: atomic writes, NIfTI validation and geometry-preserving output, photos, case discovery."""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import struct

import nibabel as nib
import numpy as np
import pytest

from condiff.errors import InputImageError, OutputConflictError
from condiff.io import atomic, cases, images, volumes


def _save(path, data, affine=None, dtype=None, slope=None):
    img = nib.Nifti1Image(np.asarray(data), np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, 0)
    nib.save(img, str(path))
    return path


def _blob(shape=(20, 22, 12)):
    data = np.zeros(shape, dtype=np.float32)
    data[4:16, 5:18, 2:10] = np.arange(12 * 13 * 8, dtype=np.float32).reshape(12, 13, 8) / 7
    return data


# ----------------------------------------------------------------------------------------- atomic


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(target) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(target, "w") as f:
            f.write("new")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_helpers_write_complete_deterministic_files(tmp_path):
    with atomic.atomic_write(tmp_path / "a.txt", "w") as f:
        f.write("x\n")
        (tmp,) = [p.name for p in tmp_path.iterdir()]  # while writing: only the hidden temporary file
        assert tmp.startswith(".a.txt.") and tmp.endswith(".tmp")
    assert (tmp_path / "a.txt").read_bytes() == b"x\n"
    atomic.write_json_atomic(tmp_path / "r.json", {"b": [1, 2.5], "a": "é"})
    assert (tmp_path / "r.json").read_text("utf-8") == '{\n "a": "é",\n "b": [\n  1,\n  2.5\n ]\n}\n'
    first = (tmp_path / "r.json").read_bytes()
    atomic.write_json_atomic(tmp_path / "r.json", {"a": "é", "b": [1, 2.5]})
    assert (tmp_path / "r.json").read_bytes() == first
    with pytest.raises(ValueError):
        atomic.write_json_atomic(tmp_path / "nan.json", {"score": float("nan")})
    assert not (tmp_path / "nan.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "r.json"]


# ----------------------------------------------------------------------------------------- reading volumes


def test_read_volume_applies_scaling_and_squeezes_singleton_4d(tmp_path):
    raw = (np.arange(20 * 22 * 12) % 200).reshape(20, 22, 12).astype(np.uint8)
    vol = volumes.read_volume(_save(tmp_path / "u8.nii.gz", raw, dtype=np.uint8, slope=3.5))
    assert vol.data.dtype == np.float32 and vol.data.shape == raw.shape
    np.testing.assert_array_equal(vol.data, raw.astype(np.float32) * np.float32(3.5))
    v4 = volumes.read_volume(_save(tmp_path / "one.nii", _blob()[..., None]))
    assert v4.data.shape == (20, 22, 12) and vol.zooms == (2.0, 2.0, 2.0)


def test_content_decides_compression_not_the_name(tmp_path):
    plain = _save(tmp_path / "plain.nii", _blob())
    renamed = tmp_path / "plain_named.nii.gz"
    renamed.write_bytes(plain.read_bytes())
    gz = tmp_path / "gz_named.nii"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    for p in (renamed, gz):
        np.testing.assert_array_equal(volumes.read_volume(p).data, _blob())


def _corrupt_cases(tmp_path):
    good = _save(tmp_path / "good.nii.gz", np.random.default_rng(0).random((30, 30, 20)).astype(np.float32))
    blob = good.read_bytes()
    plain = gzip.decompress(blob)
    out = {}
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    out["empty.nii.gz"] = "empty file"
    (tmp_path / "text.nii.gz").write_bytes(b"this is not an image at all, just text\n" * 20)
    out["text.nii.gz"] = "not a NIfTI file"
    (tmp_path / "photo.nii").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 400)
    out["photo.nii"] = "PNG image"
    (tmp_path / "truncated.nii.gz").write_bytes(blob[: len(blob) // 2])
    out["truncated.nii.gz"] = "truncated"
    (tmp_path / "truncated.nii").write_bytes(plain[: len(plain) - 1000])
    out["truncated.nii"] = "truncated"
    flipped = bytearray(blob)
    for i in range(len(blob) // 3, len(blob) // 3 + 64):  # damage the compressed stream mid-file
        flipped[i] ^= 0xFF
    (tmp_path / "bitflip.nii.gz").write_bytes(bytes(flipped))
    out["bitflip.nii.gz"] = "corrupt|truncated|unreadable"
    return out


def test_corrupt_files_raise_input_errors_naming_the_file(tmp_path):
    for name, problem in _corrupt_cases(tmp_path).items():
        with pytest.raises(InputImageError, match=problem) as info:
            volumes.read_volume(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name) + ": "), str(info.value)
    with pytest.raises(InputImageError, match="file not found"):
        volumes.read_volume(tmp_path / "missing.nii.gz")


def test_bitflip_inside_the_data_is_caught_by_the_crc(tmp_path):
    # Stored (level 0) deflate: flipping a data byte changes nothing but the CRC, which must be checked.
    raw = nib.Nifti1Image(_blob(), np.eye(4)).to_bytes()
    blob = bytearray(gzip.compress(raw, compresslevel=0))
    blob[len(blob) // 2] ^= 0x01
    (tmp_path / "crc.nii.gz").write_bytes(bytes(blob))
    with pytest.raises(InputImageError, match="crc.nii.gz: corrupt compressed data"):
        volumes.read_volume(tmp_path / "crc.nii.gz")


def test_content_problems_raise_input_errors(tmp_path):
    nan = _blob()
    nan[5, 6, 3] = np.nan
    nan[6, 6, 3] = np.inf
    _save(tmp_path / "nan.nii.gz", nan)
    with pytest.raises(InputImageError, match=r"nan.nii.gz: contains 2 NaN/Inf voxels"):
        volumes.read_volume(tmp_path / "nan.nii.gz")
    fixed = volumes.read_volume(tmp_path / "nan.nii.gz", nan_policy="zero")
    assert fixed.data[5, 6, 3] == 0 and fixed.data[6, 6, 3] == 0 and np.isfinite(fixed.data).all()

    _save(tmp_path / "series.nii.gz", np.stack([_blob(), _blob()], axis=-1))
    with pytest.raises(InputImageError, match=r"series.nii.gz: is a series of 2 volumes \(shape \(20, 22, 12, 2\)\), not one volume\. "
                                                 r"Pass --volume-index N"):
        volumes.read_volume(tmp_path / "series.nii.gz")
    _save(tmp_path / "const.nii.gz", np.full((8, 8, 8), 3.0, dtype=np.float32))
    with pytest.raises(InputImageError, match="const.nii.gz: constant volume"):
        volumes.read_volume(tmp_path / "const.nii.gz")
    _save(tmp_path / "zero.nii.gz", np.zeros((8, 8, 8), dtype=np.float32))
    with pytest.raises(InputImageError, match="zero.nii.gz: empty volume"):
        volumes.read_volume(tmp_path / "zero.nii.gz")



@pytest.mark.parametrize("affine, sizes", [(np.diag([2e6, 2e6, 2e6, 1.0]), "2e+06 x 2e+06 x 2e+06"),  # 2 km voxels
                                           (np.diag([2e-3, 2e-3, 2e-3, 1.0]), "0.002 x 0.002 x 0.002"),  # metres
                                           (np.diag([1.0, 1.0, 1e-9, 1.0]), "1 x 1 x 1e-09")])  # a collapsed axis
def test_absurd_voxel_sizes_are_refused_naming_them(tmp_path, affine, sizes):
    """Read as-is, these resample to a blank field of view or fail far away with a misleading reason."""
    _save(tmp_path / "absurd.nii.gz", _blob(), affine=affine)
    with pytest.raises(InputImageError, match=rf"absurd.nii.gz: the header's affine gives voxels of {re.escape(sizes)} mm"):
        volumes.read_volume(tmp_path / "absurd.nii.gz")
    ok = np.diag([0.4, 0.4, 6.0, 1.0])  # fine in-plane, thick slices: a real clinical geometry
    _save(tmp_path / "ok.nii.gz", _blob(), affine=ok)
    assert volumes.read_volume(tmp_path / "ok.nii.gz").zooms == pytest.approx((0.4, 0.4, 6.0))


def test_two_d_nifti_only_through_read_volume_or_slice(tmp_path):
    _save(tmp_path / "flat.nii.gz", _blob()[:, :, 5])
    with pytest.raises(InputImageError, match="flat.nii.gz: expected a 3-D volume, got a 2-D image"):
        volumes.read_volume(tmp_path / "flat.nii.gz")
    vol = volumes.read_volume_or_slice(tmp_path / "flat.nii.gz")
    assert vol.data.shape == (20, 22, 1)
    volumes.write_like(tmp_path / "map.nii.gz", vol.data * 2, vol)
    back = nib.load(tmp_path / "map.nii.gz")
    assert back.shape == (20, 22)  # a 2-D input gets a 2-D map


def test_volume_smaller_than_the_ssim_window_in_plane_is_refused(tmp_path):
    """Upscaling a slice narrower than the SSIM window (11 px) would invent structure; few slices are fine."""
    rng = np.random.default_rng(1)
    _save(tmp_path / "tiny.nii.gz", rng.random((9, 9, 5)).astype(np.float32) + 1)
    with pytest.raises(InputImageError, match=r"in-plane size 9x9 .*smaller than the SSIM window \(11 px\)") as info:
        volumes.read_volume(tmp_path / "tiny.nii.gz")
    assert str(info.value).startswith(str(tmp_path / "tiny.nii.gz") + ": ")
    with pytest.raises(InputImageError, match="in-plane size 9x9 .*a single slice"):  # a 2-D NIfTI: same rule
        volumes.read_volume_or_slice(_save(tmp_path / "tiny2d.nii.gz", rng.random((9, 9)).astype(np.float32) + 1))
    with pytest.raises(InputImageError, match="in-plane size 12x10 "):  # one short side is enough
        volumes.read_volume(_save(tmp_path / "narrow.nii.gz", rng.random((12, 10, 30)).astype(np.float32) + 1))
    assert volumes.read_volume(_save(tmp_path / "thin.nii.gz", rng.random((12, 12, 3)).astype(np.float32))).data.shape \
        == (12, 12, 3)
    assert volumes.read_volume_or_slice(_save(tmp_path / "flat.nii.gz", rng.random((11, 11)).astype(np.float32))).data.shape \
        == (11, 11, 1)
    like = volumes.Volume(np.ones((9, 9, 5), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), None, "x")
    assert not volumes.read_mask(_save(tmp_path / "tiny_mask.nii.gz", np.zeros((9, 9, 5), np.uint8)), like).any()  # masks: no rule


def test_in_plane_axes_follow_the_affine_not_the_storage_order(tmp_path):
    """The slice axis is the one the affine calls inferior-superior (as preprocess slices): a
    sagittally stored slab (P, S, R; 8 axial slices along axis 1, like the bundled IXI scans)
    is fine, the same array with a short side in-plane is not."""
    psr = np.array([[0, 0, 2.0, 0], [-2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    rng = np.random.default_rng(2)
    assert volumes.in_plane_axes(psr, (120, 8, 90)) == (0, 2)
    assert volumes.read_volume(_save(tmp_path / "slab.nii.gz", rng.random((30, 8, 24)).astype(np.float32), psr)).data.shape \
        == (30, 8, 24)
    with pytest.raises(InputImageError, match=r"in-plane size 9x24 \(shape \(9, 30, 24\), slices along axis 1\)"):
        volumes.read_volume(_save(tmp_path / "short.nii.gz", rng.random((9, 30, 24)).astype(np.float32) + 1, psr))


def test_huge_header_dims_refused_before_allocation(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape((64, 64, 64))
    block = bytearray(hdr.binaryblock)
    struct.pack_into("<8h", block, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)  # dim[]: 3-D, 2.7e13 voxels
    struct.pack_into("<f", block, 108, 352.0)  # vox_offset
    (tmp_path / "bomb.nii").write_bytes(bytes(block) + b"\0" * 4 + b"\0" * 1000)
    with pytest.raises(InputImageError, match=r"bomb.nii: header declares an implausible size \(30000, 30000, 30000\)"):
        volumes.read_volume(tmp_path / "bomb.nii")
    (tmp_path / "bomb.nii.gz").write_bytes(gzip.compress((tmp_path / "bomb.nii").read_bytes()))
    with pytest.raises(InputImageError, match="implausible size"):
        volumes.read_volume(tmp_path / "bomb.nii.gz")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_permissions(tmp_path):
    p = _save(tmp_path / "locked.nii.gz", _blob())
    p.chmod(0)
    try:
        with pytest.raises(InputImageError, match="locked.nii.gz: cannot read the file: permission denied"):
            volumes.read_volume(p)
    finally:
        p.chmod(0o644)


def test_permission_error_is_reported_even_as_root(tmp_path, monkeypatch):
    """The same path as above, reached by making open() fail the way a locked file does."""
    p = _save(tmp_path / "locked.nii.gz", _blob())

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    from condiff.io import atomic

    monkeypatch.setattr(atomic, "open", refuse, raising=False)  # both readers read their first bytes there
    with pytest.raises(InputImageError, match="locked.nii.gz: cannot read the file: permission denied"):
        volumes.read_volume(p)
    with pytest.raises(InputImageError, match="locked.nii.gz: cannot read the file: permission denied"):
        images.read_image(p)


def test_read_mask_checks_the_grid(tmp_path):
    vol = volumes.read_volume(_save(tmp_path / "img.nii.gz", _blob()))
    mask = volumes.read_mask(_save(tmp_path / "img_mask.nii.gz", (_blob() > 50).astype(np.uint8)), vol)
    assert mask.dtype == bool and mask.sum() == (_blob() > 50).sum()
    assert not volumes.read_mask(_save(tmp_path / "empty_mask.nii.gz", np.zeros((20, 22, 12), np.uint8)), vol).any()
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[0, 3] = 4.0
    _save(tmp_path / "moved_mask.nii.gz", np.ones((20, 22, 12), np.uint8), affine=shifted)
    with pytest.raises(InputImageError, match=r"moved_mask.nii.gz: mask affine differs from the affine of .*img.nii.gz"):
        volumes.read_mask(tmp_path / "moved_mask.nii.gz", vol)
    _save(tmp_path / "small_mask.nii.gz", np.ones((20, 22, 11), np.uint8))
    with pytest.raises(InputImageError, match=r"small_mask.nii.gz: mask shape \(20, 22, 11\) differs .*img.nii.gz"):
        volumes.read_mask(tmp_path / "small_mask.nii.gz", vol)


def _classes(shape=(20, 22, 12)):
    labels = np.zeros(shape, dtype=np.float32)
    labels[4:10, 5:12, 2:8] = 1
    labels[10:16, 5:12, 2:8] = 4
    return labels


def test_label_values_select_integer_classes_even_stored_with_rounding_and_refuse_other_maps(tmp_path):
    vol = volumes.read_volume(_save(tmp_path / "img.nii.gz", _blob()))
    labels = _classes()
    # float storage of a scaled label map: 1.0039, 3.9999993, ... (what an auditor's re-saved BraTS label read as)
    noisy = labels * np.float32(1 - 1e-7) + np.where(labels > 0, 0.0039, 0).astype(np.float32)
    path = _save(tmp_path / "seg.nii.gz", noisy, dtype=np.float32)
    np.testing.assert_array_equal(volumes.read_mask(path, vol, (4,)), labels == 4)
    np.testing.assert_array_equal(volumes.read_mask(path, vol, (1, 4)), labels > 0)
    # the benchmark's raw labels of chosen classes: 1 on them, whatever their code, as a binary label would be
    raw = volumes.read_mask(path, vol, (4,), raw=True)
    assert raw.dtype == np.float32
    np.testing.assert_array_equal(raw, (labels == 4).astype(np.float32))
    np.testing.assert_array_equal(volumes.read_mask(path, vol, raw=True), noisy)  # no classes: the values as stored
    prob = _save(tmp_path / "prob.nii.gz", labels / 8, dtype=np.float32)  # 0.125 and 0.5: no classes
    with pytest.raises(InputImageError, match=r"prob.nii.gz: holds values that are not integer classes \(e.g. 0.5 at voxel"):
        volumes.read_mask(prob, vol, (1,))


def test_fractional_masks_are_warned_about_and_nan_masks_get_a_hint_for_masks(tmp_path, caplog):
    vol = volumes.read_volume(_save(tmp_path / "img.nii.gz", _blob()))
    prob = _save(tmp_path / "prob.nii.gz", _classes() / 8, dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="condiff.io.volumes"):
        assert volumes.read_mask(prob, vol).sum() == (_classes() > 0).sum()
    assert "prob.nii.gz holds fractional values (e.g. 0.125" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="condiff.io.volumes"):
        volumes.read_mask(_save(tmp_path / "bin.nii.gz", _classes(), dtype=np.float32), vol)
    assert "fractional" not in caplog.text  # integer classes are no probability map
    bad = _classes()
    bad[5, 6, 3] = np.nan
    with pytest.raises(InputImageError) as info:
        volumes.read_mask(_save(tmp_path / "nan_mask.nii.gz", bad, dtype=np.float32), vol)
    assert "nan_mask.nii.gz" in str(info.value) and "NaN/Inf" in str(info.value)
    assert "--nan-policy" not in str(info.value) and "mask file" in str(info.value)  # no option of condiff-eval's


def test_a_jpeg_mask_is_warned_about(tmp_path, caplog):
    from PIL import Image

    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:20, 12:30] = 255
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=90)
    Image.fromarray(mask).save(tmp_path / "m.png")
    with caplog.at_level(logging.WARNING, logger="condiff.io.images"):
        images.read_label_image(tmp_path / "m.png")
    assert "JPEG" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="condiff.io.images"):
        images.read_label_image(tmp_path / "m.jpg")
    assert "m.jpg is a JPEG mask" in caplog.text and "PNG" in caplog.text


# ----------------------------------------------------------------------------------------- writing volumes


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_write_like_keeps_geometry_and_is_deterministic(tmp_path, suffix):
    # Different qform (rotation) and sform (scaled) with different codes, uint8 input with a slope.
    img = nib.Nifti1Image((np.arange(20 * 22 * 12) % 250).reshape(20, 22, 12).astype(np.uint8), None)
    img.header.set_slope_inter(4.0, 0.0)
    q = np.array([[0, -2.0, 0, 10], [2.0, 0, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    s = np.diag([2.1, 2.1, 2.4, 1.0])
    img.set_qform(q, code=1)
    img.set_sform(s, code=2)
    nib.save(img, str(tmp_path / "in.nii.gz"))
    vol = volumes.read_volume(tmp_path / "in.nii.gz")
    rng = np.random.default_rng(0)
    out_map = rng.random(vol.data.shape, dtype=np.float32) * 1e-3  # small floats: would be ruined by a uint8 slope
    volumes.write_like(tmp_path / f"map{suffix}", out_map, vol)
    volumes.write_like(tmp_path / f"again{suffix}", out_map.copy(), vol)
    assert (tmp_path / f"map{suffix}").read_bytes() == (tmp_path / f"again{suffix}").read_bytes()
    back = nib.load(tmp_path / f"map{suffix}")
    ref = nib.load(tmp_path / "in.nii.gz")
    assert back.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(back.dataobj), out_map)
    np.testing.assert_array_equal(back.affine, ref.affine)
    qb, qcode = back.get_qform(coded=True)
    sb, scode = back.get_sform(coded=True)
    assert (int(qcode), int(scode)) == (1, 2)
    np.testing.assert_array_equal(qb, ref.get_qform())
    np.testing.assert_array_equal(sb, ref.get_sform())
    for field in ("pixdim", "xyzt_units", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "srow_x", "srow_z"):
        np.testing.assert_array_equal(back.header[field], ref.header[field])
    raw = (tmp_path / f"map{suffix}").read_bytes()
    raw = gzip.decompress(raw) if suffix == ".nii.gz" else raw
    assert struct.unpack_from("<ff", raw, 112) == (1.0, 0.0)  # scl_slope, scl_inter stored as 1 and 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_like_on_kit_scans_overlays_the_input(shared_data, tmp_path):
    for name in ("ixi-t1/IXI132-HH-1415-T1.nii.gz", "ms-lesion/patient07_t1.nii.gz"):
        vol = volumes.read_volume(shared_data / name)
        volumes.write_like(tmp_path / "m.nii.gz", vol.data / 2, vol)
        back, ref = nib.load(tmp_path / "m.nii.gz"), nib.load(shared_data / name)
        np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), vol.data / 2)
        np.testing.assert_array_equal(back.affine, ref.affine)
        for form in ("qform_code", "sform_code", "quatern_b", "qoffset_x", "srow_x", "srow_y", "srow_z", "pixdim"):
            np.testing.assert_array_equal(back.header[form], ref.header[form])


# ----------------------------------------------------------------------------------------- photos


def _png_bytes(arr, mode=None):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_read_image_by_content_and_modes(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    (tmp_path / "png_named.jpg").write_bytes(_png_bytes(rgb))
    got = images.read_image(tmp_path / "png_named.jpg")
    assert got.shape == (40, 30, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, rgb.astype(np.float32) / 255)
    grey = rgb[:, :, 0]
    (tmp_path / "grey.png").write_bytes(_png_bytes(grey))
    np.testing.assert_array_equal(images.read_image(tmp_path / "grey.png"), np.repeat(grey[:, :, None], 3, 2) / np.float32(255))
    deep = (np.arange(40 * 30).reshape(40, 30) * 50).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_allclose(images.read_image(tmp_path / "deep.png")[:, :, 1], deep / 65535.0, rtol=0, atol=1e-7)
    rgba = np.concatenate([rgb, np.zeros((40, 30, 1), np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(images.read_image(tmp_path / "alpha.png"), got)  # alpha dropped, not composited
    smooth = np.repeat(np.linspace(0, 255, 30)[None, :, None], 40, axis=0).repeat(3, axis=2).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "photo.jpg", quality=95)
    np.testing.assert_allclose(images.read_image(tmp_path / "photo.jpg"), smooth / 255.0, rtol=0, atol=0.03)  # lossy
    import tifffile

    tifffile.imwrite(tmp_path / "deep.tif", np.stack([deep] * 3, axis=2), photometric="rgb")
    np.testing.assert_allclose(images.read_image(tmp_path / "deep.tif")[:, :, 2], deep / 65535.0, rtol=0, atol=1e-7)



@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_orientation_tag_is_applied_as_pil_applies_exif(tmp_path, orientation, caplog):
    """Oracle: Pillow's exif_transpose on the same pixels stored as a PNG with that EXIF orientation."""
    import tifffile
    from PIL import Image, ImageOps

    rng = np.random.default_rng(orientation)
    a = (rng.random((13, 17, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "p.png", exif=exif.tobytes())
    with Image.open(tmp_path / "p.png") as shown:
        want = np.asarray(ImageOps.exif_transpose(shown)).astype(np.float32) / 255
    tifffile.imwrite(tmp_path / "t.tif", a, extratags=[(274, "H", 1, orientation, True)])
    with caplog.at_level("WARNING", logger="condiff.io.images"):
        got = images.read_image(tmp_path / "t.tif")
    np.testing.assert_array_equal(got, want)
    assert ("TIFF orientation" in caplog.text) == (orientation != 1)
    mask = np.zeros((13, 17), np.uint8)
    mask[2, 3] = 1
    tifffile.imwrite(tmp_path / "m.tif", mask, extratags=[(274, "H", 1, orientation, True)])
    Image.fromarray(mask * 255).save(tmp_path / "m.png", exif=exif.tobytes())
    np.testing.assert_array_equal(images.read_label_image(tmp_path / "m.tif"), images.read_label_image(tmp_path / "m.png"))


def test_planar_rgb_tiff_and_grey_photos(tmp_path, caplog):
    import tifffile

    rng = np.random.default_rng(1)
    a = (rng.random((13, 17, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(a, -1, 0), planarconfig="separate", photometric="rgb")
    np.testing.assert_array_equal(images.read_image(tmp_path / "planar.tif"), a.astype(np.float32) / 255)
    tifffile.imwrite(tmp_path / "grey.tif", a[:, :, 0])
    with caplog.at_level("WARNING", logger="condiff.io.images"):
        grey = images.read_image(tmp_path / "grey.tif")
    assert (grey[:, :, 0] == grey[:, :, 2]).all() and "grey-scale photograph" in caplog.text


def test_bad_photos_raise_input_errors(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_bytes(b"hello world, not a picture")
    Image.fromarray(rgb[:8, :8]).save(tmp_path / "tiny.png")
    for name, problem in {"cut.jpg": "unreadable or truncated", "empty.png": "empty file",
                          "notes.png": "not a PNG, JPEG or TIFF", "tiny.png": "smaller than the SSIM window"}.items():
        with pytest.raises(InputImageError, match=problem) as info:
            images.read_image(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name) + ": ")


def test_image_writers_are_lossless_and_deterministic(tmp_path):
    import tifffile
    from PIL import Image

    m = np.random.default_rng(2).random((33, 47), dtype=np.float32) * 0.03
    images.write_float_tiff(tmp_path / "a.tiff", m)
    images.write_float_tiff(tmp_path / "b.tiff", m.copy())
    assert (tmp_path / "a.tiff").read_bytes() == (tmp_path / "b.tiff").read_bytes()
    back = tifffile.imread(tmp_path / "a.tiff")
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, m)
    rgb = np.random.default_rng(3).random((20, 21, 3), dtype=np.float32)
    images.write_float_tiff(tmp_path / "rgb.tiff", rgb)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "rgb.tiff"), rgb)

    u8 = images.to_png8(m, 0.0, 0.03)
    assert u8.dtype == np.uint8 and u8.min() >= 0 and abs(int(u8.max()) - 255) <= 1
    np.testing.assert_array_equal(images.to_png8(np.array([-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]), 0, 1), [0, 0, 128, 255, 255, 0])
    images.write_png(tmp_path / "a.png", u8)
    images.write_png(tmp_path / "b.png", u8.copy())
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), u8)
    with pytest.raises(TypeError):
        images.write_png(tmp_path / "c.png", m)
    assert not (tmp_path / "c.png").exists()


def test_fundus_kit_photo_and_mask(shared_data):
    img = images.read_image(shared_data / "fundus/IDRiD_01.jpg")
    assert img.shape == (2848, 4288, 3) and 0 <= img.min() and img.max() <= 1
    assert images.read_label_image(shared_data / "fundus/IDRiD_01_EX.png").sum() == 113290


# ----------------------------------------------------------------------------------------- cases


def _touch(root, *names):
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_discover_names_kinds_and_exclusions(tmp_path):
    root = tmp_path / "in"
    _touch(root, "sub-01/anat/T1w.nii.gz", "sub-01/anat/T1w_brainmask.nii.gz", "sub-02/anat/T1w.nii",
           "photos/eye.JPG", "photos/eye_EX.png", "photos/scan.tiff", "a_seg.nii.gz", "b_dlmuse.nii.gz",
           "notes.txt", "sub-01/anat/T1w.json", ".hidden.nii.gz", ".cache/x.nii.gz", "c-T1_lesionmask.nii.gz")
    found = cases.discover([root])
    assert [(c.name, c.kind) for c in found] == [
        ("photos/eye", "image"), ("photos/scan", "image"), ("sub-01/anat/T1w", "volume"), ("sub-02/anat/T1w", "volume")]
    assert found[2].path == root / "sub-01/anat/T1w.nii.gz"
    names = [c.name for c in cases.discover([root], exclude_patterns=["photos/*"])]
    assert "photos/eye" not in names and "sub-01/anat/T1w_brainmask" in names and "a_seg" in names
    # A file given directly: bare stem, never excluded.
    assert [c.name for c in cases.discover([root / "a_seg.nii.gz"])] == ["a_seg"]
    assert cases.discover([root]) == found  # deterministic


def test_discover_excludes_label_files_by_whole_name_part_and_reports_them(tmp_path, caplog):
    """A label word must be a whole "_" part of the name: x_masked and patient_EXAM2 are scans."""
    root = tmp_path / "in"
    labels = ["a_mask.nii.gz", "a_seg_v2.nii.gz", "IDRiD_01_EX.png", "b_brainmask.nii", "c_lesionmask.nii.gz",
              "d_dlmuse.nii.gz", "sub-01_desc-brain_mask.nii.gz", "t1_mask2.nii.gz", "x_masks.nii.gz",
              "x_seg-manual.nii.gz", "x_segmentation.nii.gz", "x_mask-brain.nii.gz", "sub_mask/scan.nii.gz",
              "lesion_masks/p1.nii.gz"]
    scans = ["sub-01_masked_T1w.nii.gz", "patient_EXAM2.nii.gz", "segment_T1.nii.gz", "x_Seg.nii.gz"]
    _touch(root, *labels, *scans)
    excluded = []
    with caplog.at_level(logging.WARNING, logger="condiff.io.cases"):
        found = cases.discover([root], excluded=excluded)
    assert sorted(c.path.name for c in found) == sorted(scans)
    assert sorted(p.relative_to(root).as_posix() for p in excluded) == sorted(labels)
    # a scan whose name only looks like a mask's is analysed, with a warning naming it
    warned = {r.getMessage().split(":")[0] for r in caplog.records}
    assert warned == {str(root / n) for n in ("sub-01_masked_T1w.nii.gz", "segment_T1.nii.gz", "x_Seg.nii.gz")}


def test_discover_collisions_and_errors(tmp_path):
    _touch(tmp_path / "in", "a.nii", "a.nii.gz", "b.png", "B.jpg", "c.nii.gz")
    with pytest.raises(OutputConflictError) as info:
        cases.discover([tmp_path / "in"])
    msg = str(info.value)
    assert "a.nii and" in msg and "a.nii.gz" in msg and "b.png" in msg and "B.jpg" in msg and "c.nii.gz" not in msg
    _touch(tmp_path / "x", "scan.nii.gz")
    _touch(tmp_path / "y", "scan.nii.gz")
    with pytest.raises(OutputConflictError, match="scan"):
        cases.discover([tmp_path / "x" / "scan.nii.gz", tmp_path / "y" / "scan.nii.gz"])
    with pytest.raises(InputImageError, match="input not found"):
        cases.discover([tmp_path / "nope"])
    _touch(tmp_path / "empty", "readme.md")
    with pytest.raises(InputImageError, match="0 supported files found"):
        cases.discover([tmp_path / "empty"])
    _touch(tmp_path, "scan.dcm")
    with pytest.raises(InputImageError, match="dcm2niix"):
        cases.discover([tmp_path / "scan.dcm"])


def test_dicom_inputs_get_the_full_dcm2niix_recipe(tmp_path):
    recipe = "dcm2niix -z y -b y -ba y -o OUT IN"
    assert cases.DCM2NIIX_RECIPE == recipe
    _touch(tmp_path / "series", "IM0001.dcm", "IM0002.DCM", "sub/IM0003.dcm", "notes.txt")
    with pytest.raises(InputImageError) as info:  # a folder of DICOM slices: nothing to read, say how to convert
        cases.discover([tmp_path / "series"])
    msg = str(info.value)
    assert msg.startswith(str(tmp_path / "series") + ": 0 supported files found") and recipe in msg, msg
    _touch(tmp_path / "plain", "readme.md")
    with pytest.raises(InputImageError) as info:  # no DICOM among the skipped files: no DICOM hint
        cases.discover([tmp_path / "plain"])
    assert "dcm2niix" not in str(info.value)
    with pytest.raises(InputImageError, match=recipe):  # a DICOM file given directly
        cases.discover([tmp_path / "series" / "IM0001.dcm"])
    (tmp_path / "dicom.nii.gz").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 400)  # DICOM bytes under a NIfTI name
    with pytest.raises(InputImageError, match=rf"dicom.nii.gz: not a NIfTI file \(the bytes are a DICOM file\)\. .*{recipe}"):
        volumes.read_volume(tmp_path / "dicom.nii.gz")
    (tmp_path / "dicm.nii").write_bytes(b"DICM" + b"\0" * 400)
    with pytest.raises(InputImageError, match=recipe):
        volumes.read_volume(tmp_path / "dicm.nii")


def test_dicom_files_without_an_extension_are_recognised_by_their_bytes(tmp_path):
    """Scanner exports are often IM0001 or 1.2.840...: the hint must come from the DICM marker."""
    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("IM0000", "IM0001", "1.2.840.113619.2.55.3.4"):
        (folder / name).write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    with pytest.raises(InputImageError) as info:
        cases.discover([folder])
    assert cases.DCM2NIIX_RECIPE in str(info.value)
    other = tmp_path / "other"
    other.mkdir()
    (other / "IM0000").write_bytes(b"\0" * 200)  # no marker: no DICOM hint
    with pytest.raises(InputImageError) as info:
        cases.discover([other])
    assert "dcm2niix" not in str(info.value)



def test_extensionless_dicom_beside_scans_is_named_in_a_warning(tmp_path, caplog):
    """A subject exported as raw DICOM in a mixed folder must not just go missing from the cohort."""
    _touch(tmp_path / "in", "s.nii.gz")
    (tmp_path / "in" / "sub-02").mkdir()
    for name in ("IM0001", "IM0002"):
        (tmp_path / "in" / "sub-02" / name).write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    with caplog.at_level("WARNING", logger="condiff.io.cases"):
        found = cases.discover([tmp_path / "in"])
    assert [c.name for c in found] == ["s"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "IM0001" in warned[0] and "DICOM" in warned[0] and "2 files" in warned[0]
    assert cases.DCM2NIIX_RECIPE in warned[0]


def test_an_earlier_output_folder_inside_the_input_tree_is_not_read_as_scans(tmp_path, caplog):
    _touch(tmp_path / "proj", "a.nii.gz")
    old = tmp_path / "proj" / "out1"
    _touch(old / "maps", "a.nii.gz")
    _touch(old / "restorations", "a.nii.gz")
    (old / "records").mkdir()
    (old / "run.json").write_text("{}")
    killed = tmp_path / "proj" / "out2"  # a run killed before its run.json: records/ and condiff.log
    _touch(killed / "maps", "a.nii.gz")
    (killed / "records").mkdir()
    (killed / "condiff.log").write_text("")
    _touch(tmp_path / "proj" / "notes", "b.nii.gz")  # records/ alone (or run.json alone) is not an output folder
    (tmp_path / "proj" / "notes" / "records").mkdir()
    with caplog.at_level("WARNING", logger="condiff.io.cases"):
        found = cases.discover([tmp_path / "proj"])
    assert [c.name for c in found] == ["a", "notes/b"]
    assert any("out1" in r.getMessage() and "output folder" in r.getMessage() for r in caplog.records)


def test_discover_processes_a_file_reached_twice_once(tmp_path):
    _touch(tmp_path / "in", "s.nii.gz")
    (tmp_path / "in" / "link").symlink_to(tmp_path / "in", target_is_directory=True)  # a loop
    found = cases.discover([tmp_path / "in", tmp_path / "in" / "s.nii.gz"])
    assert [c.name for c in found] == ["s"]


def test_find_mask_placeholders(tmp_path):
    _touch(tmp_path / "in", "sub-01/T1w.nii.gz", "sub-01/T1w_brainmask.nii.gz", "masks/sub-01/T1w.nii.gz")
    case = cases.discover([tmp_path / "in" / "sub-01"])[0]
    assert cases.find_mask(case, "{dir}/{stem}_brainmask.nii.gz") == tmp_path / "in/sub-01/T1w_brainmask.nii.gz"
    assert cases.find_mask(case, str(tmp_path / "in/masks/sub-01/{case}.nii.gz")) == tmp_path / "in/masks/sub-01/T1w.nii.gz"
    with pytest.raises(InputImageError, match=r"T1w.nii.gz: mask not found at .*T1w_mask.nii.gz"):
        cases.find_mask(case, "{dir}/{stem}_mask.nii.gz")
    assert cases.find_mask(case, "{dir}/{stem}_mask.nii.gz", required=False) is None
    with pytest.raises(ValueError, match="placeholder"):
        cases.find_mask(case, "{folder}/{stem}.nii.gz")
    json.dumps([c.name for c in cases.discover([tmp_path / "in"])])  # names are plain strings


def test_find_mask_casedir_reaches_a_bids_derivative_mask(tmp_path):
    ds = tmp_path / "ds"
    _touch(ds, "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "top_T1w.nii.gz",
           "derivatives/fmriprep/sub-01/ses-1/anat/sub-01_ses-1_desc-brain_mask.nii.gz",
           "derivatives/fmriprep/top_desc-brain_mask.nii.gz")
    found = {c.name: c for c in cases.discover([ds], cases.DEFAULT_EXCLUDE + ("derivatives/*",))}
    pattern = str(ds / "derivatives/fmriprep/{casedir}/{base}_desc-brain_mask.nii.gz")
    assert cases.find_mask(found["sub-01/ses-1/anat/sub-01_ses-1_T1w"], pattern) == \
        ds / "derivatives/fmriprep/sub-01/ses-1/anat/sub-01_ses-1_desc-brain_mask.nii.gz"
    assert cases.find_mask(found["top_T1w"], pattern) == ds / "derivatives/fmriprep/top_desc-brain_mask.nii.gz"


@pytest.mark.parametrize("degrees,warned", [(30.0, True), (5.0, False), (0.0, False)])
def test_oblique_scans_are_read_with_a_warning_above_ten_degrees(tmp_path, caplog, degrees, warned):
    from nibabel.affines import from_matvec
    from nibabel.eulerangles import euler2mat

    data = np.random.default_rng(0).random((20, 20, 6)).astype(np.float32) + 0.1
    affine = from_matvec(euler2mat(0, 0, np.radians(degrees)) * 2.0, [1.0, 2.0, 3.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "scan.nii.gz")
    with caplog.at_level("WARNING", logger="condiff.io"):
        vol = volumes.read_volume(tmp_path / "scan.nii.gz")
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)  # read as stored, never resampled
    hits = [r.getMessage() for r in caplog.records if "oblique" in r.getMessage()]
    assert bool(hits) == warned, hits
    if warned:
        assert f"{degrees:.0f} degrees" in hits[0] and "scan.nii.gz" in hits[0]


@pytest.mark.parametrize("shift_mm,warned", [(20.0, True), (0.5, False)])
def test_qform_sform_disagreement_is_warned_and_both_kept(tmp_path, caplog, shift_mm, warned):
    data = np.random.default_rng(1).random((20, 20, 6)).astype(np.float32) + 0.1
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    sform = np.diag([2.0, 2.0, 2.0, 1.0])
    sform[0, 3] = shift_mm
    img.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    img.set_sform(sform, code=1)
    nib.save(img, tmp_path / "scan.nii.gz")
    with caplog.at_level("WARNING", logger="condiff.io"):
        vol = volumes.read_volume(tmp_path / "scan.nii.gz")
    hits = [r.getMessage() for r in caplog.records if "qform and sform disagree" in r.getMessage()]
    assert bool(hits) == warned, hits
    if warned:
        assert f"{shift_mm:.1f} mm" in hits[0]
    np.testing.assert_allclose(vol.affine, sform)  # the sform wins, as in nibabel
    q, qcode = vol.header.get_qform(coded=True)
    assert qcode == 1 and np.allclose(q, np.diag([2.0, 2.0, 2.0, 1.0]))  # the qform is kept for writing back


def test_a_series_is_refused_unless_a_volume_index_picks_one(tmp_path):
    rng = np.random.default_rng(4)
    series = (rng.random((16, 16, 5, 3)) + 0.1).astype(np.float32)
    nib.save(nib.Nifti1Image(series, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "series.nii.gz")
    with pytest.raises(InputImageError, match=r"series of 3 volumes .*--volume-index"):
        volumes.read_volume(tmp_path / "series.nii.gz")
    for index in (0, 2, -1):
        vol = volumes.read_volume(tmp_path / "series.nii.gz", volume_index=index)
        np.testing.assert_array_equal(vol.data, series[..., index])
    with pytest.raises(InputImageError, match=r"--volume-index 3 is out of range.*from 0 to 2"):
        volumes.read_volume(tmp_path / "series.nii.gz", volume_index=3)
    plain = series[..., 0]
    nib.save(nib.Nifti1Image(plain, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "plain.nii.gz")
    np.testing.assert_array_equal(volumes.read_volume(tmp_path / "plain.nii.gz", volume_index=2).data, plain)


# ----------------------------------------------------------------------------------------- photos: more modes


def test_grey_with_alpha_png_reads_as_its_grey_channel(tmp_path, caplog):
    """LA (2 channels): alpha dropped like RGBA's, the grey repeated; oracle: Pillow's own L conversion."""
    from PIL import Image

    rng = np.random.default_rng(5)
    la = rng.integers(0, 256, (23, 19, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    with Image.open(tmp_path / "la.png") as im:
        grey = np.asarray(im.convert("L")).astype(np.float32) / 255
    with caplog.at_level("WARNING", logger="condiff.io.images"):
        got = images.read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(got, np.repeat(grey[:, :, None], 3, axis=2))
    assert "alpha channel dropped" in caplog.text


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_of_png_and_jpeg_photos_is_applied(tmp_path, fmt, orientation, caplog):
    """Oracle: Pillow's exif_transpose of the same file (a phone photo stored sideways reads upright)."""
    from PIL import Image, ImageOps

    a = np.zeros((20, 31, 3), np.uint8)
    a[:5, :9] = 255  # a bright top-left corner: lossless enough in JPEG to tell the rotations apart
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"p.{fmt}"
    im.save(path, format=fmt.upper(), exif=exif.tobytes(), **({"quality": 100} if fmt == "jpeg" else {}))
    with Image.open(path) as shown:
        want = np.asarray(ImageOps.exif_transpose(shown)).astype(np.float32) / 255
    with caplog.at_level("WARNING", logger="condiff.io.images"):
        got = images.read_image(path)
    assert got.shape == want.shape == ((31, 20, 3) if orientation in (6, 8) else (20, 31, 3))
    np.testing.assert_array_equal(got, want)
    assert "EXIF orientation" in caplog.text


def test_a_label_image_drawn_in_any_colour_is_lesion(tmp_path):
    from PIL import Image

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[2:5, 3:6, 1] = 255  # green
    rgb[9:12, 9:12, 2] = 200  # blue
    Image.fromarray(rgb).save(tmp_path / "m.png")
    want = rgb.max(axis=2) > 0
    np.testing.assert_array_equal(images.read_label_image(tmp_path / "m.png"), want)
    import tifffile

    tifffile.imwrite(tmp_path / "m.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(images.read_label_image(tmp_path / "m.tif"), want)


@pytest.mark.parametrize("height, width, refused", [(10, 40, True), (40, 10, True), (11, 11, False), (11, 40, False)])
def test_photos_below_the_ssim_window_on_either_side_are_refused(tmp_path, height, width, refused):
    from PIL import Image

    photo = np.full((height, width, 3), 90, np.uint8)
    photo[0, 0] = 91  # not constant (a constant photo is refused for that)
    Image.fromarray(photo).save(tmp_path / "p.png")
    if refused:
        with pytest.raises(InputImageError, match="smaller than the SSIM window"):
            images.read_image(tmp_path / "p.png")
    else:
        assert images.read_image(tmp_path / "p.png").shape == (height, width, 3)


def test_a_finished_runs_folder_with_its_tables_is_not_read_as_scans(tmp_path, caplog):
    """What condiff-infer leaves: records/ beside run.json, condiff.log, cases.csv and scores.csv."""
    _touch(tmp_path / "proj", "a.nii.gz")
    old = tmp_path / "proj" / "out"
    _touch(old / "maps", "a.nii.gz")
    (old / "records").mkdir()
    for name in ("run.json", "condiff.log", "cases.csv", "scores.csv"):
        (old / name).write_text("x")
    with caplog.at_level("WARNING", logger="condiff.io.cases"):
        found = cases.discover([tmp_path / "proj"])
    assert [c.name for c in found] == ["a"]


# ----------------------------------------------------------------------------------------- hostile and odd inputs


def test_a_singular_affine_is_refused_naming_the_file(tmp_path):
    """Two parallel voxel axes (valid lengths, so the voxel-size check passes) leave no orientation to slice by."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 2] = affine[:3, 1]
    path = _save(tmp_path / "flat.nii.gz", _blob(), affine)
    with pytest.raises(InputImageError, match=r"flat\.nii\.gz: the header's affine is singular/degenerate \(its axes "
                                              r"are not independent\)\. Fix the qform/sform of the file"):
        volumes.read_volume(path)
    # the test is relative to the voxel sizes: tiny and huge voxels with independent axes still read
    fine = np.diag([0.02, 0.02, 90.0, 1.0])
    assert volumes.read_volume(_save(tmp_path / "odd.nii.gz", _blob(), fine)).data.shape == (20, 22, 12)


def _header_only(shape, dtype=np.uint8) -> bytes:
    """A NIfTI-1 header declaring ``shape`` followed by a few bytes: what a decompression bomb's header says,
    without its data (nothing is allocated)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_qform(np.eye(4), code=1)
    return bytes(hdr.binaryblock) + b"\0" * 4 + b"\0" * 1000


def test_a_nifti_decompression_bomb_is_refused_before_decompressing(tmp_path):
    """2048x2048x128 uint8 is a few MB gzipped but 2 GiB as float32 (a dry run grew to 7 GB)."""
    (tmp_path / "bomb.nii.gz").write_bytes(gzip.compress(_header_only((2048, 2048, 128))))
    with pytest.raises(InputImageError, match=r"bomb\.nii\.gz: header declares \(2048, 2048, 128\) = 536870912 voxels "
                                              r"per volume, more than the limit of 268435456 \(1 GiB as float32\)"):
        volumes.read_volume(tmp_path / "bomb.nii.gz")
    # a series is decoded whole: 2**30 voxels in all (an HCP-style fMRI run, 104x90x72x1200, still passes)
    (tmp_path / "series.nii.gz").write_bytes(gzip.compress(_header_only((256, 256, 128, 200))))
    with pytest.raises(InputImageError, match=r"series\.nii\.gz: header declares \(256, 256, 128, 200\) = 1677721600 "
                                              r"voxels in all, more than the limit of 1073741824 \(4 GiB"):
        volumes.read_volume(tmp_path / "series.nii.gz", volume_index=0)
    (tmp_path / "hcp.nii.gz").write_bytes(gzip.compress(_header_only((104, 90, 72, 1200))))
    with pytest.raises(InputImageError, match="truncated"):
        volumes.read_volume(tmp_path / "hcp.nii.gz", volume_index=0)
    # 512x512x1024 is still a volume condiff reads: this header-only file is refused as truncated, not for its size
    (tmp_path / "big.nii.gz").write_bytes(gzip.compress(_header_only((512, 512, 1024))))
    with pytest.raises(InputImageError, match="truncated"):
        volumes.read_volume(tmp_path / "big.nii.gz")


def _tiff_declaring(path, width: int, height: int) -> None:
    """A 16x16 zlib TIFF whose tags then claim ``width`` x ``height`` (one strip): a bomb's header, without the data."""
    import tifffile

    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), compression="zlib", rowsperstrip=16)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        offsets = {code: tags[code].valueoffset for code in (256, 257, 278)}  # width, length, rows per strip
    for code, value in ((256, width), (257, height), (278, height)):
        struct.pack_into("<I", data, offsets[code], value)
    path.write_bytes(bytes(data))


def test_a_tiff_above_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    """PNG and JPEG go through PIL's bomb check; tifffile has none: a 20000x20000 page (15 GB) is refused from its tags."""
    _tiff_declaring(tmp_path / "bomb.tif", 20000, 20000)
    with pytest.raises(InputImageError, match=r"bomb\.tif: image of 20000x20000 = 400000000 pixels is larger than the "
                                              r"limit of \d+ pixels"):
        images.read_image(tmp_path / "bomb.tif")
    # the limit is PIL's own setting (an application may raise or lower it)
    from PIL import Image

    import tifffile

    tifffile.imwrite(tmp_path / "photo.tif", np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputImageError, match=r"photo\.tif: image of 50x40 = 2000 pixels is larger than the limit of 1000"):
        images.read_image(tmp_path / "photo.tif")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [40, 50])  # above PIL's limit (where it only warns), and above twice it (it refuses)
def test_a_png_above_the_pixel_limit_is_reported_as_too_large_not_damaged(tmp_path, monkeypatch, side):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputImageError, match=r"big\.png: image .*larger than the limit of 1000 pixels") as info:
        images.read_image(tmp_path / "big.png")
    assert "damaged" not in str(info.value) and "Downscale the photograph" in str(info.value)


def test_constant_photos_are_refused_like_constant_volumes(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(InputImageError, match=r"black\.png: constant image \(all pixels 0\): nothing to analyse"):
        images.read_image(tmp_path / "black.png")
    Image.fromarray(np.full((30, 30, 3), (10, 20, 30), np.uint8)).save(tmp_path / "teal.png")
    with pytest.raises(InputImageError, match=r"teal\.png: constant image \(all pixels \(10, 20, 30\)\)"):
        images.read_image(tmp_path / "teal.png")
    import tifffile

    tifffile.imwrite(tmp_path / "grey.tif", np.full((30, 30), 1000, np.uint16))
    with pytest.raises(InputImageError, match=r"grey\.tif: constant image \(all pixels 1000\)"):
        images.read_image(tmp_path / "grey.tif")
    one = np.zeros((30, 30, 3), np.uint8)
    one[4, 5, 1] = 1  # one pixel differs: a photo
    Image.fromarray(one).save(tmp_path / "dark.png")
    assert images.read_image(tmp_path / "dark.png").shape == (30, 30, 3)


def _frames(n: int, shape=(24, 26, 3)) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def test_multi_frame_photos_warn_that_only_the_first_frame_was_analysed(tmp_path, caplog):
    import tifffile
    from PIL import Image

    pages = _frames(3)
    tifffile.imwrite(tmp_path / "stack.tif", np.stack(pages), photometric="rgb")
    frames = [Image.fromarray(f) for f in _frames(2)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:], duration=100)
    with caplog.at_level("WARNING", logger="condiff.io.images"):
        np.testing.assert_array_equal(images.read_image(tmp_path / "stack.tif"), pages[0] / np.float32(255))
        np.testing.assert_array_equal(images.read_image(tmp_path / "anim.png"), _frames(2)[0] / np.float32(255))
    assert f"{tmp_path / 'stack.tif'}: has 3 pages: only the first was analysed" in caplog.text
    assert f"{tmp_path / 'anim.png'}: has 2 frames: only the first was analysed" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="condiff.io.images"):
        frames[0].save(tmp_path / "still.png")
        images.read_image(tmp_path / "still.png")
    assert "only the first" not in caplog.text


def test_an_invalid_exif_orientation_is_reported_as_ignored_not_applied(tmp_path, caplog):
    from PIL import Image

    a = _frames(1)[0]
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 99
    im.save(tmp_path / "odd.png", exif=exif.tobytes())
    with caplog.at_level("WARNING", logger="condiff.io.images"):
        got = images.read_image(tmp_path / "odd.png")
    np.testing.assert_array_equal(got, a / np.float32(255))  # nothing was rotated
    assert "EXIF orientation 99 applied" not in caplog.text
    assert f"{tmp_path / 'odd.png'}: EXIF orientation 99 is not a valid value (1-8): ignored" in caplog.text


def test_atomic_temp_names_stay_within_name_max_and_json_holds_undecodable_names(tmp_path):
    """A 250-byte output name still gets a temporary name the file system accepts; a file name that is not
    UTF-8 (its bytes kept by Python as lone surrogates) is written as JSON escapes that read back as the same str."""
    long = tmp_path / ("M" * 245 + ".nii.gz")
    tmp = atomic.temp_path(long)
    assert len(os.fsencode(tmp.name)) <= atomic.NAME_MAX and atomic.temp_writer_pid(tmp.name) == os.getpid()
    assert tmp != atomic.temp_path(long)  # still unique
    atomic.write_bytes_atomic(long, b"x")
    assert long.read_bytes() == b"x"
    wide = "\u00e9" * 200  # 2 bytes a character: cut between characters, never inside one
    assert atomic.fit_name(wide, 255) == "\u00e9" * 127
    name = os.fsdecode(b"m_bad_\xff")
    atomic.write_json_atomic(tmp_path / "r.json", {"case": name, "who": "\u00e9"})
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == {"case": name, "who": "\u00e9"}
    atomic.write_json_atomic(tmp_path / "plain.json", {"who": "\u00e9"})
    assert "\u00e9" in (tmp_path / "plain.json").read_text(encoding="utf-8")  # UTF-8 as before where it can be
    atomic.write_text_atomic(tmp_path / "t.csv", f"case\n{name}\n")
    assert (tmp_path / "t.csv").read_text(encoding="utf-8") == "case\nm_bad_\\udcff\n"


def test_non_regular_files_are_refused_without_being_opened(tmp_path, fails_instead_of_hanging):
    """A FIFO would wait for a writer forever and /dev/zero never ends: both are named, never read."""
    os.mkfifo(tmp_path / "pipe.nii.gz")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    with fails_instead_of_hanging(20):
        with pytest.raises(InputImageError, match=r"pipe\.nii\.gz: is not a regular file \(a FIFO, device or socket\)"):
            volumes.read_volume(tmp_path / "pipe.nii.gz")
        with pytest.raises(InputImageError, match=r"zero\.png: is not a regular file \(a FIFO, device or socket\)"):
            images.read_image(tmp_path / "zero.png")
        os.mkfifo(tmp_path / "IM0001")  # an extension-less file is sniffed for DICOM: a FIFO is not opened for it
        (tmp_path / "scan.nii.gz").write_bytes(b"x")
        assert [c.name for c in cases.discover([tmp_path])] == ["pipe", "scan", "zero"]


def test_a_mask_probe_name_too_long_to_exist_is_no_mask(tmp_path):
    scan = tmp_path / ("N" * 240 + ".nii.gz")
    scan.write_bytes(b"x")
    case = cases.Case(name="N" * 240, path=scan, kind="volume")
    assert cases.find_mask(case, "{dir}/{stem}_brainmask.nii.gz", required=False) is None
    with pytest.raises(InputImageError, match="mask not found at"):
        cases.find_mask(case, "{dir}/{stem}_brainmask.nii.gz")


def test_gzip_outputs_are_the_same_bytes_on_every_python(monkeypatch):
    """Python 3.10's and 3.13's gzip.compress write OS byte 255 where 3.11-3.12 on Linux write 3: the same map was
    another file (and the bundled scans no longer matched their script). The OS byte is fixed."""
    raw = bytes(range(256)) * 40
    made = volumes.gzip_bytes(raw)
    assert made[9] == 3 and gzip.decompress(made) == raw and made[4:8] == b"\0\0\0\0"  # mtime 0
    gzip_as_python313(monkeypatch)
    assert volumes.gzip_bytes(raw) == made


def gzip_as_python313(monkeypatch) -> None:
    """gzip.compress as Python 3.10's and 3.13's: OS byte 255 in the header."""
    real = gzip.compress

    def python313(data, compresslevel=9, *, mtime=None):
        out = bytearray(real(data, compresslevel=compresslevel, mtime=mtime))
        out[9] = 255
        return bytes(out)

    monkeypatch.setattr(gzip, "compress", python313)


def test_exclusion_patterns_match_exactly_as_fnmatchcase_does():
    """Discovery's one-regex exclusion equals fnmatch.fnmatchcase pattern by pattern, on names and paths
    made to hit and miss the default patterns (case, separators, brackets, dots)."""
    import fnmatch
    import random

    from condiff.io.cases import DEFAULT_EXCLUDE, _excluded

    rng = random.Random(0)
    parts = ["sub-01", "T1w", "_mask", "_seg", "brainmask", "MASK", "label", "x", ".nii.gz", ".png", "/", "anat",
             "[1]", "*", "?", "derivatives", "_dseg", "Seg", "lesion", ".json", "_probseg", "ds"]
    names = ["".join(rng.choice(parts) for _ in range(rng.randint(1, 6))) for _ in range(3000)]
    names += [f"{stem}{suffix}" for stem in ("a_mask", "a_seg", "a_Seg", "brainmask", "a_dseg")
              for suffix in (".nii.gz", ".nii", ".png")]
    for patterns in (DEFAULT_EXCLUDE, ("*[ab]*.png", "x?y", "lit[*]"), ()):
        for name in names:
            rel = f"d/{name}"
            want = any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(rel, p) for p in patterns)
            assert _excluded(name, rel, patterns) == want, (patterns[:3], name)
