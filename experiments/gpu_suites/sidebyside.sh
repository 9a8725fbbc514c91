# issue 10: the engine beside the published reference, the engine's checks, overlap/streams (SBS_*)
# One device call: our engine beside the published reference (issue 10's side-by-side table), the engine's checks
# and its overlap / streams rows again, pipe mode's one-GPU numbers. Repo root, .whl and .refbench carried:
#   bash experiments/gpu.sh sidebyside     -> $OUT/sidebyside_*.{json,md}, $OUT/*.txt
BUDGET=${SBS_BUDGET:-500}
step sidebyside 330 python3 experiments/bench_sidebyside.py --ref-bench .refbench/ref_bench.py --out "$OUT" \
  --configs ${SBS_CONFIGS:-1.3B:1:wan,1.3B:4:wan,1.3B:1:taehv,1.3B:1:taehv_full,1.3B:1:wan:512x512,14B:1:wan,14B:1:wan::fp8,1.3B:1:wan::fp8}
step check_engine 70 python3 experiments/check_engine.py --frames 33
step engine 90 python3 experiments/bench_pipeline.py --configs wan_1_3b:1 --vae taehv_full --frames 97 --streams 1,4 \
  --overlap both --dit-alone --json "$OUT/engine_taehv_full.json"
[ -f experiments/bench_pipe.py ] && step bench_pipe 60 python3 experiments/bench_pipe.py --json "$OUT/bench_pipe.json"
echo "=== done [${SECONDS}s]"
