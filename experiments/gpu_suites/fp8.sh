# FP8 ours vs torchao's float8 (per row, per tensor) vs bf16: GEMMs, DiT step eager and CUDA graph, 40-chunk error
# Wheels: TORCHAO=0.18.0 bash experiments/gpu_wheels.sh (hydra-core for the backbone configs, torchao), carry [".whl"]
#   bash experiments/gpu.sh fp8        (repo root; writes $OUT/fp8.json, fp8.txt; at most ~570 s)
BUDGET=${FP8_BUDGET:-575}
python3 -c "import torch, torchao; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchao', torchao.__version__)" \
  2>&1 | grep -v "Enum subclass" | tee -a "$OUT/gpu.txt"
step fp8 565 python3 experiments/bench_fp8.py --budget-s 470 --iters 10 --json "$OUT/fp8.json"
echo "done ($SECONDS s)"; ls -la "$OUT"
