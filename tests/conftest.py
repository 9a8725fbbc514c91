import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# `pytest -n 2` (the README's command): two workers on a 2-core machine, each computing on one thread (and the
# subprocesses the tests start too: they inherit it); two threads each would oversubscribe the cores (703 s vs 531 s)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not os.environ.get("PYTEST_XDIST_WORKER"):   # a worker's torch took OMP_NUM_THREADS above
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_finish(session):
    """Everything imported while collecting (torch, transformers, Lightning, ... : ~650k objects) is moved out of
    the collector's reach: it lives for the whole session anyway, and each full collection would walk it again
    (~0.25 s, and the pipeline builder collects once per build). Objects made by the tests are collected as
    before; gc.get_objects() no longer lists the frozen ones (none of them is made by a test)."""
    import gc
    gc.collect()
    gc.freeze()
