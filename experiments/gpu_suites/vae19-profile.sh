# issue 19: VAE time per kind of work against the conv floor, many streams in one call, bench_vae rows (VAE19_BUDGET)
# One H200, repo root, .whl and .refbench carried; under 10 minutes:
#   bash experiments/gpu.sh vae19-profile   -> $OUT/profile_vae.{txt,json}, $OUT/bench_vae_{96,24}.{txt,json}
# 3 streams (one joining late) in one fused + CUDA-graph call against each alone (fp32: PASS / FAIL), the conv floor
# (the floor probe's method, same call), the Wan VAE (96) and LightVAE (24) by kind of work against it, whole steps
# for 1 and 4 streams in one call, each stream's state and the peak per added stream at 480x832; bench_vae rows
# with and without the deferred conv bias.
BUDGET=${VAE19_BUDGET:-580}
step profile_vae 300 python3 experiments/profile_vae.py --json "$OUT/profile_vae.json" --streams 1,4
step bench_vae_96 150 python3 experiments/bench_vae.py --check --chunks 12 --warmup 3 --json "$OUT/bench_vae_96.json" \
  --variants wan_fused_graph,wan_fused_graph_bias,wan_fused,taehv_graph,taehv_full_graph
step bench_vae_24 100 python3 experiments/bench_vae.py --dim 24 --chunks 12 --warmup 3 --json "$OUT/bench_vae_24.json" \
  --variants wan_fused_graph,wan_fused_graph_bias,wan_fused,wan
echo "=== done [${SECONDS}s]"
