# issue 18's 3% check and issue 22's memory after close: ours before vs after the renovation, alternating, one call
# The tree before the renovation goes in .before (carried with .whl):  git archive 55e9817 | tar -x -C .before
# check_memory (build, stream, close a 1.3B pipeline three times; cuBLAS workspaces counted apart), then the
# side-by-side 1.3B / 1 step / Wan VAE row on our side only, before, after, before, after.
BUDGET=${RENOVATION_BUDGET:-585}
step check_memory 100 python3 experiments/check_memory.py --out "$OUT"
for round in $(seq 1 "${RENOVATION_ROUNDS:-2}"); do
  step "before_$round" 110 bash -c "cd .before && python3 experiments/bench_sidebyside.py --ref-bench '' --frames 129 \
    --configs 1.3B:1:wan --out '$OUT/before_$round'"
  step "after_$round" 110 python3 experiments/bench_sidebyside.py --ref-bench '' --frames 129 --configs 1.3B:1:wan \
    --out "$OUT/after_$round"
  # the before tree's VAE graph capture fails (a freed pool handle) and runs eager: the same path on this side
  step "after_eager_vae_$round" 110 python3 experiments/bench_sidebyside.py --ref-bench '' --frames 129 \
    --configs 1.3B:1:wan --extra vae.accelerate=none --out "$OUT/after_eager_vae_$round"
done
echo "=== done [${SECONDS}s]"
