#!/usr/bin/env bash
# Every GPU check and benchmark of condiff in one script (< 8 minutes on an H100/H200).
#
# On the device machine (carry .carry, staged by bench/prepare_gpu_carry.sh):
#     bash bench/gpu_check.sh            # writes into $OUT (or bench/results/gpu-<date>/ when OUT is unset)
# On a CPU machine, GPU_CHECK_DRY=1 runs every section at toy sizes to test the script itself.
#
# Sections (each time-boxed, each failure recorded and the script goes on):
#   1 environment report      2 GPU tests (CUDA-graph engine, CUDA SSIM kernel)
#   3 bench/ssim.py           4 bench/throughput.py (paper, symmetric; eager fp32, reference autocast, fast)
#   5 train the demo members (small preset, IXI T1, folds in parallel, time-boxed)
#   6 evaluate them on the lesion cases (fast engine) and pack everything into one archive
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY:-0}
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d)}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
RES="$OUT/work"
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src/..:${PYTHONPATH:-}"
TRAIN_MIN=${TRAIN_MIN:-3.0}
DATA=${DATA:-.carry/data}
[ -d "$DATA" ] || DATA=../shared/data
if [ "$DRY" = 1 ]; then TRAIN_MIN=0.3; fi

section() { echo; echo "=== $1 ($(date +%T)) ===" | tee -a "$LOG"; }
run() {  # run LIMIT_S NAME CMD...: time-boxed, output to the log and to $RES/NAME.txt
    local limit=$1 name=$2; shift 2
    local t0=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$RES/$name.txt" 2>&1
    local rc=$?
    echo "[$name] rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
    tail -n 25 "$RES/$name.txt" >> "$LOG"
    return 0
}

section "1 environment"
if ls .carry/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$RES/install.txt" 2>&1 || echo "editable install failed" | tee -a "$LOG"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi";
  python3 -c "import torch, condiff; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'condiff', condiff.__version__)";
  lscpu | grep 'Model name'; } 2>&1 | tee "$OUT/environment.txt" | tee -a "$LOG"

section "2 GPU tests"
run 150 pytest_gpu python3 -m pytest -q -m gpu tests/engine/test_graphs.py tests/engine/test_ssim_cuda.py

section "3 SSIM kernel benchmark"
if [ "$DRY" = 1 ]; then SSIM_ARGS="--batch 2 --repeats 2"; else SSIM_ARGS="--batch 40 400 --channels 1 3 --repeats 20"; fi
run 60 bench_ssim python3 bench/ssim.py $SSIM_ARGS --json "$OUT/ssim.json"

section "4 throughput"
if [ "$DRY" = 1 ]; then
    run 300 throughput_smoke python3 bench/throughput.py --smoke --out "$OUT"
else
    run 170 throughput_paper python3 bench/throughput.py --preset paper --batch-sizes 8 32 --steps 10 --repeats 5 \
        --engines torch fast --precisions fp32 fp16 --device cuda --out "$OUT"
    run 110 throughput_symmetric python3 bench/throughput.py --preset symmetric --batch-sizes 32 128 --steps 10 --repeats 5 \
        --engines torch fast --precisions fp32 fp16 --device cuda --out "$OUT"
fi

section "5 train demo members"
TRAIN_OUT="$RES/demo-set"
for fold in 0 4 8; do
    timeout --signal=INT $(python3 -c "print(int($TRAIN_MIN*60+90))") python3 -m condiff.train.cli \
        --data "$DATA/ixi-t1" --mask-pattern '{dir}/{stem}_brainmask.nii.gz' --preset small --fold $fold \
        -o "$TRAIN_OUT" --batch-size 64 --time-budget-min "$TRAIN_MIN" --holdout 2 --no-progress \
        > "$RES/train_fold$fold.txt" 2>&1 &
done
wait
for fold in 0 4 8; do echo "[train fold $fold]" | tee -a "$LOG"; tail -n 8 "$RES/train_fold$fold.txt" >> "$LOG"; done

section "6 evaluate and pack"
# (filled in once the inference CLI lands)
tar -czf "$OUT/gpu_results.tgz" -C "$RES" . 2>/dev/null
ls -la "$OUT" | tee -a "$LOG"
