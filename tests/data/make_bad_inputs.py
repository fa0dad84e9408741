"""Write a corpus of deliberately broken input files (and a few good ones) into a folder.

    python tests/data/make_bad_inputs.py OUT_DIR

``OUT_DIR/mri/`` is one condiff-infer batch for an MRI model set: two good real volumes (the
bundled sample slabs, or synthetic ones when those are absent) and, derived from them,
truncated and bit-flipped ``.nii.gz``, wrong magic, zero bytes, all-NaN, 4-D with two volumes,
a header declaring huge dimensions, a 9x9x5 volume (axial slices smaller than the 11-px SSIM
window) beside a good 12x12x3 one (thin along the slice axis is fine) and an unreadable file
(not made when running as root, who can read anything). ``OUT_DIR/photos/`` is a batch for an RGB model set: a PNG saved under a
``.jpg`` name (good: formats are detected by content) and a truncated PNG.

``make_corpus(out_dir)`` returns the manifest ``{relative path: (expected status, regex the
failure reason must match)}``; the script prints it as JSON. Nothing here is committed: tests
generate the corpus into a temporary folder.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
GOOD_SOURCES = ("ixi132_t1.nii.gz", "ms_patient26_t1.nii.gz")  # examples/scans: real 8-slice slabs


def _synthetic_volume(seed: int) -> bytes:
    """A brain-like ellipsoid (used only when the bundled real slabs are missing)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    shape = (40, 44, 6)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 1.4) ** 2 < 1
    img = np.where(inside, 100 + 20 * np.cos(3 * x) + rng.normal(0, 3, shape), 0).astype(np.float32)
    return nib.Nifti1Image(img, np.diag([2.0, 2.0, 3.0, 1.0])).to_bytes()


def _good_volumes() -> list[bytes]:
    """Two good volumes as gzip bytes (mtime 0)."""
    scans = REPO / "examples" / "scans"
    if all((scans / name).is_file() for name in GOOD_SOURCES):
        return [(scans / name).read_bytes() for name in GOOD_SOURCES]
    return [gzip.compress(_synthetic_volume(seed), mtime=0) for seed in (0, 1)]


def _nifti_gz(data: np.ndarray, like: bytes) -> bytes:
    """``data`` on the grid (affine, header) of the NIfTI in ``like`` (gzip bytes)."""
    import nibabel as nib

    ref = nib.Nifti1Image.from_bytes(gzip.decompress(like))
    hdr = ref.header.copy()
    hdr.set_data_dtype(np.float32)
    return gzip.compress(nib.Nifti1Image(data.astype(np.float32), ref.affine, header=hdr).to_bytes(), mtime=0)


def _huge_header(like: bytes) -> bytes:
    """A valid NIfTI-1 header declaring 32767^3 voxels, followed by a few bytes of data."""
    import nibabel as nib

    hdr = nib.Nifti1Image.from_bytes(gzip.decompress(like)).header.copy()
    hdr.set_data_shape((32767, 32767, 32767))
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    return gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 1024, mtime=0)


def _small_volume(shape: tuple[int, int, int], seed: int) -> bytes:
    """A noisy bright square on a zero border, axial (RAS, 2 x 2 x 3 mm), as gzip bytes."""
    import nibabel as nib

    img = np.zeros(shape, np.float32)
    img[1:-1, 1:-1, :] = 100 + np.random.default_rng(seed).normal(0, 5, (shape[0] - 2, shape[1] - 2, shape[2]))
    return gzip.compress(nib.Nifti1Image(img, np.diag([2.0, 2.0, 3.0, 1.0])).to_bytes(), mtime=0)


def _flip_bits(raw: bytes) -> bytes:
    """Flip bits in the middle of the compressed stream (CRC or inflate error on reading)."""
    out = bytearray(raw)
    for k in range(8):
        out[len(out) // 2 + 97 * k] ^= 0x5A
    return bytes(out)


def _png_bytes(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((40, 52, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_corpus(out_dir: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """Write the corpus under ``out_dir`` (created); returns ``{rel path: (status, reason regex)}``."""
    out = Path(out_dir)
    mri, photos = out / "mri", out / "photos"
    mri.mkdir(parents=True, exist_ok=True)
    photos.mkdir(parents=True, exist_ok=True)
    good_a, good_b = _good_volumes()
    files: dict[str, tuple[bytes, str, str]] = {
        "mri/good_a.nii.gz": (good_a, "ok", ""),
        "mri/good_b.nii.gz": (good_b, "ok", ""),
        "mri/truncated.nii.gz": (good_a[: len(good_a) // 2], "failed", r"truncated"),
        "mri/bitflip.nii.gz": (_flip_bits(good_a), "failed", r"corrupt|truncated|CRC"),
        "mri/wrong_magic.nii.gz": (b"This is not a NIfTI file.\n" * 40, "failed", r"not a NIfTI file"),
        "mri/zero_byte.nii.gz": (b"", "failed", r"empty file"),
        "mri/huge_dims.nii.gz": (_huge_header(good_a), "failed", r"implausible size"),
        "mri/tiny.nii.gz": (_small_volume((9, 9, 5), 2), "failed", r"in-plane size 9x9 .*smaller than the SSIM window"),
        "mri/small_thin.nii.gz": (_small_volume((12, 12, 3), 3), "ok", ""),
        "photos/png_named_jpg.jpg": (_png_bytes(0), "ok", ""),
        "photos/truncated.png": (_png_bytes(1)[:300], "failed", r"truncated|unreadable"),
    }
    import nibabel as nib

    vol = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(good_a)).get_fdata(dtype=np.float32))
    files["mri/nan_filled.nii.gz"] = (_nifti_gz(np.full(vol.shape, np.nan, np.float32), good_a), "failed", r"NaN")
    files["mri/four_d.nii.gz"] = (_nifti_gz(np.stack([vol, vol], axis=-1), good_a), "failed", r"series of 2 volumes.*--volume-index")
    manifest = {}
    for rel, (data, status, reason) in files.items():
        (out / rel).write_bytes(data)
        manifest[rel] = (status, reason)
    if os.geteuid() != 0:  # root reads a mode-000 file anyway: then the item is left out
        unreadable = mri / "unreadable.nii.gz"
        unreadable.write_bytes(good_b)
        unreadable.chmod(0)
        manifest["mri/unreadable.nii.gz"] = ("failed", r"permission denied|cannot read")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args()
    manifest = make_corpus(args.out_dir)
    if "mri/unreadable.nii.gz" not in manifest:
        print("note: running as root, so the unreadable-file item was not made", file=sys.stderr)
    print(json.dumps(manifest, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
