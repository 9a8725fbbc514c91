# issue 23's reruns: reward_forcing in the stream batch, Krea's recompute on,off and its KV attention bias on,off (1.3B)
# bash experiments/gpu.sh reruns     -> $OUT/rf_single.json, $OUT/kv_rebuild2.json, $OUT/krea_bias_*.json, $OUT/*.txt
BUDGET=${RERUNS_BUDGET:-560}
step rf_single 110 python3 experiments/bench_pipeline.py --configs reward_forcing --extra mode=single \
  --json "$OUT/rf_single.json"
for bias in 0.3 1.0; do   # the krea recipe on the 1.3B DiT: its bias (an additive mask) against none (cuDNN's path)
  step "krea_bias_$bias" 100 python3 experiments/bench_pipeline.py --configs wan_1_3b \
    --extra "backbone/recipe=krea,mode=single_wo,kv_attention_bias=$bias" --json "$OUT/krea_bias_$bias.json"
done
step kv_rebuild2 150 python3 experiments/bench_kv_rebuild.py --backbones wan_1_3b:krea --order on,off --warm 6 \
  --chunks 8 --switches 1 --json "$OUT/kv_rebuild2.json"
echo "=== done [${SECONDS}s]"
