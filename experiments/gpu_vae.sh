#!/usr/bin/env bash
# One device call for issue 10's VAE half: every fast path checked against eager on the GPU (bf16 and fp32),
# encode + decode on two CUDA streams at once, single-op timings, then the FPS table (the compile row last,
# skipped past the deadline). Run on the GPU box from the repo root, with .whl (the reference wheel) carried:
#   bash experiments/gpu_vae.sh        -> $OUT/bench_vae.txt, $OUT/bench_vae.json
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:.:experiments HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/gpu.txt"
timeout "${VAE_LIMIT:-310}" python3 experiments/bench_vae.py --check --profile --micro --chunks 12 --warmup 3 \
  --deadline "${VAE_DEADLINE:-175}" --json "$OUT/bench_vae.json" 2>&1 | tee "$OUT/bench_vae.txt"
