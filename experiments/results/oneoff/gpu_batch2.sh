#!/usr/bin/env bash
# Second device call: the harness on the GPU (1.3B, everything accelerated), the fastest pipeline settings,
#   bash experiments/gpu_batch2.sh   (repo root, .whl carried)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.:experiments HF_HUB_OFFLINE=1 WANDB_MODE=offline
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.txt" | tail -20; }
step eval_1_3b 240 python3 -m sdv2_lab.eval backbone=wan_1_3b device=cuda height=480 width=832 vae=wan \
  vae.accelerate=compile steps=1 cuda_graph=true compile_kernels=true dataset.n=2 dataset.frames=81 \
  metrics.device=cuda logger=csv eval.save_videos=0 hydra.run.dir=$OUT/eval
cp $OUT/eval/results.csv $OUT/eval_results.csv 2>/dev/null
rm -rf $OUT/eval
