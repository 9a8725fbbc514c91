#!/usr/bin/env bash
# One device call: our engine beside the published reference (issue 10's side-by-side table), the engine's checks
# and its overlap / streams rows again, pipe mode's one-GPU numbers. Repo root, .whl and .refbench carried:
#   bash experiments/gpu_sidebyside.sh     -> $OUT/sidebyside_*.{json,md}, $OUT/*.txt
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET=${SBS_BUDGET:-500}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.:experiments HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
step() {  # step NAME SECONDS command...: skipped when the budget cannot hold it
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS - 5))
  [ "$left" -lt 20 ] && { echo "=== $name: skipped (budget)"; return; }
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name [${SECONDS}s, limit ${limit}s]"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; echo "exit $?" >> "$OUT/$name.txt"
  grep -E '^\||PASS|FAIL|^exit|Error' "$OUT/$name.txt" | tail -30
}
step sidebyside 330 python3 experiments/bench_sidebyside.py --ref-bench .refbench/ref_bench.py --out "$OUT" \
  --configs ${SBS_CONFIGS:-1.3B:1:wan,1.3B:4:wan,1.3B:1:taehv,1.3B:1:taehv_full,1.3B:1:wan:512x512,14B:1:wan,14B:1:wan::fp8,1.3B:1:wan::fp8}
step check_engine 70 python3 experiments/check_engine.py --frames 33
step engine 90 python3 experiments/bench_pipeline.py --configs wan_1_3b:1 --vae taehv_full --frames 97 --streams 1,4 \
  --overlap both --dit-alone --json "$OUT/engine_taehv_full.json"
[ -f experiments/bench_pipe.py ] && step bench_pipe 60 python3 experiments/bench_pipe.py --json "$OUT/bench_pipe.json"
echo "=== done [${SECONDS}s]"
