#!/usr/bin/env bash
# One GPU session's work, in order of value, packing results after each part (a time-out keeps what
# finished). Run from the repo root on the GPU machine with .gpu/ carried (see docs/results.md):
#   .gpu/{acdc3s,busi30,chaos3}.npz   samatch data pack ... (commands in docs/results.md)
#   .gpu/lite_medsam_fp16.pth        LiteMedSAM weights rounded to fp16 (carry limit)
#   OUT=/some/dir bash scripts/gpu_session.sh
# QUICK=1 makes every part tiny (a CPU rehearsal of the script itself; numbers meaningless).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_session_out}
R=runs/gpu_session
PY=${PY:-python3}
QUICK=${QUICK:-0}
MIN=${MIN:-1.0}
mkdir -p "$R" "$OUT"
export SAM_CKPT=${SAM_CKPT:-.gpu/lite_medsam_fp16.pth} PY RESULTS=$R
pack() {  # small files only (no checkpoints), as one archive: nested files do not come back
  tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='events.out.*' -C runs gpu_session 2>/dev/null
  echo "[$(date +%T)] packed after $1"
}
report() {  # SAM pseudo-label Dice (GT / predicted boxes, before / after adaptation) of a task's run
  "$PY" -m samatch.cli sam-report --run "$R/$1_samatch" --max-slices "$SLICES" --checkpoint last \
    2>&1 | grep -v Warning | tee "$R/sam_report_$1.txt"
}
if [ "$QUICK" = 1 ]; then
  BENCH=(--quick --batch 1 --steps 1 --device cpu); MIN=0.03; export ITERS=12 BATCH=2; SLICES=4
else
  BENCH=(--device cuda --batch 4,12 --steps 10 --warmup 3); SLICES=200
fi
echo "[$(date +%T)] start"

# 1. Step benchmark: UniMatch vs joint vs reference, fp32 and bf16, encoder-trainable, a profile.
"$PY" benchmarks/bench_step.py "${BENCH[@]}" --amp fp32,bf16 --encoder-trainable --profile --sam-checkpoint "$SAM_CKPT" \
  --out "$R/bench_step.json" > "$R/bench_step.log" 2>&1
tail -25 "$R/bench_step.log"; pack bench

# 2-3. SAM-Match on BUSI (30 labeled images) and CHAOS liver (3 labeled cases), each against UniMatch
# at the same iteration count, and SAM's pseudo-label report of the SAM-Match run.
TASK=busi PACK=${BUSI_PACK:-.gpu/busi30.npz} LABELED=30 METHODS="samatch unimatch" MATCH_ITERS=1 MINUTES_SAMATCH=$MIN \
  bash scripts/gpu_results.sh
report busi; pack busi
TASK=chaos PACK=${CHAOS_PACK:-.gpu/chaos3.npz} LABELED=3 METHODS="samatch unimatch" MATCH_ITERS=1 MINUTES_SAMATCH=$MIN \
  bash scripts/gpu_results.sh
report chaos; pack chaos

# 4. ACDC SAM-Match with SAM refining RV and LV only, then SAM's pseudo-label Dice before / after
# adaptation with ground-truth and predicted boxes.
TASK=acdc PACK=${ACDC_PACK:-.gpu/acdc3s.npz} LABELED=3 METHODS=samatch SAM_REFINE=1,3 MINUTES_SAMATCH=$MIN \
  bash scripts/gpu_results.sh
report acdc; pack acdc
echo "[$(date +%T)] done"
