# issue 10's VAE half: the fused / graph fast paths, then eager, graph, the reference, TAEHV and compile (VAE_BUDGET)
# Repo root, .whl (the reference wheel) carried:  bash experiments/gpu.sh vae  -> $OUT/vae_fast.*, $OUT/vae_base.*
#  1. the fast paths: fused vs eager (bf16, fp32) on the GPU, encode + decode on two CUDA streams at once,
#     device time by kernel kind, single-op timings, and the fused / graph rows;
#  2. in a second process (so that a crash of a fast path cannot lose them): eager, CUDA graph, the
#     reference, TAEHV rows, the TAEHV-vs-Wan latent error, and torch.compile last (skipped past its deadline).
BUDGET=${VAE_BUDGET:-320}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/gpu.txt"
echo "=== fast paths [${SECONDS}s]"
timeout 170 python3 experiments/bench_vae.py --check --profile --micro --chunks 12 --warmup 3 --json "$OUT/vae_fast.json" \
  --variants wan_fused_graph,wan_fused,wan_fused_graph_noup,wan_fused_graph_nopad,taehv_graph,taehv_full_graph \
  2>&1 | tee "$OUT/vae_fast.txt"
LEFT=$((BUDGET - SECONDS - 5))
echo "=== baselines [${SECONDS}s, ${LEFT}s left]"
timeout "$LEFT" python3 experiments/bench_vae.py --chunks 12 --warmup 3 --json "$OUT/vae_base.json" \
  --deadline $((LEFT - 100)) --variants wan,wan_graph,ref_wan,taehv,ref_taehv,ref_taehv_parallel,taehv_latent_error,wan_compile \
  2>&1 | tee "$OUT/vae_base.txt"
echo "=== done [${SECONDS}s]"
