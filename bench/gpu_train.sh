#!/usr/bin/env bash
# One time-boxed chunk of a long training run on the GPU machine; chunks add up across sessions.
#
# Here (before):  DATA_SETS=ixi-t1 bash bench/prepare_gpu_carry.sh   # scans + wheels into .carry/ (first)
#                 python bench/train_chunks.py stage RUN   # last chunk's state into .carry/train-state/
# There:          RUN=RUN bash bench/gpu_train.sh          # carry [".carry"]; writes pieces into $OUT
# Here (after):   python bench/train_chunks.py collect RUN FILES_AT   # unpack, verify, record the chunk
#
# What comes back (device tool: <= 8 files, <= 16 MiB each, <= 64 MiB in all): the newest checkpoint
# (exact resume: weights, EMA, AdamW moments, RNG and data-order state), the metrics log (loss, validation,
# healing metric) and chunk.json, as one tar.gz cut into pieces of 15 MiB; the exported fp16 model
# folder as model.tgz; SHA256SUMS and gpu_train.log. The `compact` preset exists so that state still travels next time (train_chunks.py
# checks the 64 MiB working-tree budget before a run).
#
# Settings (environment): RUN (name), RECIPE (healing), PRESET (compact), FOLD (0), BATCH (64),
# WORKERS (14), TRAIN_MIN (default: what DEADLINE leaves), DEADLINE (seconds, 560), DATA (.carry/data),
# LR (unset: the recipe's learning rate; e.g. LR=1e-4 if the healing recipe's 4e-4 proves unstable here),
# CURRICULUM (unset: the recipe's, healing 2:2500; START:STEPS or none for condiff-train --size-curriculum),
# LR_ANNEAL (unset: constant rate; START:END[:FINAL] for condiff-train --lr-anneal, absolute steps: give it to
# a run's last chunks, e.g. the current step to the step the last chunk will reach),
# LANDMARKS (1: condiff-train --landmarks, intensity histograms standardised to the training scans' landmarks,
# which lifted BraTS T1c AP_p even when added only at test time; 0: without. Keep it fixed for a run's chunks).
# PACK_S (30): seconds kept after training for packing; with less than 30 s of training left before
# DEADLINE, training is skipped and what exists is packed. OUT may be relative (to the caller's folder).
# condiff runs from the carried wheel (WHL, .carry/whl) when its source digest matches the checkout, else
# from a wheel rebuilt here from the checkout (bench/prepare_gpu_carry.sh --install); dry runs do the same.
# GPU_TRAIN_DRY=1 runs a few CPU steps on toy settings (used by tests/bench/test_gpu_train.py).
set -uo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
DRY=${GPU_TRAIN_DRY:-0}
RUN=${RUN:-long-compact-healing}
RECIPE=${RECIPE:-healing}
PRESET=${PRESET:-compact}
FOLD=${FOLD:-0}
BATCH=${BATCH:-64}
WORKERS=${WORKERS:-14}
DEADLINE=${DEADLINE:-560}
DATA=${DATA:-.carry/data}
STATE=${STATE:-.carry/train-state/$RUN}
FINAL=${OUT:-bench/results/gpu-train-$(date +%Y%m%d)}
[ -n "${OUT:-}" ] && case "$FINAL" in /*) ;; *) FINAL="$CALLER/$FINAL" ;; esac   # a relative OUT is the caller's
WORK=${WORK:-$(mktemp -d /tmp/gpu_train.XXXX)}
case "$WORK" in /*) ;; *) WORK="$CALLER/$WORK" ;; esac
PIECE=${PIECE:-15M}
LANDMARKS=${LANDMARKS:-1}
PACK_S=${PACK_S:-30}
WHL=${WHL:-.carry/whl}
mkdir -p "$FINAL" "$WORK" || exit 2
FINAL=$(cd "$FINAL" && pwd)   # absolute: packing runs from inside $WORK
LOG="$FINAL/gpu_train.log"
export PYTHONUNBUFFERED=1
say() { echo "[gpu_train $(date +%T)] $*" | tee -a "$LOG"; }

# condiff travels as a wheel with the digest of the sources it was built from; where the checkout's differ
# (code mended after bench/prepare_gpu_carry.sh ran), the wheel is rebuilt here from the checkout
if ls "$WHL"/condiff-*.whl >/dev/null 2>&1; then
    SITE="$WORK.site"
    WHL="$WHL" bash bench/prepare_gpu_carry.sh --install "$SITE" 2>&1 | tee -a "$LOG"
    if [ "${PIPESTATUS[0]}" != 0 ]; then say "ERROR: condiff could not be installed from the checkout: not training"; exit 5; fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import condiff" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1

RESUMED_FROM=0
if ls "$STATE"/state.tgz.part* >/dev/null 2>&1; then
    (cd "$STATE" && sha256sum -c --quiet SHA256SUMS) || { say "carried state fails its checksums: not resuming"; exit 3; }
    cat "$STATE"/state.tgz.part* | tar -xzf - -C "$WORK" || { say "carried state does not unpack"; exit 3; }
    RESUMED_FROM=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['steps_after'])" "$WORK/chunk.json")
    say "resuming $RUN from step $RESUMED_FROM"
else
    say "no carried state in $STATE: starting $RUN from scratch"
fi

# condiff-train's timeout, its 20 s kill included, ends PACK_S before DEADLINE; its start-up (~45 s) and the
# final checkpoint and export (~15 s) come out of that, the rest is the training budget
CAP=$(( DEADLINE - SECONDS - PACK_S - 20 ))
FIT=$(( CAP - 60 ))
if [ "$DRY" = 1 ]; then
    ARGS="--preset tiny --image-size 32 --batch-size 4 --max-steps ${DRY_STEPS:-3} --val-start 1 --val-every 3 --val-max-slices 8 --checkpoint-every 3 --workers 0 --device cpu"
    TRAIN_MIN=${TRAIN_MIN:-5}
else
    TRAIN_MIN=${TRAIN_MIN:-$(python3 -c "print(round($FIT / 60, 2))")}
    ARGS="--preset $PRESET --batch-size $BATCH --val-start 0 --val-every 500 --val-max-slices 128 --checkpoint-every 2000 --workers $WORKERS"
fi
TRAIN_MIN=$(python3 -c "print(round(max(0, min($TRAIN_MIN, $FIT / 60)), 2))")
LIMIT=$(python3 -c "print(int(min($TRAIN_MIN * 60 + 60, $CAP)))")
say "recipe $RECIPE${LR:+ (lr $LR)}${CURRICULUM:+ (size curriculum $CURRICULUM)}${LR_ANNEAL:+ (lr anneal $LR_ANNEAL)}, landmarks $LANDMARKS, fold $FOLD, budget $TRAIN_MIN min (timeout $LIMIT s), args: $ARGS"
T0=$(date +%s)
if [ "$FIT" -lt 30 ]; then
    say "training skipped: only $FIT s of training fit before DEADLINE ($DEADLINE s, $SECONDS s spent, $PACK_S s kept for packing); packing what exists"
    RC=-1
else
timeout --signal=INT --kill-after=20 "$LIMIT" \
    python3 -m condiff.train.cli --data "$DATA/ixi-t1" --mask-pattern '{dir}/{stem}_brainmask.nii.gz' \
    --fold "$FOLD" -o "$WORK" --resume --recipe "$RECIPE" ${LR:+--lr "$LR"} ${CURRICULUM:+--size-curriculum "$CURRICULUM"} ${LR_ANNEAL:+--lr-anneal "$LR_ANNEAL"} $([ "$LANDMARKS" = 1 ] && echo --landmarks) --time-budget-min "$TRAIN_MIN" --holdout 2 $ARGS \
    --val-hook condiff.train.healing:val_hook --checkpoint-part-mb 16 --weights-dtype fp16 --no-progress \
    > "$WORK.train.txt" 2>&1
RC=$?
tail -n 15 "$WORK.train.txt" >> "$LOG"
fi
WALL=$(( $(date +%s) - T0 ))
say "condiff-train rc=$RC in $WALL s"

# keep the newest checkpoint only, record the chunk, pack, cut into pieces
python3 - "$WORK" "$FOLD" "$RUN" "$RECIPE" "$RESUMED_FROM" "$WALL" "$RC" <<'PY' 2>&1 | tee -a "$LOG"
import datetime, json, sys
from pathlib import Path
from condiff.train.checkpoint import latest_checkpoint, prune_checkpoints
work, fold, run, recipe, before, wall, rc = sys.argv[1:]
ck_root = Path(work) / "train" / f"fold{fold}" / "checkpoints"
if ck_root.is_dir():
    prune_checkpoints(ck_root, keep=1)
latest = latest_checkpoint(ck_root) if ck_root.is_dir() else None
steps = json.loads((latest / "state.json").read_text())["step"] if latest else 0
try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception:
    device = "unknown"
rec = {"run": run, "recipe": recipe, "fold": int(fold), "steps_before": int(before), "steps_after": int(steps),
       "train_wall_s": int(wall), "train_rc": int(rc), "device": device,
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "checkpoint": latest.name if latest else None}
if int(rc) == -1:
    rec["train_skipped"] = "deadline"
(Path(work) / "chunk.json").write_text(json.dumps(rec, indent=1) + "\n")
print(json.dumps(rec))
PY
# state (what the next chunk resumes from) and the exported fp16 model folder travel separately:
# only the state goes back to the device, and it must fit the 64 MiB working tree with the repo
# (what exists: a chunk that trained nothing from scratch has no checkpoint yet)
FAIL=0
STATE_PATHS=(chunk.json)
for p in "train/fold$FOLD/checkpoints" "train/fold$FOLD/metrics.jsonl"; do [ -e "$WORK/$p" ] && STATE_PATHS+=("$p"); done
rm -f "$FINAL"/state.tgz.part* "$FINAL/model.tgz"
if (cd "$WORK" && tar -czf "$WORK.state.tgz" "${STATE_PATHS[@]}") && split -b "$PIECE" -d -a 2 "$WORK.state.tgz" "$FINAL/state.tgz.part"; then :
else say "ERROR: packing the state failed (see above)"; FAIL=5; fi
if [ -d "$WORK/fold$FOLD" ]; then
    (cd "$WORK" && tar -czf "$FINAL/model.tgz" chunk.json "fold$FOLD") || { say "ERROR: packing model.tgz failed (see above)"; FAIL=5; }
fi
PACKED=$(cd "$FINAL" && ls state.tgz.part* model.tgz 2>/dev/null)
if [ -n "$PACKED" ]; then (cd "$FINAL" && sha256sum $PACKED > SHA256SUMS) || { say "ERROR: SHA256SUMS failed"; FAIL=5; }
else say "ERROR: nothing packed"; FAIL=5; fi
N=$(ls "$FINAL" | wc -l)
TOTAL=$(du -cb "$FINAL"/* | tail -n 1 | cut -f1)
say "packed $(ls "$FINAL"/state.tgz.part* 2>/dev/null | wc -l) pieces$([ -f "$FINAL/model.tgz" ] && echo " and model.tgz"), $N files, $TOTAL bytes into $FINAL"
if [ "$N" -gt 8 ] || [ "$TOTAL" -gt 67108864 ]; then
    say "ERROR: more than the device tool returns (8 files, 64 MiB): choose a smaller preset"; exit 4
fi
exit $FAIL
