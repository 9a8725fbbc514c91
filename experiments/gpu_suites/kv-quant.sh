# issue 20: the KV cache stored as int8 / fp8 (kv_cache_dtype) beside the model dtype: memory, DiT and e2e FPS
# One device call, repo root, .whl carried:   bash experiments/gpu.sh kv-quant   -> $OUT/kv_<dtype>.json
# 1.3B and 14B at 480x832, 1 step, Wan VAE, dummy weights; the DiT timed alone too (--dit-alone). The outputs'
# error against the model-dtype cache over a 40-chunk stream is measured on CPU (tests/test_kv_quant.py).
BUDGET=${KVQ_BUDGET:-540}
for d in model int8 fp8; do
  step "kv_$d" 170 python3 experiments/bench_pipeline.py --configs wan_1_3b:1,wan_14b:1 --frames 65 --dit-alone \
    --extra "kv_cache_dtype=$d" --json "$OUT/kv_$d.json"
done
echo "=== done [${SECONDS}s]"
