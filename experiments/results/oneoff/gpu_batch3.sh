#!/usr/bin/env bash
# Third device call: the Fig. 9 preset swept on one GPU (paper figure + table), and UMT5 offload.
#   bash experiments/gpu_batch3.sh   (repo root, .whl carried)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.:experiments HF_HUB_OFFLINE=1 WANDB_MODE=offline
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.txt" | tail -12; }

step fig9 420 python3 experiments/paper_figures.py fig9_fps_1_3b --run --sweep-dir /tmp/fig9 \
  --extra cuda_graph=true dataset.n=2 logger=none eval.save_videos=0
cp /tmp/fig9/paper_figures/* "$OUT"/ 2>/dev/null; ls "$OUT"
