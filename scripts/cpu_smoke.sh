#!/usr/bin/env bash
# SAM-Match smoke run on real ACDC slices on a CPU (the other methods' smoke runs are tests:
# tests/test_acdc_smoke.py). Reduced setting: 64 px U-Net (SAM still works at 256x256), 3 labeled
# patients, 16 unlabeled slices, 150 iterations of batch 2, the last 30 in the joint stage; then
# `samatch evaluate` (plain and --sam-cascade) and `samatch predict` on one validation volume.
#   DATA=../shared/data/ACDC OUT=runs/cpu_smoke bash scripts/cpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/ACDC}
OUT=${OUT:-runs/cpu_smoke}
ITERS=${ITERS:-150}
run=$OUT/samatch
sets=(data.size=64 data.max_unlabeled=16 data.max_val_cases=4 model.base_channels=8 schedule.batch_size=2
      schedule.lr=0.03 schedule.eval_every=100000 schedule.log_every=20 sam.warmup_fraction=0.8
      sam.enclosed=2\>3 sam.refine_classes=1,3 device=cpu)
start=$(date +%s)
samatch train --method samatch --data "$DATA" --labeled 3 --out "$run" --iterations "$ITERS" \
  $(printf -- '--set %s ' "${sets[@]}")
python - "$run" <<'PY'
import sys
from samatch.config import TrainConfig
from samatch.data import build_train_data
from samatch.evaluate import evaluate_cases, summarize_dice
from samatch.engine import seed_everything
from samatch.models.unet import build_unet
cfg = TrainConfig.load(f"{sys.argv[1]}/config.json")
data = build_train_data(cfg)
seed_everything(cfg.seed)  # as the Trainer does before it builds the U-Net: the same initial weights
model = build_unet(cfg)
rows = evaluate_cases(model, data.val, data.num_classes, cfg.data.size, "cpu", distances=False)
print(f"untrained U-Net, same seed, same {len(data.val)} val volumes: mean Dice "
      f"{summarize_dice(rows, data.class_names)['dice_mean']:.4f}")
PY
samatch evaluate --run "$run" --device cpu
samatch evaluate --run "$run" --device cpu --sam-cascade
python - "$DATA" "$OUT" <<'PY'
import sys, numpy as np, nibabel as nib
from samatch.io.acdc import AcdcH5Reader
case = AcdcH5Reader(sys.argv[1]).cases("val")[0].load()
nib.save(nib.Nifti1Image(case.image.transpose(2, 1, 0), np.eye(4)), f"{sys.argv[2]}/val0.nii.gz")
PY
samatch predict --run "$run" "$OUT/val0.nii.gz" "$OUT/val0_pred.nii.gz" --device cpu --sam-cascade --overlay
echo "cpu smoke: $(( $(date +%s) - start )) s wall"
