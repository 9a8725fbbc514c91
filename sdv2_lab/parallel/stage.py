"""One ``pipe`` stage: a contiguous range of the DiT's blocks and their share of the KV cache, as an executor.

Every rank runs the same ``StreamDriver`` over the same input in lockstep, so every rank makes the same DiT
jobs without talking about them; each rank's ``PipeStage.run(job, ...)`` does its part of the job:

* the first stage (rank 0) VAE-encodes (in the driver), embeds (patch + time) and runs its blocks;
* middle stages receive activations, run their blocks and pass them on;
* the last stage runs its blocks, the head, velocity -> x0 and the re-noising, sends the re-noised latents back
  to rank 0 (they are the next job's inputs) and VAE-decodes what finished (in the driver).

How every rank stays busy and the output stays identical to ``single``
---------------------------------------------------------------------
A stream-batch job's rows are independent inside the DiT (each row attends only to its own KV-cache row);
what ties jobs together is the slot shift: row i >= 1 of job k is row i-1 of job k-1, re-noised. So a job
is cut into ``n`` units, one per slot (each holding that slot's row of every stream in the job), and each
stage runs units in job order, slot order: unit (k, 0) needs only the new chunk; unit (k, i >= 1) needs unit
(k-1, i-1) to have passed every stage and come back. Between the two, the first stage runs n other units, so
with W stages a single stream keeps every stage busy when n + 1 >= W (roughly); more streams fill it further.
A first chunk (all steps on one row) runs its passes through the ring one after another.

Numerics are the ``single`` mode's, not approximately but operation for operation: each unit's rows go
through the same kernels with the same shapes per row (GEMMs and attention are row-independent), attention
keeps the whole job's key length and per-row lengths (``StepPlan.select``), the time embedding is computed
for the whole job at once (its GEMM has only B*F rows, and small GEMMs round differently with the batch),
and the patch embedding runs over the whole job's batch with the unit's rows in place (the convolution picks
its algorithm by batch size). Random numbers are drawn only on rank 0, in the driver's order, and the
re-noise of each row travels with its activations.

On GPUs each stage replays its blocks for a stream-batch unit from a CUDA graph (``graphs.py``; an eager block
is host-bound), with the job's plan static in a buffer per row set; first chunks run eagerly.

Messages, in order on each link (receives are posted by shape: the lockstep tells every rank what comes):
forward ``[tokens [B, F*S, D], aux]`` with ``aux`` = (t, t_next) | e0 | e | x_t | noise packed in the
activation dtype; back (last -> first) the re-noised latents ``[B, F, C, h, w]`` of slots 0..n-2.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ..stream.executor import CUDAGraphExecutor, DiTExecutor, DiTResult
from ..stream.schedule import next_slot_timesteps
from ..stream.scheduler import DiTJob
from ..stream.timing import Clock
from . import balance
from .comm import TAG_FWD, TAG_MOVE, TAG_RET, BufferPool, Link, Op, stage_out, wait_work
from .context import PipeContext
from .graphs import UnitGraphs
from .meter import StageMeter

log = logging.getLogger(__name__)


@dataclass
class PipeOptions:
    """``conf/mode/pipe.yaml``, as the stage uses it."""
    schedule_block: bool = False          # the block scheduler: measure stage times, move blocks between neighbours
    tolerance: float = 0.05               # ... until the slowest stage is within this of the mean
    balance_every: int = 8                # jobs per measurement window
    max_ahead: int = 3                    # GPU: jobs the host may queue ahead of the device
    depth: int = 2                        # messages in flight per link (double buffering)
    cuda_graph: bool = False              # GPU: stream-batch units replayed from CUDA graphs (parallel/graphs.py)
    emulate_graphs: bool = False          # tests: the graphs' keying and static buffers, emulated on CPU
    rebalance_at: dict = field(default_factory=dict)   # tests: {job number: blocks per stage}, forced moves
    fail: Optional[dict] = None           # tests: {"rank": r, "job": k, "how": "raise" | "hang" | "freeze"}
    slow: Optional[dict] = None           # tests: {"rank": r, "ms_per_block": x}, a slower device
    stall: Optional[dict] = None          # tests: {"rank": r, "at": "prompt" | job k, "seconds": x}: slow, alive


class PipeStage(DiTExecutor):
    name = "pipe"

    def __init__(self, dit, cache, schedule=None, *, ctx: Optional[PipeContext], ranges: balance.Ranges,
                 options: Optional[PipeOptions] = None):
        super().__init__(dit, cache, schedule)
        self.ctx, self.opts = ctx, options or PipeOptions()
        self.rank, self.world = (ctx.rank, ctx.world) if ctx is not None else (0, 1)
        self.ranges = balance.check_ranges(ranges, dit.cfg.num_layers)
        if len(self.ranges) != self.world:
            raise ValueError(f"{len(self.ranges)} block ranges for {self.world} pipeline stages")
        self.first_layer, self.end_layer = self.ranges[self.rank]
        if (cache.first_layer, cache.end_layer) != (self.first_layer, self.end_layer):
            raise ValueError(f"rank {self.rank}: KV cache holds layers [{cache.first_layer}, {cache.end_layer}), "
                             f"the stage blocks [{self.first_layer}, {self.end_layer})")
        self.encodes, self.decodes = self.rank == 0, self.rank == self.world - 1
        self.health = ctx.health if ctx is not None else None
        self.act = dit.held_parameter().dtype
        self.meter = StageMeter(Clock(cache.device))
        self.jobs = 0
        self.rebalances: list[tuple[int, list[int]]] = []
        self._ring: dict[int, dict[int, tuple]] = {}     # rank 0: stream id -> {slot: (pending, row)} (next job)
        self._ring_rows: dict[int, list[int]] = {}
        self._orphans: list = []                         # rank 0: ring receives no job will read (drained at the end)
        self._ahead: deque = deque()
        self._measured_from = 0
        self._warm = 0
        self.staged = ctx is not None and ctx.staged
        graphs = self.opts.cuda_graph and cache.device.type == "cuda"
        # one stage: the whole job as single mode runs it (graphed or not); several: units, graphed per unit
        self._whole = CUDAGraphExecutor(dit, cache, self.schedule) if graphs and self.world == 1 else None
        self.unit_graphs = UnitGraphs(dit, cache, emulate=not graphs) \
            if self.world > 1 and (graphs or self.opts.emulate_graphs) else None
        self.links: list[Link] = []
        if self.world > 1:
            pool = BufferPool(cache.device, self.staged)
            mk = lambda peer, group, tag, name: Link(peer, group, tag, cache.device, self.health, name,  # noqa: E731
                                                     self.opts.depth, pool, self.staged)
            self.fwd_in = mk(self.rank - 1, ctx.link_groups[self.rank - 1], TAG_FWD, "activations in") \
                if self.rank > 0 else None
            self.fwd_out = mk(self.rank + 1, ctx.link_groups[self.rank], TAG_FWD, "activations out") \
                if not self.decodes else None
            self.ret_out = mk(0, ctx.ret_group, TAG_RET, "latents back") if self.decodes else None
            self.ret_in = mk(self.world - 1, ctx.ret_group, TAG_RET, "latents back") if self.encodes else None
            self.links = [lk for lk in (self.fwd_in, self.fwd_out, self.ret_in, self.ret_out) if lk is not None]
            ctx.on_close(self.close)

    # ------------------------------------------------------------------ description
    @property
    def role(self) -> str:
        parts = [f"blocks {self.first_layer}-{self.end_layer - 1}"]
        if self.encodes:
            parts.insert(0, "VAE encode, embedding")
        if self.decodes:
            parts.append("head, VAE decode")
        return ", ".join(parts)

    def _doing(self, what: str) -> None:
        if self.health is not None:
            self.health.doing(what)

    def attach(self, driver) -> None:
        """Time this stage's VAE work too (the driver's encode/decode events) and share the driver's clock."""
        self.meter.clock = driver.clock
        driver.subscribe(self.meter.on_event)

    # ------------------------------------------------------------------ rows and prompts
    @torch.no_grad()
    def set_prompt(self, rows: list[int], embedding: Optional[torch.Tensor]) -> None:
        """The first stage turns the prompt into the blocks' context and sends it to every stage; each stores its
        own layers' cross-attention K/V."""
        if self.world == 1:
            return super().set_prompt(rows, embedding)
        shape = (1, self.dit.cfg.text_len, self.dit.cfg.dim)
        ctx = self.dit.prompt_context(embedding).contiguous() if self.encodes else \
            torch.empty(shape, dtype=self.act, device=self.device)
        self._injected_stall("prompt")
        self._doing("receiving a prompt's context from rank 0" if not self.encodes else "sending a prompt's context")
        wire = stage_out([ctx])[0] if self.staged else ctx
        work = dist.broadcast(wire, src=0, group=self.ctx.world_group, async_op=True)
        wait_work(Op(work, wire.device.type == "cpu"), self.health, 0, "for a prompt's context (broadcast from rank 0)")
        if wire is not ctx:
            ctx.copy_(wire)
        self.dit.set_context(self.cache, ctx, rows)

    def reset_rows(self, rows: list[int], keep_memory: bool = False) -> None:
        super().reset_rows(rows, keep_memory)
        for sid in [sid for sid, r in self._ring_rows.items() if set(r) & set(rows)]:
            self._drop_ring(sid)

    def _drop_ring(self, sid: int) -> None:
        for pending, _ in self._ring.pop(sid, {}).values():
            self._orphans.append(pending)
        self._ring_rows.pop(sid, None)
        self._orphans = [p for p in self._orphans if not (p.done or all(w.is_completed() for w in p.works))]

    # ------------------------------------------------------------------ jobs
    @torch.no_grad()
    def run(self, job: DiTJob, x: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor]) -> DiTResult:
        self.jobs += 1
        self._warm = len(job.streams[0].steps) + 1   # a clip's first chunk and the filling stream batch
        self._injected_failure()
        self._injected_stall(self.jobs)
        if self.world > 1:
            self._balance_point()
        self.meter.start_job(self.jobs)
        if x.dtype != self.act and self.world > 1:
            raise ValueError(f"pipe: latents are {x.dtype} but the DiT computes in {self.act}; use one dtype")
        if self.world == 1:   # one stage: the whole model, one unit per job (single mode's path)
            a = self.meter.now()
            result = self._whole.run(job, x, t, noise) if self._whole is not None else super().run(job, x, t, noise)
            self.meter.add("dit", a, self.meter.now())
            return result
        result = self._stream_batch(job, x, t, noise) if job.stream_batch else self._all_steps(job, x, t, noise)
        self._throttle()
        return result

    def _plan(self, x, job: DiTJob, pops, static: bool = False) -> object:
        """The job's plan (host decisions; the device work follows unit by unit). ``static``: for graphed units
        (``StreamKVCache.plan``)."""
        plan = self.dit.plan(x, self.cache, job.starts, job.rows, pops, static=static)
        self.cache.commit(plan)   # host mirrors only
        return plan

    def _geometry(self, x):
        f, hl, wl = x.shape[1], x.shape[3], x.shape[4]
        ph, pw = self.dit.cfg.patch_size[1:]
        return f, hl // ph, wl // pw

    def _specs(self, b: int, x) -> list:
        f = x.shape[1]
        S, D = self.cache.spec.frame_tokens, self.dit.cfg.dim
        return [((b, f * S, D), self.act), ((aux_size(b, f, D, x.shape[2:], self.act),), self.act)]

    def _blocks(self, tokens, e0, plan, f, h, w, graph_key: Optional[tuple] = None):
        """This stage's blocks over one unit; ``graph_key`` (stream-batch units): replayed from a CUDA graph."""
        a = self.meter.now()
        if graph_key is not None and self.unit_graphs is not None:
            out = self.unit_graphs.run(graph_key, tokens, e0, plan, f, h, w, self.first_layer, self.end_layer)
            if not self.decodes:
                out = out.clone()   # sent on: the graph's next replay overwrites its output
        else:
            rope = self.dit.rope(plan.start_frames, f, h, w, tokens.device)
            out = self.dit.run_blocks(tokens, e0, rope, self.cache, plan, self.first_layer, self.end_layer)
        if self.opts.slow and int(self.opts.slow.get("rank", -1)) == self.rank:
            time.sleep(float(self.opts.slow["ms_per_block"]) * (self.end_layer - self.first_layer) / 1e3)
        b = self.meter.now()
        self.meter.add("blocks", a, b)
        return out

    def _stream_batch(self, job: DiTJob, x, t, noise) -> DiTResult:
        streams, rows = len(job.streams), len(job.rows)
        n = rows // streams
        f, h, w = self._geometry(x)
        plan = self._plan(x, job, job.pops[0], static=self.unit_graphs is not None)
        jid = self.jobs
        if self.encodes:
            a = self.meter.now()
            e, e0 = self.dit.time_embed(t[:, None].expand(-1, f), self.act)   # the whole job: single's batch
            t_next = next_slot_timesteps(t, n)
            self.meter.add("dit", a, self.meter.now())
            ring = {}   # what the last stage sends back from this job: next job's slot i + 1 per stream
            for i in range(n - 1):
                p = self.ret_in.post([((streams, *x.shape[1:]), self.act)], f"the re-noised latents of job {jid} "
                                     f"slot {i} (the next job's slot {i + 1})")
                for j, s in enumerate(job.streams):
                    ring.setdefault(s.id, {})[i + 1] = (p, j)
            for i in range(n):
                self._doing(f"job {jid} slot {i}: embedding and blocks {self.first_layer}-{self.end_layer - 1}")
                sl = slice(i, None, n)
                if i:
                    for j, s in enumerate(job.streams):   # the ring: slot i is slot i - 1 of the last job, re-noised
                        got = self._ring.get(s.id, {}).pop(i, None)
                        if got is not None:
                            pending, row = got
                            x[j * n + i].copy_(pending.wait()[0][row])
                a = self.meter.now()
                tokens = self.dit.patchify(x)[sl]          # the job's batch (see the module docstring)
                self.meter.add("dit", a, self.meter.now())
                tt = torch.stack([t[sl], t_next[sl]], dim=1)
                aux = pack(tt, e0[sl], e[sl], x[sl], noise[sl], self.act)
                out = self._blocks(tokens, e0[sl], plan.select(sl), f, h, w, (tuple(job.rows), i))
                self._doing(f"job {jid} slot {i}: sending activations to rank 1")
                self.fwd_out.send([out, aux], f"activations of job {jid} slot {i}")
            for s in job.streams:
                self._drop_ring(s.id)
                self._ring[s.id] = ring.get(s.id, {})
                self._ring_rows[s.id] = list(s.rows)
            return DiTResult(torch.empty((streams, *x.shape[1:]), device="meta", dtype=x.dtype), x)
        outs = None
        pending = self.fwd_in.post(self._specs(streams, x), f"activations of job {jid} slot 0")
        for i in range(n):
            sl = slice(i, None, n)
            self._doing(f"job {jid} slot {i}: waiting for activations from rank {self.rank - 1}")
            cur = pending
            if i + 1 < n:   # double buffering: the next unit's receive is posted before this one computes
                pending = self.fwd_in.post(self._specs(streams, x), f"activations of job {jid} slot {i + 1}")
            tokens, aux = cur.wait()
            tt, e0, e, xt, nz = unpack(aux, streams, f, self.dit.cfg.dim, x.shape[2:], self.act)
            self._doing(f"job {jid} slot {i}: blocks {self.first_layer}-{self.end_layer - 1}")
            out = self._blocks(tokens, e0, plan.select(sl), f, h, w, (tuple(job.rows), i))
            if not self.decodes:
                works = self.fwd_out.send([out, aux], f"activations of job {jid} slot {i}")
                cur.release(after=tuple(works))
                continue
            x0 = self._finish_unit(out, e, xt, tt, nz, f, h, w, i < n - 1, f"job {jid} slot {i}")
            if i == n - 1:
                outs = x0
            cur.release()
        if outs is None:
            outs = torch.empty((streams, *x.shape[1:]), device="meta", dtype=x.dtype)
        return DiTResult(outs, x)

    def _all_steps(self, job: DiTJob, x, t, noise) -> DiTResult:
        """A first chunk: all steps in turn on its row; each pass goes round the ring (x0 re-noised on the last
        stage, back to the first for the next pass)."""
        passes, f = job.passes, x.shape[1]
        _, h, w = self._geometry(x)
        plans = [self._plan(x, job, job.pops[k]) for k in range(passes)]   # host decisions, pass after pass
        jid = self.jobs
        b = x.shape[0]
        for s in job.streams:
            self._drop_ring(s.id)
        if self.encodes:
            backs = [self.ret_in.post([(tuple(x.shape), self.act)], f"the re-noised latents of job {jid} pass {k}")
                     for k in range(passes - 1)]
            xk = x
            for k in range(passes):
                self._doing(f"job {jid} (first chunk) pass {k}: embedding and blocks")
                if k:
                    xk = backs[k - 1].wait()[0]
                a = self.meter.now()
                e, e0 = self.dit.time_embed(t[k][:, None].expand(-1, f), self.act)
                tokens = self.dit.patchify(xk)
                self.meter.add("dit", a, self.meter.now())
                nz = noise[k] if k < passes - 1 else torch.zeros_like(xk)
                tt = torch.stack([t[k], t[k + 1] if k < passes - 1 else t[k]], dim=1)
                aux = pack(tt, e0, e, xk, nz, self.act)
                out = self._blocks(tokens, e0, plans[k], f, h, w)
                self.fwd_out.send([out, aux], f"activations of job {jid} pass {k}")
            return DiTResult(torch.empty_like(x, device="meta"))
        x0 = None
        for k in range(passes):
            self._doing(f"job {jid} (first chunk) pass {k}: waiting for activations from rank {self.rank - 1}")
            cur = self.fwd_in.post(self._specs(b, x), f"activations of job {jid} pass {k}")
            tokens, aux = cur.wait()
            tt, e0, e, xt, nz = unpack(aux, b, f, self.dit.cfg.dim, x.shape[2:], self.act)
            out = self._blocks(tokens, e0, plans[k], f, h, w)
            if not self.decodes:
                cur.release(after=tuple(self.fwd_out.send([out, aux], f"activations of job {jid} pass {k}")))
                continue
            x0 = self._finish_unit(out, e, xt, tt, nz, f, h, w, k < passes - 1, f"job {jid} pass {k}")
            cur.release()
        return DiTResult(x0 if x0 is not None else torch.empty_like(x, device="meta"))

    def _finish_unit(self, out, e, xt, tt, nz, f: int, h: int, w: int, renoise: bool, what: str):
        """The last stage's end of a unit: head, velocity -> x0 and, unless the unit leaves (``renoise``), x0
        re-noised to the next timestep and sent back to rank 0. Returns x0."""
        a = self.meter.now()
        v = self.dit.unpatchify(self.dit.head(out, e).flatten(1, 2), f, h, w)
        x0, renoised = self.schedule.step(v, xt, tt[:, 0], nz if renoise else None, tt[:, 1] if renoise else None)
        self.meter.add("dit", a, self.meter.now())
        if renoised is not None:
            self._doing(f"{what}: sending re-noised latents to rank 0")
            self.ret_out.send([renoised.contiguous()], f"the re-noised latents of {what}")
        return x0

    def _throttle(self) -> None:
        """GPU: the host queues at most ``max_ahead`` jobs ahead of the device (it waits for an old job, never
        for the current one). CPU: nothing to do."""
        if self.device.type != "cuda":
            return
        ev = torch.cuda.Event()
        ev.record()
        self._ahead.append(ev)
        if len(self._ahead) > self.opts.max_ahead:
            old = self._ahead.popleft()
            start = time.monotonic()
            while not old.query():
                if self.health is not None:
                    self.health.check()
                    if time.monotonic() - start > self.health.stall:
                        raise self.health.stalled((self.rank + 1) % self.world, "for its own GPU work of an earlier "
                                                  "job (a peer may be stuck)", time.monotonic() - start)
                time.sleep(1e-4)

    # ------------------------------------------------------------------ the block scheduler
    def _balance_point(self) -> None:
        """At a job boundary (the same on every rank): forced moves (tests), or every ``balance_every`` jobs the
        measured stage times all-gathered and, when the slowest stage is more than ``tolerance`` above the mean,
        blocks moved between neighbours."""
        forced = self.opts.rebalance_at.get(self.jobs) or self.opts.rebalance_at.get(str(self.jobs))
        if forced is not None:
            self._move(balance.check_ranges(balance.ranges_of(forced), self.dit.cfg.num_layers))
            return
        k = self.opts.balance_every
        if not self.opts.schedule_block or self.jobs % k != 1 or self.jobs < 1 + 2 * k:
            return
        lag = k if self.device.type == "cuda" else 0        # GPU: the window before last, long finished
        lo, hi = self.jobs - 1 - k - lag, self.jobs - 1 - lag
        if lo < max(1, self._measured_from):   # jobs count from 1; a window measured before a move says nothing
            return
        stage_ms, block_ms = self.meter.window(lo, hi)
        mine = torch.tensor([stage_ms, block_ms], dtype=torch.float64)
        allv = [torch.empty_like(mine) for _ in range(self.world)]
        self._doing(f"job {self.jobs}: sharing stage times (block scheduler)")
        work = dist.all_gather(allv, mine, group=self.ctx.ctl_group, async_op=True)
        wait_work(Op(work, True), self.health, (self.rank + 1) % self.world, "for every rank's stage times "
                  "(block scheduler all-gather)")
        stage = [float(v[0]) for v in allv]
        blocks = [float(v[1]) for v in allv]
        new = balance.propose(self.ranges, stage, blocks, tolerance=self.opts.tolerance)
        if new is not None and self.rank == 0:
            log.info("block scheduler at job %d: stage ms %s (%.1f%% above the mean): blocks %s -> %s", self.jobs,
                     [round(s, 2) for s in stage], 100 * balance.imbalance(stage), balance.counts_of(self.ranges),
                     balance.counts_of(new))
        if new is not None:
            self._move(new)

    def _move(self, new: balance.Ranges) -> None:
        """Hand blocks over: weights and KV-cache state (keys, values, eviction queues, cross-attention K/V) go
        from each block's old owner to its new one, in block order on every rank."""
        old = self.ranges
        if new == old:
            return
        owner_old = [r for r, (s, e) in enumerate(old) for _ in range(s, e)]
        owner_new = [r for r, (s, e) in enumerate(new) for _ in range(s, e)]
        ops, incoming, outgoing, landed = [], {}, [], []
        self._doing(f"job {self.jobs}: moving blocks {balance.counts_of(old)} -> {balance.counts_of(new)}")
        for layer, (a, b) in enumerate(zip(owner_old, owner_new)):
            if a == b or self.rank not in (a, b):
                continue
            blk = self.dit.blocks[layer]
            if self.rank == a:
                tensors = [v.contiguous() for v in blk.state_dict().values()]
                tensors += list(self.cache.layer_state(layer).values())
                if self.staged:
                    tensors = stage_out(tensors)
                ops += [dist.P2POp(dist.isend, t_, b, self.ctx.world_group, TAG_MOVE) for t_ in tensors]
                outgoing.append(layer)
            else:
                blk.to_empty(device=self.device).to(self.act)
                state = self.cache.empty_layer_state()
                tensors = list(blk.state_dict().values()) + list(state.values())
                wires = [torch.empty(t_.shape, dtype=t_.dtype, pin_memory=True) for t_ in tensors] \
                    if self.staged else tensors
                ops += [dist.P2POp(dist.irecv, w_, a, self.ctx.world_group, TAG_MOVE) for w_ in wires]
                landed += [(t_, w_) for t_, w_ in zip(tensors, wires) if w_ is not t_]
                incoming[layer] = state
        if ops:
            host = self.device.type == "cpu" or self.staged
            peers = sorted({op.peer for op in ops})
            for w in dist.batch_isend_irecv(ops):
                wait_work(Op(w, host), self.health, peers[0], f"for blocks handed over with rank(s) {peers} "
                          f"(block scheduler)")
        for t_, w_ in landed:
            t_.copy_(w_)
        for layer in incoming:
            self.dit.block_arrived(layer)
        first, end = new[self.rank]
        if (first, end) != (self.cache.first_layer, self.cache.end_layer):
            self.cache.set_layers(first, end, incoming)
        for layer in outgoing:
            self.dit.block_left(layer)
        self.ranges, self.first_layer, self.end_layer = new, first, end
        if self.unit_graphs is not None:   # the graphs hold the old blocks and cache tensors
            self.unit_graphs.clear()
        self.rebalances.append((self.jobs, balance.counts_of(new)))
        self._measured_from = self.jobs

    # ------------------------------------------------------------------ tests: a rank that fails
    def _injected_failure(self) -> None:
        f = self.opts.fail
        if not f or int(f.get("rank", -1)) != self.rank or int(f.get("job", -1)) != self.jobs:
            return
        how = f.get("how", "raise")
        self._doing(f"job {self.jobs}: an injected failure ({how})")
        if how == "raise":
            raise RuntimeError(f"injected failure at job {self.jobs}")
        if how == "freeze":        # stops answering: the whole process stops, heartbeat included
            if self.health is not None:
                self.health.publish()   # what it was doing, said before it stops
            os.kill(os.getpid(), signal.SIGSTOP)
        while True:                # hang: alive (heartbeat goes on) but never does its part
            time.sleep(0.1)

    def _injected_stall(self, at) -> None:
        """A slow rank (a long stage build, a loaded CPU): busy for a while, its heartbeat going on."""
        st = self.opts.stall
        if st and int(st.get("rank", -1)) == self.rank and st.get("at") == at:
            self._doing(f"an injected stall of {st['seconds']} s ({at})")
            time.sleep(float(st["seconds"]))

    # ------------------------------------------------------------------ statistics and the end
    def clip_stats(self) -> dict:
        """Per-rank stage times and the bubble fraction of the jobs since the last call, on every rank (a
        collective: every rank calls it at the same point)."""
        mine = self.meter.summary(skip=self._warm)
        mine.update(rank=self.rank, blocks=self.end_layer - self.first_layer)
        g = self.unit_graphs or self._whole
        if g is not None:
            mine.update(graph_replays=g.replays, graph_captures=g.captures)
        if self.world == 1:
            everyone = [mine]
        else:
            everyone = [None] * self.world
            self._doing("sharing run statistics")
            dist.all_gather_object(everyone, mine, group=self.ctx.ctl_group)
        out = {"pipe_ranks": self.world, "pipe_split": str([d["blocks"] for d in everyone]),
               "pipe_rebalances": len(self.rebalances)}
        for d in everyone:
            r = d["rank"]
            for k in ("stage_ms", "blocks_ms", "encode_ms", "decode_ms", "bubble", "graph_replays", "graph_captures"):
                if d.get(k) is not None:
                    out[f"pipe_{k}_r{r}"] = d[k]
            for k in ("encode_fps", "decode_fps"):       # the first stage encodes, the last decodes
                if d.get(k) is not None:
                    out[f"pipe_{k}"] = d[k]
        bubbles = [d["bubble"] for d in everyone if d.get("bubble") is not None]
        if bubbles:
            out["pipe_bubble"] = sum(bubbles) / len(bubbles)
        stages = [d["stage_ms"] for d in everyone if d.get("stage_ms") is not None]
        if stages:
            out["pipe_imbalance"] = balance.imbalance(stages)
        return out

    def release(self) -> None:
        """Give back device memory: graphs, receive buffers, the KV cache (after ``close``)."""
        if self.unit_graphs is not None:
            self.unit_graphs.clear()
        if self._whole is not None:
            self._whole.release()
        for link in self.links:
            link.pool.free.clear()
        self._ring, self._orphans = {}, []
        super().release()

    def close(self) -> None:
        """Drain every send and receive still in flight (a run must end with none unmatched)."""
        self._doing("draining sends and receives")
        for p in self._orphans:
            p.wait()
        for ring in self._ring.values():
            for p, _ in ring.values():
                p.wait()
        self._orphans, self._ring = [], {}
        for link in self.links:
            link.drain()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------- the aux message
