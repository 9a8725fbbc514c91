# issue 17: every front end beside the engine, and the engine beside the reference (FE_*, SBS_*)
# One device call for issue 17: every front end beside the engine (bench_frontends.py), and the engine beside the
# reference at the headline configuration (bench_sidebyside.py), in the same call. Repo root; carry .whl and
# .refbench (experiments/gpu_wheels.sh makes both):   bash experiments/gpu.sh frontends  -> $OUT/results.tgz
BUDGET=${FE_BUDGET:-560}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
step frontends ${FE_LIMIT:-330} python3 experiments/bench_frontends.py --out /tmp/fe ${FE_ARGS:-}
cp /tmp/fe/frontends.json /tmp/fe/*.log "$OUT/" 2>/dev/null
step sidebyside ${SBS_LIMIT:-200} python3 experiments/bench_sidebyside.py --ref-bench .refbench/ref_bench.py --out "$OUT" \
  --configs ${SBS_CONFIGS:-1.3B:1:wan,1.3B:1:taehv}
echo "=== done [${SECONDS}s]"
cd "$OUT" && tar czf /tmp/results.tgz ./* && rm -rf ./* && mv /tmp/results.tgz .
