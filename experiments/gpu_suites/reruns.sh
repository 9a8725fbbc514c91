# issue 23's reruns: reward_forcing in the stream batch (the EMA sink's capture fixed), Krea's recompute in order on,off
# bash experiments/gpu.sh reruns     -> $OUT/rf_single.json, $OUT/kv_rebuild2.json, $OUT/*.txt
BUDGET=${RERUNS_BUDGET:-300}
step rf_single 120 python3 experiments/bench_pipeline.py --configs reward_forcing --extra mode=single \
  --json "$OUT/rf_single.json"
step kv_rebuild2 150 python3 experiments/bench_kv_rebuild.py --backbones wan_1_3b:krea --order on,off --warm 6 \
  --chunks 8 --switches 1 --json "$OUT/kv_rebuild2.json"
echo "=== done [${SECONDS}s]"