def aux_size(b: int, f: int, d: int, latent: tuple, dtype: torch.dtype) -> int:
    ints = 2 * 8 // dtype.itemsize
    lat = f
    for s in latent:
        lat *= s
    return b * (ints + f * 6 * d + f * d + 2 * lat)


def pack(tt, e0, e, x, noise, dtype) -> torch.Tensor:
    """(t, t_next) int64 [B, 2] | e0 [B, F, 6, D] | e [B, F, D] | x_t [B, F, C, h, w] | noise: one flat tensor in
    the activation dtype (the int64s reinterpreted bit for bit, first so that they stay aligned)."""
    ints = tt.to(torch.long).contiguous().view(dtype).reshape(-1)
    return torch.cat([ints, e0.reshape(-1), e.reshape(-1), x.reshape(-1).to(dtype), noise.reshape(-1).to(dtype)])


def unpack(aux, b: int, f: int, d: int, latent: tuple, dtype):
    ints = b * 2 * 8 // dtype.itemsize
    sizes = [ints, b * f * 6 * d, b * f * d]
    lat = b * f
    for s in latent:
        lat *= s
    parts = aux.split(sizes + [lat, lat])
    tt = parts[0].view(torch.long).view(b, 2)
    return (tt, parts[1].view(b, f, 6, d), parts[2].view(b, f, d), parts[3].view(b, f, *latent),
            parts[4].view(b, f, *latent))
