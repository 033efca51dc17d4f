#!/usr/bin/env bash
# Builds .gpu/ (git-ignored), what a lent GPU machine needs beside the checkout for the benchmark parts
# of scripts/gpu_session.sh: the machine has torch, peft, scipy, h5py and tqdm, but not these
# wheels, and it cannot download. The data packs for the training parts are made apart
# (samatch data pack, docs/results.md).
#
#   bash scripts/gpu_carry.sh          # here, once (about 25 MB: LiteMedSAM in fp16 + 5 wheels)
#
# Then one device call, with .gpu carried (the wheels go to /tmp/site, the checkout on the path):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && END=$(( $(date +%s) + 480 )) PARTS="bench_graph" \
#     bash scripts/gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .gpu/whl
# The versions this project pins (constraints.txt), as wheels for the GPU image's Python 3.12.
pins=()
for name in segment-anything monai nibabel cmeel-mimalloc cmeel; do
  pin=$(grep -i "^$name==" constraints.txt) || { echo "gpu_carry: $name is not pinned in constraints.txt" >&2; exit 2; }
  pins+=("$pin")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl "${pins[@]}"
# LiteMedSAM's weights rounded to fp16 (half the bytes; loaded into fp32 parameters there).
"$PY" - <<'EOF'
import torch

from samatch.models.sam_import import litemedsam_checkpoint_path

state = torch.load(litemedsam_checkpoint_path(), map_location="cpu", weights_only=True)
if "model" in state and not isinstance(state["model"], torch.Tensor):
    state = state["model"]
half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
torch.save(half, ".gpu/lite_medsam_fp16.pth")
EOF
du -sh .gpu/whl .gpu/lite_medsam_fp16.pth
