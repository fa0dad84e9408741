"""Make the bundled sample scans in examples/scans/ from the project's data kit (../shared/data).

Each sample is an axial slab of a real scan (8 slices), cut with nibabel's slicer so the affine
stays exact; small enough that the README's first command runs in minutes on a CPU.

One more sample carries a **synthetic** anomaly, so a first run shows what a found anomaly looks like
(the bundled 32-px models barely see the real MS lesions): a slab of IXI526, a subject the demo
models never trained on (condiff-train holds out the last two subjects), with one smooth intensity
change made by condiff's own task 4 (Perlin noise, reference-method §5) on the middle slice and added
through the slab inside the brain; its mask is the ``_lesionmask`` beside it. The seed is the first
of ``default_rng([2026, k])``, k = 0, 1, ..., whose anomaly covers 3-10 % of the slice's brain with a
mean change of at least 0.15 of the slab maximum (lesion-sized and clearly visible; chosen before
running any model on it).
    python examples/make_examples.py [--data ../shared/data] [--out examples/scans]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from condiff.io.volumes import gzip_bytes

HERE = Path(__file__).resolve().parent
# (source file, axis of the axial direction in the stored array, first slice, output stem)
SLABS = [
    ("ms-lesion/patient26_t1.nii.gz", 2, 86, "ms_patient26_t1"),
    ("ms-lesion/patient26_lesionmask.nii.gz", 2, 86, "ms_patient26_t1_lesionmask"),
    ("ixi-t1/IXI132-HH-1415-T1.nii.gz", 1, 52, "ixi132_t1"),
    ("ixi-t1/IXI132-HH-1415-T1_brainmask.nii.gz", 1, 52, "ixi132_t1_brainmask"),
]
N_SLICES = 8
SYNTHETIC = ("ixi-t1/IXI526-HH-2392-T1.nii.gz", "ixi-t1/IXI526-HH-2392-T1_brainmask.nii.gz", 1, 52,
             "ixi526_synthetic_t1")
CHANGED = 0.01  # a voxel belongs to the synthetic anomaly where the intensity changed by more (of the max)


def slab(path: Path, axis: int, first: int):
    """The N_SLICES-slice slab of the image at ``path`` from slice ``first`` along ``axis`` (affine exact)."""
    index = [slice(None)] * 3
    index[axis] = slice(first, first + N_SLICES)
    return nib.load(path).slicer[tuple(index)]


def cut(src: Path, axis: int, first: int, dst: Path) -> None:
    _write_gz(slab(src, axis, first), dst)


def _write_gz(image, dst: Path) -> None:
    dst.write_bytes(gzip_bytes(image.to_bytes(), level=9))


def synthetic_anomaly_slab(scan: Path, brain_mask: Path, axis: int, first: int, out: Path, stem: str) -> int:
    """Write ``stem`` (float32 scan), ``stem_brainmask`` and ``stem_lesionmask``; returns the seed used."""
    from condiff.train.tasks import apply_anomaly

    img, bm = slab(scan, axis, first), slab(brain_mask, axis, first)
    x = np.asarray(img.get_fdata(), dtype=np.float64)
    brain = np.asarray(bm.dataobj) > 0
    top = x.max()
    x = x / top
    mid = np.take(x, N_SLICES // 2, axis=axis)[None]
    fg = np.take(brain, N_SLICES // 2, axis=axis)
    for k in range(100):
        changed, _ = apply_anomaly(4, mid, np.random.default_rng([2026, k]), fg_mask=fg)
        delta = (changed - mid)[0] * fg
        area = np.abs(delta) > CHANGED
        if 0.03 <= area.sum() / fg.sum() <= 0.10 and np.abs(delta[area]).mean() >= 0.15:
            break
    else:
        raise RuntimeError("no seed gave a lesion-sized anomaly")
    delta3 = np.expand_dims(delta, axis) * brain  # the same change on every slice of the slab, inside the brain
    y = np.clip(x + delta3, 0.0, 1.0) * top
    lesion = (np.abs(delta3) > CHANGED) & brain
    hdr = img.header.copy()
    hdr.set_data_dtype(np.float32)
    hdr.set_slope_inter(1.0, 0.0)
    _write_gz(nib.Nifti1Image(y.astype(np.float32), img.affine, hdr), out / f"{stem}.nii.gz")
    _write_gz(bm, out / f"{stem}_brainmask.nii.gz")
    mhdr = bm.header.copy()
    mhdr.set_data_dtype(np.uint8)
    _write_gz(nib.Nifti1Image(lesion.astype(np.uint8), bm.affine, mhdr), out / f"{stem}_lesionmask.nii.gz")
    return k


def make(data: Path, out: Path) -> None:
    """Every bundled sample scan (and its masks) from the data kit at ``data`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for rel, axis, first, stem in SLABS:
        cut(data / rel, axis, first, out / f"{stem}.nii.gz")
        print("wrote", out / f"{stem}.nii.gz")
    scan, mask, axis, first, stem = SYNTHETIC
    seed = synthetic_anomaly_slab(data / scan, data / mask, axis, first, out, stem)
    print("wrote", out / f"{stem}.nii.gz", f"(synthetic anomaly, seed [2026, {seed}])")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=HERE / "scans")
    args = ap.parse_args()
    make(args.data, args.out)


if __name__ == "__main__":
    main()
