#!/usr/bin/env bash
# Stage what bench/gpu_check.sh needs on the GPU machine into .carry/ (git-ignored; name it in `carry`):
# the data kit's scans (training + evaluation) and the nibabel wheel the GPU image lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CONDIFF_SHARED_DATA:-../shared/data}
rm -rf .carry && mkdir -p .carry/data/ixi-t1 .carry/data/brats-tumour .carry/data/ms-lesion .carry/whl
cp "$DATA"/ixi-t1/*-T1.nii.gz "$DATA"/ixi-t1/*-T1_brainmask.nii.gz .carry/data/ixi-t1/
cp "$DATA"/brats-tumour/*.nii.gz .carry/data/brats-tumour/
cp "$DATA"/ms-lesion/*.nii.gz .carry/data/ms-lesion/
cp -r "$DATA"/fundus .carry/data/fundus
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .carry/whl nibabel==5.4.2
python3 -m pip wheel -q --no-deps --no-build-isolation -w .carry/whl .   # condiff itself, as a wheel
du -sh .carry
