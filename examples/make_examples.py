"""Make the bundled sample scans in examples/scans/ from the project's data kit (../shared/data).

Each sample is an axial slab of a real scan (8 slices), cut with nibabel's slicer so the affine
stays exact; small enough that the README's first command runs in minutes on a CPU.
    python examples/make_examples.py [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import nibabel as nib

HERE = Path(__file__).resolve().parent
# (source file, axis of the axial direction in the stored array, first slice, output stem)
SLABS = [
    ("ms-lesion/patient26_t1.nii.gz", 2, 86, "ms_patient26_t1"),
    ("ms-lesion/patient26_lesionmask.nii.gz", 2, 86, "ms_patient26_t1_lesionmask"),
    ("ixi-t1/IXI132-HH-1415-T1.nii.gz", 1, 52, "ixi132_t1"),
    ("ixi-t1/IXI132-HH-1415-T1_brainmask.nii.gz", 1, 52, "ixi132_t1_brainmask"),
]
N_SLICES = 8


def cut(src: Path, axis: int, first: int, dst: Path) -> None:
    img = nib.load(src)
    index = [slice(None)] * 3
    index[axis] = slice(first, first + N_SLICES)
    slab = img.slicer[tuple(index)]
    data = slab.to_bytes()
    dst.write_bytes(gzip.compress(data, mtime=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data")
    args = ap.parse_args()
    out = HERE / "scans"
    out.mkdir(exist_ok=True)
    for rel, axis, first, stem in SLABS:
        cut(args.data / rel, axis, first, out / f"{stem}.nii.gz")
        print("wrote", out / f"{stem}.nii.gz")


if __name__ == "__main__":
    main()
