#!/usr/bin/env bash
# One device call that measures everything the open issues ask for (see experiments/results/*.md).
#   run on the GPU box from the repo root, with .whl carried:  bash experiments/gpu_batch.sh
# Each benchmark gets its own time limit so that one slow step cannot lose the others' numbers.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.:experiments HF_HUB_OFFLINE=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.txt" | tail -25; }
step vae 200 python3 experiments/bench_vae.py --chunks 12 --warmup 3
step text 90 python3 experiments/bench_text.py --prompts 5
step dit_compiled 150 python3 experiments/bench_dit.py --sizes wan_1_3b --steps 1,2 --cuda-graph on --compile on
step pipeline_taehv 130 python3 experiments/bench_pipeline.py --configs wan_1_3b:1,wan_1_3b:2 --frames 97 --extra vae=taehv
