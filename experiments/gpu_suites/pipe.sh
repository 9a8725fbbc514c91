# pipe mode: NCCL pipe on 2+ GPUs beside the reference, or one GPU's checks (PIPE_PART, PIPE_BUDGET)
# One device call for pipe mode. Repo root, .whl and .refbench carried (see gpu_common.sh). It adapts to the GPUs
# it finds:
#   2+ GPUs: ours (one-GPU numbers, pipe on 2 and 4 GPUs with the block scheduler off and on, the predictor
#            beside) and the reference's own pipe mode under torchrun, in the same call. PIPE_PART picks a slice
#            (one call holds about one): core = 1.3B / 1 step / 480x832 (the targets) + the reference's single
#            GPU run; steps = 1.3B at 2-4 steps; 14b = 14B at 1 and 2 steps (the reference hangs at exit at 2);
#            square = 512x512.
#   1 GPU:   what one GPU can check of pipe mode: several stages sharing it (check_pipe_gpu.py: the graphed units,
#            block moves and exit on the GPU), the engine's checks at 3 steps, and bench_pipe.py's one-GPU numbers;
#            PIPE_PART=predict: the predictor's inputs with TAEHV, at 512x512 and at 4 steps.
#   bash experiments/gpu.sh pipe            -> $OUT/*.json, $OUT/*.txt; then experiments/pipe_report.py $OUT
BUDGET=${PIPE_BUDGET:-570}
PART=${PIPE_PART:-core}
G=$(nvidia-smi -L | wc -l)
echo "GPUs visible: $G, part: $PART"
ref_pipe() {   # ref_pipe GPUS MODEL STEPS CHUNKS [--schedule_block]   (REF_SIZE=512x512: another frame size)
  local g=$1; shift
  [ "$g" -le "$G" ] || return 0
  local size=${REF_SIZE:-480x832}
  step "ref_pipe_${g}gpu_$1_$2${4:+_sched}_${size}" 150 python3 -m torch.distributed.run --standalone \
    --nproc_per_node=$g experiments/ref_pipe_sized.py ${size%x*} ${size#*x} .refbench/ref_pipe_bench.py "$@"
}
if [ "$G" -ge 2 ]; then
  GL=2; [ "$G" -ge 4 ] && GL=2,4
  case $PART in
  core)
    step ours_1.3B_1 300 python3 experiments/bench_pipe.py --models 1.3B --steps 1 --gpus $GL --schedule-block both \
      --frames 97 --json "$OUT/ours_1.3B_1_480x832.json"
    for g in 2 4; do ref_pipe $g 1.3B 1 24; ref_pipe $g 1.3B 1 24 --schedule_block; done
    step ref_single_1.3B_1 90 python3 .refbench/ref_bench.py 1.3B 1 wan 24 ;;
  steps)
    for s in 2 4 3; do
      step ours_1.3B_$s 150 python3 experiments/bench_pipe.py --models 1.3B --steps $s --gpus $GL --skip equality \
        --frames 65 --json "$OUT/ours_1.3B_${s}_480x832.json"
      for g in 2 4; do ref_pipe $g 1.3B $s 16; done
    done ;;
  14b)
    for s in 1 2; do
      step ours_14B_$s 200 python3 experiments/bench_pipe.py --models 14B --equality-model 14B --steps $s --gpus $GL \
        --skip equality --frames 49 --json "$OUT/ours_14B_${s}_480x832.json"
      for g in 2 4; do ref_pipe $g 14B $s 12; done
    done ;;
  square)
    for m in 1.3B 14B; do
      step ours_${m}_1_512 200 python3 experiments/bench_pipe.py --models $m --equality-model $m --steps 1 --gpus $GL \
        --height 512 --width 512 --frames 65 --json "$OUT/ours_${m}_1_512x512.json"
      for g in 2 4; do REF_SIZE=512x512 ref_pipe $g $m 1 16; done
    done ;;
  esac
elif [ "$PART" = predict ]; then   # one GPU: the predictor's inputs for other VAEs, sizes and step counts
  step pred_taehv_full 150 python3 experiments/bench_pipe.py --models 1.3B,14B --steps 1 --vae taehv_full \
    --skip equality --json "$OUT/pred_1step_480x832_taehv_full.json"
  step pred_512 150 python3 experiments/bench_pipe.py --models 1.3B,14B --steps 1 --height 512 --width 512 \
    --skip equality --json "$OUT/pred_1step_512x512_wan.json"
  step pred_4step 150 python3 experiments/bench_pipe.py --models 1.3B,14B --steps 4 --skip equality \
    --json "$OUT/pred_4step_480x832_wan.json"
else
  step check_pipe_gpu 330 python3 experiments/check_pipe_gpu.py --steps 1,3 --frames 65 --json "$OUT/check_pipe_gpu.json"
  step check_engine 80 python3 experiments/check_engine.py --steps 3 --frames 41
  step bench_pipe 140 python3 experiments/bench_pipe.py --models 1.3B,14B --steps 1 --frames 65 \
    --json "$OUT/ours_1gpu_1step.json"
fi
echo "=== done [${SECONDS}s]"
