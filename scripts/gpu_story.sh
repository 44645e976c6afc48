#!/usr/bin/env bash
# The whole story at one profile in one command, without Jupyter: for a rented GPU box that has
# python3 with torch, pandas, matplotlib, seaborn, scipy, tqdm and safetensors, but no papermill,
# ipykernel or network. Every notebook runs through flatlib.tools.script (the .ipynb's code cells, with
# papermill's parameter injection); the report and the figures land in figures/<profile>/, packed
# with the executed notebooks into one small archive.
#
#   bash scripts/gpu_story.sh OUT_DIR              # profile gpu, on the GPU
#   PROFILE=smoke FLATLIB_DEVICE=cpu bash scripts/gpu_story.sh /tmp/out   # the dry run on a laptop
#
# The run store (checkpoints) stays on the machine (FLATLIB_RUNS, default /tmp/flatlib-runs): only
# OUT_DIR/figures-<profile>.tar.gz and OUT_DIR/story-<profile>.log need to come back.
set -euo pipefail
out="${1:?usage: scripts/gpu_story.sh OUT_DIR}"
profile="${PROFILE:-gpu}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
export FLATLIB_RUNS="${FLATLIB_RUNS:-/tmp/flatlib-runs}"
python3 - <<'PY'
import torch
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""), flush=True)
PY
status=0
python3 -m flatlib.tools.reproduce --profile "$profile" --runner script 2>&1 | tee "$out/story-$profile.log" || status=$?
folder="figures/$profile"
[ "$profile" = cpu ] && folder=figures
tar czf "$out/figures-$profile.tar.gz" "$folder" "build/$profile" 2>/dev/null || true
ls -la "$out"
exit "$status"
