# issue 23: the plugin backbones side by side at 480x832, each with its own recipe (graphed passes checked first)
# One device call, repo root, .whl carried:   bash experiments/gpu.sh backbones   -> $OUT/backbones*.json
# First the CUDA-graph executor against eager on CUDA for an all-steps backbone (its passes replay one graph).
# Then bench_pipeline.py at the front ends' defaults (CUDA graphs, overlap, compiled kernels), Wan VAE, dummy
# weights, 129 frames after a warm-up stream. single_wo (every step of a block in turn: these models' own loops,
# and where LongLive's recache and Krea's recompute run) for BB_WO; single (the stream batch) for BB_SB.
# BB_KV=1 adds the KV rebuilds' cost (bench_kv_rebuild.py).
BUDGET=${BB_BUDGET:-575}
step graph_check ${BB_CHECK_LIMIT:-100} python3 experiments/check_engine.py --backbone self_forcing --steps 0 \
  --frames 105 --checks graph --extra mode=single_wo,warmup=false
step backbones_single_wo ${BB_WO_LIMIT:-330} python3 experiments/bench_pipeline.py --compile \
  --configs "${BB_WO:-self_forcing,causvid,causal_forcing_pp_1step,longlive,memflow,reward_forcing,rolling_forcing,krea_14b}" --extra "mode=single_wo" \
  --json "$OUT/backbones_single_wo.json"
step backbones_single ${BB_SB_LIMIT:-130} python3 experiments/bench_pipeline.py --compile \
  --configs "${BB_SB:-wan_1_3b:1,self_forcing,reward_forcing}" --extra "mode=single" --json "$OUT/backbones_single.json"
[ -n "${BB_KV:-}" ] && step kv_rebuild ${BB_KV_LIMIT:-100} python3 experiments/bench_kv_rebuild.py --json "$OUT/kv_rebuild.json"
echo "=== done [${SECONDS}s]"
