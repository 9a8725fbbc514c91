# issue 23: the plugin backbones side by side at 480x832, each with its own recipe (steps, blocks, window, sink)
# One device call, repo root, .whl carried:   bash experiments/gpu.sh backbones   -> $OUT/backbones*.json
# bench_pipeline.py, Wan VAE, dummy weights, 129 frames after a warm-up stream; BB_CONFIGS picks the backbones
# (backbone[:steps], comma separated), BB_MODES the modes (single = stream batch, single_wo = every step in turn).
BUDGET=${BB_BUDGET:-540}
for m in ${BB_MODES:-single single_wo}; do
  step "backbones_$m" ${BB_LIMIT:-240} python3 experiments/bench_pipeline.py \
    --configs "${BB_CONFIGS:-wan_1_3b,self_forcing,causal_forcing_pp_1step,longlive}" --extra "mode=$m" \
    --json "$OUT/backbones_$m.json"
done
echo "=== done [${SECONDS}s]"
