# issues 8/11/12: the stream engine's checks, overlap and streams rows, pipe one-GPU, serve load
# One device call for the stream engine (issue 8), pipe mode's one-GPU measurements (issue 11) and the web
# server's load clients (issue 12). Run on the GPU box from the repo root with .whl carried:
#   bash experiments/gpu.sh engine        -> $OUT/*.txt, $OUT/*.json
# Every step has its own time limit and writes its file as it goes: a step that fails or runs long costs only
# itself. Weights are DUMMY (random) throughout: timings are real, outputs are noise.
BUDGET=${ENGINE_BUDGET:-440}
step check_engine 100 python3 experiments/check_engine.py --frames 33
step engine_overlap 130 python3 experiments/bench_pipeline.py --configs wan_1_3b:1,wan_1_3b:4,wan_14b:1 \
  --frames 65 --overlap both --dit-alone --json "$OUT/engine_overlap.json"
step engine_streams 80 python3 experiments/bench_pipeline.py --configs wan_1_3b:1 --frames 65 --streams 1,2,4,8 \
  --overlap on --dit-alone --json "$OUT/engine_streams.json"
[ -n "${WITH_PIPE:-}" ] && [ -f experiments/bench_pipe.py ] && step bench_pipe 50 python3 experiments/bench_pipe.py --json "$OUT/bench_pipe.json"
[ -f experiments/bench_serve.py ] && step bench_serve 100 python3 experiments/bench_serve.py --clients 1,2,4,8 \
  --seconds 10 --warmup 2 --out "$OUT/bench_serve.json" -- backbone=wan_1_3b device=cuda height=480 width=832 steps=1 \
  cuda_graph=true overlap=true
echo "=== done [${SECONDS}s]"
