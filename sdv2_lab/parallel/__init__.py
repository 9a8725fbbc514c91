"""``pipe`` mode: the DiT's blocks split across GPUs (one process per stage), outputs identical to ``single``.

    sdv2 run mode=pipe num_gpus=2 device=cuda                 # or mode.gpu_ids=[0,1]
    sdv2 eval -m mode=pipe num_gpus=1,2,4 device=cuda         # the harness, one process per stage per job
    run_video_to_video(mode="pipe", gpu_ids=[0, 1], num_gpus=2, ...); ./run_v2v.sh pipe --num_gpus 2
    python -m torch.distributed.run --nproc_per_node=2 -m sdv2_lab.torchrun run mode=pipe device=cuda ...
    python -m sdv2_lab.parallel.predict --from experiments/results/bench_pipe.json   # expected FPS for 2/4/8 GPUs

Modules: ``launch`` (processes, torchrun entry, front ends), ``worker`` (one rank's process: ``python -m``, never
the caller's script), ``context`` (process groups), ``health`` (a rank that fails or stops answering ends the job,
named; a slow one is not a dead one), ``comm`` (async double-buffered point-to-point links),
``stage`` (the executor of one stage: its blocks, its share of the KV cache, the schedule that keeps stages
busy), ``meter`` (stage times), ``balance`` (the split and the block scheduler), ``build`` (config -> this
rank's stage), ``predict`` (FPS from one-GPU measurements).
"""
from .health import PipeError  # noqa: F401
