#!/usr/bin/env bash
# One device call for issue 10's DiT half: FP8 vs bf16 (FP8 GEMM check, DiT step speed and 40-chunk error at
# 14B and 1.3B) and the attention backends at the cache shapes. No wheels: torch's _scaled_mm, PyYAML.
#   bash experiments/gpu_dit.sh        (repo root; writes $OUT/*.json, *.txt; at most ~145 s)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=.:experiments PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($SECONDS s)"; timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1;
         echo "rc=$?"; tail -n 25 "$OUT/$name.txt"; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
# graph capture and masked calls of the registry's sdpa, in a fresh process (a failed capture must not poison the rest)
step attention_checks 18 python3 experiments/bench_attention.py --checks --json "$OUT/attention_checks.json"
step fp8 84 python3 experiments/bench_fp8.py --budget-s 68 --iters 10 --variants bf16,fp8_row,fp8_tensor --json "$OUT/fp8.json"
step attention 40 python3 experiments/bench_attention.py --budget-s 32 --flex-rows 1 --json "$OUT/attention.json"
echo "done ($SECONDS s)"; ls -la "$OUT"
