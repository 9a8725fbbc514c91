# issue 10's DiT half: FP8 vs bf16 (GEMM check, step speed, 40-chunk error at 14B and 1.3B), attention backends
# Wheels: bash experiments/gpu_wheels.sh (hydra-core: bench_fp8 composes the backbone configs), carry [".whl"]
#   bash experiments/gpu.sh dit        (repo root; writes $OUT/*.json, *.txt; at most ~145 s)
BUDGET=${DIT_BUDGET:-160}
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" \
  | tee -a "$OUT/gpu.txt"
# graph capture and masked calls of the registry's sdpa, in a fresh process (a failed capture must not poison the rest)
step attention_checks 18 python3 experiments/bench_attention.py --checks --json "$OUT/attention_checks.json"
step fp8 84 python3 experiments/bench_fp8.py --budget-s 68 --iters 10 --variants bf16,fp8_row,fp8_tensor --json "$OUT/fp8.json"
step attention 40 python3 experiments/bench_attention.py --budget-s 32 --flex-rows 1 --json "$OUT/attention.json"
echo "done ($SECONDS s)"; ls -la "$OUT"
