# issue 19: the side-by-side table for every VAE (the reference beside ours), then 1 vs 4 streams (VAE19_*)
# One H200, repo root, .whl and .refbench carried; under 10 minutes:
#   bash experiments/gpu.sh vae19-targets   -> $OUT/sidebyside_*.{json,md}, $OUT/targets.txt, $OUT/streams*.txt
# The table (1.3B, 1 step, 480x832, dummy weights): Wan; LightVAE both ways; Wan encode + LightTAE decode;
# LightTAE both ways; TAEHV decode (the reference has it); 4 streams Wan and LightVAE (totals); 720x1280 LightVAE;
# 14B LightVAE; the reference beside ours where it has the mode (wan, taehv). Then bench_pipeline's 1 vs 4 streams
# for Wan and LightVAE with stage FPS (the 4-stream ratio against one stream).
BUDGET=${VAE19_BUDGET:-580}
step targets 420 python3 experiments/bench_sidebyside.py --ref-bench .refbench/ref_bench.py --out "$OUT" --frames 97 \
  --frames-14b 49 --configs ${VAE19_CONFIGS:-1.3B:1:wan,1.3B:1:lightvae,1.3B:1:lighttae,1.3B:1:lighttae_full,1.3B:1:taehv,1.3B:1:wan:480x832:bf16:4,1.3B:1:lightvae:480x832:bf16:4,1.3B:1:lightvae:720x1280,14B:1:lightvae}
step streams 150 python3 experiments/bench_pipeline.py --configs wan_1_3b:1 --frames 97 --streams 1,4 \
  --vae wan --json "$OUT/streams_wan.json"
step streams_light 100 python3 experiments/bench_pipeline.py --configs wan_1_3b:1 --frames 97 --streams 1,4 \
  --vae lightvae --json "$OUT/streams_lightvae.json"
echo "=== done [${SECONDS}s]"
