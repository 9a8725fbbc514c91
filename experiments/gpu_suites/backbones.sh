# issue 23: the plugin backbones side by side at 480x832, each with its own recipe; the KV rebuilds' cost
# One device call, repo root, .whl carried:   bash experiments/gpu.sh backbones   -> $OUT/backbones*.json, kv_rebuild.json
# bench_pipeline.py at the front ends' defaults (CUDA graphs, overlap, compiled kernels), Wan VAE, dummy weights,
# 129 frames after a warm-up stream. single_wo (every step of a block in turn: these models' own loops, and where
# LongLive's recache and Krea's recompute run) for BB_WO; single (the stream batch) for BB_SB.
BUDGET=${BB_BUDGET:-570}
step backbones_single_wo ${BB_WO_LIMIT:-300} python3 experiments/bench_pipeline.py --compile \
  --configs "${BB_WO:-self_forcing,causvid,causal_forcing_pp_1step,longlive,memflow,reward_forcing,krea_14b,rolling_forcing}" --extra "mode=single_wo" \
  --json "$OUT/backbones_single_wo.json"
step backbones_single ${BB_SB_LIMIT:-160} python3 experiments/bench_pipeline.py --compile \
  --configs "${BB_SB:-wan_1_3b:1,self_forcing,reward_forcing}" --extra "mode=single" --json "$OUT/backbones_single.json"
step kv_rebuild ${BB_KV_LIMIT:-100} python3 experiments/bench_kv_rebuild.py --json "$OUT/kv_rebuild.json"
echo "=== done [${SECONDS}s]"
