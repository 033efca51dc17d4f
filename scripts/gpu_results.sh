#!/usr/bin/env bash
# Train and evaluate methods on one packed task within a wall-time budget, on whatever device torch
# finds (CUDA when present). Writes runs and a summary under $RESULTS.
#
#   samatch data pack ../shared/data/ACDC --labeled 3 --max-unlabeled 300 --out .gpu/acdc3.npz
#   RESULTS=runs/gpu bash scripts/gpu_results.sh
#
# Env: TASK (run-name prefix and task defaults: acdc | busi | chaos), PACK (packed file), RESULTS
# (output folder), PY (python), SAM_CKPT (LiteMedSAM weights; empty = the packaged file),
# MINUTES_<METHOD> (budget per method; 0 = none), BATCH, ITERS (upper bound), LABELED, METHODS,
# MATCH_ITERS (1: every method after the first trains exactly the first one's final iteration count,
# without a budget: a matched-iteration comparison), SAM_REFINE (classes SAM refines; ACDC default
# 1,2,3 as in the first recorded runs; 1,3 leaves the myocardium to the U-Net).
set -uo pipefail
cd "$(dirname "$0")/.."
TASK=${TASK:-acdc}
PACK=${PACK:-.gpu/acdc3.npz}
RESULTS=${RESULTS:-runs/gpu}
PY=${PY:-python3}
BATCH=${BATCH:-8}
LABELED=${LABELED:-3}
ITERS=${ITERS:-30000}
METHODS=${METHODS:-"unimatch samatch supervised fixmatch"}
MATCH_ITERS=${MATCH_ITERS:-0}
mkdir -p "$RESULTS"
"$PY" - <<'PYEOF' > "$RESULTS/env.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PYEOF
cat "$RESULTS/env.txt"
first=""
for m in $METHODS; do
  var="MINUTES_${m^^}"; minutes=${!var:-1}
  iters=$ITERS
  if [ "$MATCH_ITERS" = 1 ] && [ -n "$first" ]; then
    iters=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['schedule']['iterations'])" \
      "$RESULTS/${TASK}_$first/config.json") && minutes=0
  fi
  extra=()
  if [ "$m" = samatch ]; then
    [ "$TASK" = acdc ] && extra=(--set sam.enclosed=2\>3 --set "sam.refine_classes=${SAM_REFINE:-1,2,3}")
    [ -n "${SAM_CKPT:-}" ] && extra+=(--set "sam.checkpoint=$SAM_CKPT")
  fi
  start=$(date +%s)
  "$PY" -m samatch.cli train --method "$m" --data "$PACK" --labeled "$LABELED" --out "$RESULTS/${TASK}_$m" --quiet \
    --iterations "$iters" --set "schedule.minutes=$minutes" --set "schedule.batch_size=$BATCH" \
    --set schedule.eval_every=250 "${extra[@]}" 2>&1 | grep -v Warning
  "$PY" -m samatch.cli evaluate --run "$RESULTS/${TASK}_$m" --split val 2>&1 | grep -v Warning
  echo "$TASK $m: $(( $(date +%s) - start )) s wall (train + evaluate)" | tee -a "$RESULTS/wall.txt"
  first=${first:-$m}
done
runs=(); for m in $METHODS; do [ -f "$RESULTS/${TASK}_$m/eval_val/cases.csv" ] && runs+=("$RESULTS/${TASK}_$m"); done
[ ${#runs[@]} -ge 2 ] && "$PY" -m samatch.cli compare "${runs[@]}" 2>&1 | tee "$RESULTS/compare_${TASK}.txt"
exit 0
