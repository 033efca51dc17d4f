#!/usr/bin/env bash
# Train and evaluate the four methods on a packed ACDC setup within a wall-time budget per method,
# on whatever device torch finds (CUDA when present). Writes runs and a summary under $RESULTS.
#
#   samatch data pack ../shared/data/ACDC --labeled 3 --max-unlabeled 300 --out .gpu/acdc3.npz
#   RESULTS=runs/gpu bash scripts/gpu_results.sh
#
# Env: PACK (packed file), RESULTS (output folder), PY (python), SAM_CKPT (LiteMedSAM weights; empty =
# the packaged file), MINUTES_<METHOD> (budget per method), BATCH, ITERS (upper bound), SAM_REFINE
# (classes SAM refines; default 1,2,3 as in the recorded runs; 1,3 leaves the myocardium to the U-Net).
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=${PACK:-.gpu/acdc3.npz}
RESULTS=${RESULTS:-runs/gpu}
PY=${PY:-python3}
BATCH=${BATCH:-8}
LABELED=${LABELED:-3}
ITERS=${ITERS:-30000}
METHODS=${METHODS:-"unimatch samatch supervised fixmatch"}
mkdir -p "$RESULTS"
"$PY" - <<'PYEOF' > "$RESULTS/env.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PYEOF
cat "$RESULTS/env.txt"
for m in $METHODS; do
  var="MINUTES_${m^^}"; minutes=${!var:-1}
  extra=()
  if [ "$m" = samatch ]; then
    extra=(--set sam.enclosed=2\>3 --set "sam.refine_classes=${SAM_REFINE:-1,2,3}")
    [ -n "${SAM_CKPT:-}" ] && extra+=(--set "sam.checkpoint=$SAM_CKPT")
  fi
  start=$(date +%s)
  "$PY" -m samatch.cli train --method "$m" --data "$PACK" --labeled "$LABELED" --out "$RESULTS/acdc_$m" --quiet \
    --iterations "$ITERS" --set "schedule.minutes=$minutes" --set "schedule.batch_size=$BATCH" \
    --set schedule.eval_every=500 "${extra[@]}" 2>&1 | grep -v Warning
  "$PY" -m samatch.cli evaluate --run "$RESULTS/acdc_$m" --split val 2>&1 | grep -v Warning
  echo "$m: $(( $(date +%s) - start )) s wall (train + evaluate)" | tee -a "$RESULTS/wall.txt"
done
runs=(); for m in supervised $METHODS; do [ -f "$RESULTS/acdc_$m/eval_val/cases.csv" ] && runs+=("$RESULTS/acdc_$m"); done
"$PY" -m samatch.cli compare $(printf '%s\n' "${runs[@]}" | awk '!seen[$0]++') 2>&1 | tee "$RESULTS/compare.txt"
