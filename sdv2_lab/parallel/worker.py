"""One rank of a launched ``pipe`` job, in a Python process of its own:

    python -m sdv2_lab.parallel.worker <job folder> <rank>

The launcher (``launch.launch``) writes the job to ``<job folder>/job.pkl``: the launcher's ``sys.path``, the
store's port, every rank's device, the settings, then the rank function and its arguments (pickled by name).
A rank is a fresh interpreter: it imports the function's module, never the script that called the launcher, so
a script without an ``if __name__ == "__main__":`` guard works (multiprocessing's spawn and forkserver re-run
such a script in every child). Only a rank function defined in the calling script itself makes a rank import
that script, as multiprocessing does (then it needs the guard).
"""
from __future__ import annotations

import os
import pickle
import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        sys.exit(__doc__)
    folder, rank = argv[0], int(argv[1])
    with open(os.path.join(folder, "job.pkl"), "rb") as f:
        job = pickle.load(f)                 # plain values: readable before the launcher's sys.path is in place
        sys.path[:] = job["sys_path"]        # the rank function's module is found where the launcher found it
        if job.get("main_path"):             # the rank function lives in the calling script
            _import_main(job["main_path"])
        call = pickle.load(f)
    from .launch import rank_process
    rank_process(rank, job, *call)


def _import_main(path: str) -> None:
    """The calling script as ``__mp_main__`` (its guarded part does not run), aliased as ``__main__`` so that
    functions pickled from it resolve (what multiprocessing's spawn does)."""
    import runpy
    import types
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(runpy.run_path(path, run_name="__mp_main__"))
    sys.modules["__mp_main__"] = sys.modules["__main__"] = module


if __name__ == "__main__":
    main()
