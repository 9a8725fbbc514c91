"""Run the reference's pipe benchmark (``ref_pipe_bench.py``) at another frame size: it passes its own argument list
to the reference's ``inference_pipe.main``, whose parser has ``--height``/``--width`` (default 480x832); this sets
them on whatever that parser returns.

    python -m torch.distributed.run --nproc_per_node=2 experiments/ref_pipe_sized.py 512 512 \\
        .refbench/ref_pipe_bench.py 1.3B 1 16 [--schedule_block]
"""
import argparse
import runpy
import sys

height, width, script = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
_parse = argparse.ArgumentParser.parse_args


def parse_args(self, *args, **kwargs):
    ns = _parse(self, *args, **kwargs)
    if hasattr(ns, "height") and hasattr(ns, "width"):
        ns.height, ns.width = height, width
    return ns


argparse.ArgumentParser.parse_args = parse_args
sys.argv = [script] + sys.argv[4:]
runpy.run_path(script, run_name="__main__")
