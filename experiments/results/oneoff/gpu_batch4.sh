#!/usr/bin/env bash
# Fourth device call: paper Fig. 11 (14B, 1-GPU series, 480p) and the TTFF preset, through paper_figures.py.
#   bash experiments/gpu_batch4.sh   (repo root, .whl carried)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.:experiments HF_HUB_OFFLINE=1 WANDB_MODE=offline
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; tail -3 "$OUT/$name.txt"; }
# (ttff measured in the first run of this script; see experiments/results/ttff_h100)

step fig11 380 python3 experiments/paper_figures.py fig11_fps_14b --run --sweep-dir /tmp/fig11 \
  --extra resolution=480p cuda_graph=true dataset.n=1 logger=none eval.save_videos=0
cp /tmp/ttff/paper_figures/* /tmp/fig11/paper_figures/* "$OUT"/ 2>/dev/null; ls "$OUT"
