# issues 19/20/22: the rows their notes need, in one call (memory after close, the VAE table, int8 KV cache)
# One H100/H200, repo root, .whl and .refbench carried, under 10 minutes:   bash experiments/gpu.sh notes
# check_memory (build, stream, close a 1.3B pipeline three times); the side-by-side rows for Wan, LightVAE both
# ways, LightTAE both ways and 4 Wan streams (the reference beside ours where it has the mode); 1 vs 4 LightVAE
# streams with stage FPS; the KV cache in the model dtype and in int8 at 1.3B, the DiT timed alone too.
BUDGET=${NOTES_BUDGET:-585}
step check_memory 80 python3 experiments/check_memory.py
step targets 280 python3 experiments/bench_sidebyside.py --ref-bench .refbench/ref_bench.py --out "$OUT" --frames 97 \
  --configs ${NOTES_CONFIGS:-1.3B:1:wan,1.3B:1:lightvae,1.3B:1:lighttae,1.3B:1:wan:480x832:bf16:4}
step streams_light 80 python3 experiments/bench_pipeline.py --configs wan_1_3b:1 --frames 97 --streams 1,4 \
  --vae lightvae --json "$OUT/streams_lightvae.json"
for d in model int8; do
  step "kv_$d" 60 python3 experiments/bench_pipeline.py --configs wan_1_3b:1 --frames 65 --dit-alone \
    --extra "kv_cache_dtype=$d" --json "$OUT/kv_$d.json"
done
echo "=== done [${SECONDS}s]"
