#!/usr/bin/env bash
# Stage what bench/gpu_check.sh and bench/gpu_train.sh need on the GPU machine into .carry/ (git-ignored;
# name it in `carry`): the data kit's scans and the wheels the GPU image lacks (nibabel, condiff), and
# setuptools to rebuild condiff's wheel there (.carry/build).
# DATA_SETS picks the scans (default: all four). A session that runs a training chunk carries only
# ixi-t1, because the chunk's state needs the room (64 MiB per call in all):
#     DATA_SETS=ixi-t1 bash bench/prepare_gpu_carry.sh && python bench/train_chunks.py stage RUN
# (in that order: this script starts from an empty .carry/).
#
# The condiff wheel is built from the checkout's package sources (every folder pyproject.toml's
# [tool.setuptools] package-dir maps, plus pyproject.toml), and their digest is recorded beside it
# (.carry/whl/condiff-src.sha256). On the device, gpu_check.sh and gpu_train.sh (dry runs too) recompute
# the digest from the checkout that travelled and rebuild the wheel there when it differs, so code
# mended after this script ran is the code the GPU runs. The same script does those steps:
#     bash bench/prepare_gpu_carry.sh --source-digest       # print the checkout's package-source digest
#     bash bench/prepare_gpu_carry.sh --condiff-wheel DIR   # (re)build only the condiff wheel + digest into DIR
#     bash bench/prepare_gpu_carry.sh --install SITE        # the carried wheels ($WHL, .carry/whl) into SITE,
#                                                           # condiff rebuilt first where its digest differs
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHL=${WHL:-.carry/whl}

# The digest (or, with a destination, a copy) of the files the condiff wheel is built from.
sources() {  # sources digest ROOT | sources copy ROOT DEST
    python3 - "$@" <<'PY'
import hashlib, os, re, shutil, sys
from pathlib import Path

mode, root = sys.argv[1], Path(sys.argv[2])
text = (root / "pyproject.toml").read_text()
try:
    import tomllib
    dirs = tomllib.loads(text)["tool"]["setuptools"]["package-dir"].values()
except ImportError:  # Python < 3.11: the package-dir table is one inline line
    dirs = re.findall(r'"[\w.]+"\s*=\s*"([^"]+)"', re.search(r"^package-dir\s*=\s*\{(.*)\}", text, re.M).group(1))
SKIP_DIRS = {"__pycache__", "build", "dist", ".pytest_cache", ".hypothesis"}  # never travel (.gitignore)
files = {"pyproject.toml"}
for d in sorted(set(dirs)):
    for top, subdirs, names in os.walk(root / d):
        subdirs[:] = [s for s in subdirs if s not in SKIP_DIRS and not s.endswith(".egg-info")]
        files.update(str((Path(top) / n).relative_to(root)) for n in names if not n.endswith((".pyc", ".pyo")))
files = sorted(files)
if mode == "digest":
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0" + hashlib.sha256((root / f).read_bytes()).hexdigest().encode() + b"\n")
    print(h.hexdigest())
else:  # copy: the sources, and the files pyproject names beside them (readme, licence)
    dest = Path(sys.argv[3])
    for f in files + [n for n in ("README.md", "LICENSE") if (root / n).is_file()]:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, dest / f)
PY
}

# condiff's wheel from the checkout into $1, its source digest beside it (condiff-src.sha256)
condiff_wheel() {
    local dest=$1 src
    mkdir -p "$dest"
    src=$(mktemp -d /tmp/condiff-src.XXXX)
    sources copy "$REPO" "$src"
    rm -f "$dest"/condiff-*.whl "$dest/condiff-src.sha256"
    # offline (the device reaches no index), with the setuptools carried in .carry/build where there is one
    # (pyproject.toml needs >= 77, and the device image's own may be older), else the one already there
    local st backend=""
    st=$(ls "$REPO"/.carry/build/setuptools-*.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$st" ]; then
        backend=$(mktemp -d /tmp/condiff-setuptools.XXXX)
        python3 -m pip install -q --no-index --no-deps --target "$backend" "$st"
    fi
    PYTHONPATH="$backend${PYTHONPATH:+:$PYTHONPATH}" \
        python3 -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$dest" "$src"
    sources digest "$src" > "$dest/condiff-src.sha256"
    rm -rf "$src" ${backend:+"$backend"}
}

case "${1:-}" in
    --source-digest) sources digest "$REPO"; exit 0 ;;
    --condiff-wheel) [ $# -eq 2 ] || { echo "usage: $0 --condiff-wheel DIR" >&2; exit 2; }
        condiff_wheel "$2"; exit 0 ;;
    --install)
        [ $# -eq 2 ] || { echo "usage: $0 --install SITE" >&2; exit 2; }
        SITE=$2
        ls "$WHL"/condiff-*.whl >/dev/null 2>&1 || { echo "no condiff wheel in $WHL" >&2; exit 2; }
        have=$(sources digest "$REPO")
        want=$(cat "$WHL/condiff-src.sha256" 2>/dev/null || echo none)
        CONDIFF_WHL=$(ls "$WHL"/condiff-*.whl)
        if [ "$have" = "$want" ]; then
            echo "condiff: the carried wheel matches the checkout (sources $have)"
        else
            echo "condiff: the checkout's package sources ($have) differ from the carried wheel's ($want): rebuilding the wheel from the checkout"
            FRESH=$(mktemp -d /tmp/condiff-whl.XXXX)
            if ! condiff_wheel "$FRESH" || ! ls "$FRESH"/condiff-*.whl >/dev/null 2>&1; then
                echo "ERROR: rebuilding the condiff wheel from the checkout failed: the GPU would run stale code" >&2; exit 5
            fi
            CONDIFF_WHL=$(ls "$FRESH"/condiff-*.whl)
            echo "condiff: rebuilt $CONDIFF_WHL"
        fi
        OTHERS=$(ls "$WHL"/*.whl | grep -v '/condiff-[^/]*\.whl$' || true)
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" $OTHERS "$CONDIFF_WHL"
        exit 0 ;;
    "") ;;
    *) echo "unknown argument $1 (none, --source-digest, --condiff-wheel DIR or --install SITE)" >&2; exit 2 ;;
esac

DATA=${CONDIFF_SHARED_DATA:-../shared/data}
DATA_SETS=${DATA_SETS:-"ixi-t1 brats-tumour ms-lesion fundus"}
rm -rf .carry && mkdir -p .carry/data .carry/whl .carry/build
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
# the build backend for rebuilding condiff's wheel on the device (pure Python, any version)
python3 -m pip download -q --no-deps --only-binary=:all: -d .carry/build setuptools==80.9.0
# condiff itself, with the bundled demo set's weights (examples/models, ~1.1 MB: bench/gpu_consistency.py
# opens condiff.examples/models from the installed package)
condiff_wheel .carry/whl
du -sh .carry
