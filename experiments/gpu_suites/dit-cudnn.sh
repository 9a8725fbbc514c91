# issue 20: cuDNN attention inside the DiT's CUDA graphs (captured after the key's eager call) vs flash, and
# compile_kernels on, in the DiT alone and in the pipeline rows, one call:  bash experiments/gpu.sh dit-cudnn
BUDGET=${DIT_CUDNN_BUDGET:-585}
step attention_checks 30 python3 experiments/bench_attention.py --checks --json "$OUT/attention_checks.json"
for cap in flash cudnn; do
  step "dit_$cap" 60 env SDV2_SDPA_CAPTURE=$cap python3 experiments/bench_dit.py --sizes wan_1_3b --steps 1,2 \
    --cuda-graph on --compile both --json "$OUT/dit_$cap.json"
done
for cap in flash cudnn; do
  step "rows_$cap" 150 env SDV2_SDPA_CAPTURE=$cap python3 experiments/bench_sidebyside.py --ref-bench '' --frames 97 \
    --configs ${DIT_CUDNN_CONFIGS:-1.3B:1:wan,1.3B:1:lightvae,1.3B:1:lighttae_full} --extra compile_kernels=true \
    --out "$OUT/rows_$cap"
done
echo "=== done [${SECONDS}s]"
