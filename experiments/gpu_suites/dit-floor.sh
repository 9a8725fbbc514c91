# issue 20's profile: the floor script beside our graphed DiT step (eager vs compiled elementwise) and where it goes
# Then the pipeline rows with compile_kernels on and off, same call (ours only):  bash experiments/gpu.sh dit-floor
BUDGET=${DIT_FLOOR_BUDGET:-585}
step floor 60 python3 .refbench/dit_floor.py 1.3B
step dit_steps 70 python3 experiments/bench_dit.py --sizes wan_1_3b --steps 1 --cuda-graph on --compile both \
  --json "$OUT/dit_steps.json"
step profile_eager 60 python3 experiments/profile_dit.py --rows 25 --json "$OUT/profile_eager.json"
step profile_compiled 90 python3 experiments/profile_dit.py --rows 25 --compiled --json "$OUT/profile_compiled.json"
for ck in false true; do
  step "rows_compile_$ck" $([ $ck = true ] && echo 210 || echo 110) python3 experiments/bench_sidebyside.py --ref-bench '' --frames 97 \
    --configs ${DIT_FLOOR_CONFIGS:-1.3B:1:wan,1.3B:1:lighttae_full} --extra "compile_kernels=$ck" --out "$OUT/rows_$ck"
done
echo "=== done [${SECONDS}s]"
