#!/usr/bin/env bash
# Stage what bench/gpu_check.sh and bench/gpu_train.sh need on the GPU machine into .carry/ (git-ignored;
# name it in `carry`): the data kit's scans and the wheels the GPU image lacks (nibabel, condiff).
# DATA_SETS picks the scans (default: all four). A session that runs a training chunk carries only
# ixi-t1, because the chunk's state needs the room (64 MiB per call in all):
#     DATA_SETS=ixi-t1 bash bench/prepare_gpu_carry.sh && python bench/train_chunks.py stage RUN
# (in that order: this script starts from an empty .carry/).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CONDIFF_SHARED_DATA:-../shared/data}
DATA_SETS=${DATA_SETS:-"ixi-t1 brats-tumour ms-lesion fundus"}
rm -rf .carry && mkdir -p .carry/data .carry/whl
for set in $DATA_SETS; do
    mkdir -p ".carry/data/$set"
    case "$set" in
        # cropped to the brain masks: the same masked training slices in 5.1 MB instead of 9.3
        ixi-t1) python3 bench/crop_to_mask.py "$DATA/ixi-t1" .carry/data/ixi-t1 ;;
        fundus) cp -r "$DATA"/fundus/. .carry/data/fundus/ ;;
        *) cp "$DATA/$set"/*.nii.gz ".carry/data/$set/" ;;
    esac
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .carry/whl nibabel==5.4.2
# condiff itself, as a wheel built from the working tree minus the bundled demo weights (20 MB): the
# checkout that travels has them anyway, and the room is needed for a training chunk's state
SLIM=$(mktemp -d /tmp/condiff-slim.XXXX)
git ls-files -co --exclude-standard | grep -v '^examples/models/.*\.safetensors$' | tar -cf - -T - | tar -xf - -C "$SLIM"
python3 -m pip wheel -q --no-deps --no-build-isolation -w .carry/whl "$SLIM"
rm -rf "$SLIM"
du -sh .carry
