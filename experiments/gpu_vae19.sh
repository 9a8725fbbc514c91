#!/usr/bin/env bash
# Issue 19's device calls (plugin VAEs, one VAE call for all streams, the Wan VAE's glue). On one H200 from the repo
# root, .whl and .refbench carried, each part one call under 10 minutes:
#   bash experiments/gpu_vae19.sh profile   -> $OUT/profile_vae.{txt,json}, $OUT/bench_vae_{96,24}.{txt,json}
#   bash experiments/gpu_vae19.sh targets   -> $OUT/sidebyside_*.{json,md}, $OUT/targets.txt, $OUT/streams.txt
# profile: 3 streams (one joining late) in one fused + CUDA-graph call against each alone (fp32: PASS / FAIL),
#   the conv floor (the floor probe's method, same call), the Wan VAE (96) and LightVAE (24) by kind of work
#   against it, whole steps for 1 and 4 streams in one call, each stream's state and the peak per added stream at
#   480x832; bench_vae rows with and without the deferred conv bias.
# targets: the table (1.3B, 1 step, 480x832, dummy weights): Wan; LightVAE both ways; Wan encode + LightTAE
#   decode; LightTAE both ways; TAEHV decode (the reference has it); 4 streams Wan and LightVAE (totals); 720x1280
#   LightVAE; 14B LightVAE; the reference beside ours where it has the mode (wan, taehv). Then bench_pipeline's
#   1 vs 4 streams for Wan and LightVAE with stage FPS (the 4-stream ratio against one stream).
set -u
PART=${1:-profile}
BUDGET=${VAE19_BUDGET:-580}
source experiments/gpu_common.sh
case "$PART" in
  profile)
    step profile_vae 300 python3 experiments/profile_vae.py --json "$OUT/profile_vae.json" --streams 1,4
    step bench_vae_96 150 python3 experiments/bench_vae.py --check --chunks 12 --warmup 3 --json "$OUT/bench_vae_96.json" \
      --variants wan_fused_graph,wan_fused_graph_bias,wan_fused,taehv_graph,taehv_full_graph
    step bench_vae_24 100 python3 experiments/bench_vae.py --dim 24 --chunks 12 --warmup 3 --json "$OUT/bench_vae_24.json" \
      --variants wan_fused_graph,wan_fused_graph_bias,wan_fused,wan
    ;;
  targets)
    step targets 420 python3 experiments/bench_sidebyside.py --ref-bench .refbench/ref_bench.py --out "$OUT" --frames 97 \
      --frames-14b 49 --configs ${VAE19_CONFIGS:-1.3B:1:wan,1.3B:1:lightvae,1.3B:1:lighttae,1.3B:1:lighttae_full,1.3B:1:taehv,1.3B:1:wan:480x832:bf16:4,1.3B:1:lightvae:480x832:bf16:4,1.3B:1:lightvae:720x1280,14B:1:lightvae}
    step streams 150 python3 experiments/bench_pipeline.py --configs wan_1_3b:1 --frames 97 --streams 1,4 \
      --vae wan --json "$OUT/streams_wan.json"
    step streams_light 100 python3 experiments/bench_pipeline.py --configs wan_1_3b:1 --frames 97 --streams 1,4 \
      --vae lightvae --json "$OUT/streams_lightvae.json"
    ;;
  *) echo "usage: $0 profile|targets"; exit 2 ;;
esac
echo "=== done [${SECONDS}s]"
