# issue 19's remaining rows: LightTAE both ways, 4 LightVAE streams, LightVAE at 720x1280 and at 14B, one call
# Ours only (the reference has none of these VAEs); each row after one warm-up stream, dummy weights.
BUDGET=${PLUGIN_VAES_BUDGET:-585}
step rows 570 python3 experiments/bench_sidebyside.py --ref-bench '' --frames 97 --out "$OUT" \
  --configs ${PLUGIN_VAES_CONFIGS:-1.3B:1:lighttae_full,1.3B:1:lightvae:480x832:bf16:4,1.3B:1:lightvae:720x1280,14B:1:lightvae}
echo "=== done [${SECONDS}s]"
