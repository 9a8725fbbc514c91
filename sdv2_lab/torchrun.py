"""Ranks of a ``pipe`` job under torchrun (one process per GPU; torchrun sets RANK, WORLD_SIZE, MASTER_ADDR...):

    python -m torch.distributed.run --nproc_per_node=2 -m sdv2_lab.torchrun run mode=pipe device=cuda \\
        input=file input.video=in.mp4 input.prompt="a watercolor painting" output.dir=out
    python -m torch.distributed.run --nproc_per_node=2 -m sdv2_lab.torchrun eval mode=pipe device=cuda

``SDV2_PIPE_DEVICES=cuda:2,cuda:3`` picks the devices (default cuda:<LOCAL_RANK>). ``eval`` writes to
``outputs/pipe/<torchrun's run id>`` unless ``SDV2_RUN_DIR`` names a folder.
"""
from __future__ import annotations

import os
import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "eval"):
        sys.exit(__doc__)
    command, overrides = argv[0], argv[1:]
    from .cli import run
    from .configs import compose_config
    from .eval.cli import evaluate
    from .parallel import context
    from .parallel.launch import rank_main, run_with_config
    from .parallel.placement import pipe_mode
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    default_dir = os.path.join("outputs", "pipe", run_id)
    if not any(o.startswith("mode=") for o in overrides):
        overrides = ["mode=pipe"] + overrides
    if command == "run" and not any(o.startswith("output.dir=") for o in overrides):
        overrides.append(f"output.dir={default_dir}")
    cfg = compose_config("config" if command == "run" else "eval", overrides)
    from omegaconf import OmegaConf
    container = OmegaConf.to_container(cfg, resolve=True)
    mode = pipe_mode(cfg)
    timeout, stall = float(mode.timeout_s), mode.stall_timeout_s
    # every rank runs the front end's own function (as a launched job does): its placement is its rank's stage
    call = (run, container, None, (), {}) if command == "run" else \
        (evaluate, container, None, (os.environ.get("SDV2_RUN_DIR", default_dir), overrides), {})
    rank_main(lambda: context.init_from_env(timeout, None if stall is None else float(stall)), run_with_config, call,
              None, mode.threads)

if __name__ == "__main__":
    main()
