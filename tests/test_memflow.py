"""MemFlow as a plugin backbone (conf/backbone/memflow.yaml, recipe memflow): its memory bank
(sdv2_lab/backbones/memory.py) checked against the mechanic stated directly, the tiny model streamed with it, its
official base + LoRA files, and the recipe's checks.

The mechanic, as Scope's port states it (daydreamlive/scope pipelines/memflow/modules/causal_model.py:
``CausalWanSelfAttention.forward``, ``_apply_cache_updates``, ``_apply_cache_updates_before``, ``compress_kv_bank``;
wan2_1/blocks/clean_kv_cache.py): a block's context pass on every ``record_interval``-th block stages the block's
first latent frame (post-RoPE keys, values); from the next block on, every call attends to [sink, bank, window];
while the bank has room the frame is appended, once full the ``bank_size - 1`` historical frames that score best
against the prompt's text keys (mean over text tokens, heads and frame tokens of q_text . k / sqrt(dh)) are kept
and the new frame follows them."""
import pytest
import torch

from sdv2_lab.backbones.attention import get_attention
from sdv2_lab.backbones.kv_cache import CacheSpec, StreamKVCache
from sdv2_lab.backbones.memory import memory_saliency
from sdv2_lab.build import build_pipeline, compose_config
from sdv2_lab.settings import dit_config, dit_load_options, pipeline_config
from sdv2_lab.units import tokens_per_latent_frame
from test_backbone_mechanics import traced_pipeline

H, W = 32, 48
S = tokens_per_latent_frame(H, W)
TINY = ["backbone=tiny", f"height={H}", f"width={W}", "warmup=false", "mode=single_wo", "steps=1",
        "backbone/recipe=memflow"]
TINY_SIZES = ["backbone.dim=256", "backbone.ffn_dim=512", "backbone.num_heads=2", "backbone.num_layers=2"]


# ---------------------------------------------------------------------------------------------- the oracle
def scope_compress(bank: list, new, text_q: torch.Tensor, budget: int) -> list:
    """Scope's ``compress_kv_bank`` stated with float64 tensors: scores of every historical token by full attention
    from the text keys, averaged over text tokens, heads and each frame's tokens; the best ``budget - 1`` frames
    (in score order) then the new frame. ``bank``: [(k [S, H, dh], v)]; ``text_q`` [H, Ltxt, dh]."""
    hist_k = torch.cat([k for k, _ in bank])                                        # [M*S, H, dh]
    scores = torch.einsum("htd,lhd->htl", text_q, hist_k) * text_q.shape[-1] ** -0.5   # [H, Ltxt, M*S]
    per_frame = scores.mean(1).mean(0).view(len(bank), -1).mean(1)                  # [M]
    keep = torch.topk(per_frame, budget - 1).indices.tolist()
    return [bank[i] for i in keep] + [new]


def attention64(q, k, v):
    """softmax(q k^T / sqrt(dh)) v in float64; q [Lq, H, dh], k, v [Lk, H, dh]."""
    q, k, v = (t.double().transpose(0, 1) for t in (q, k, v))
    return ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1).__matmul__(v).transpose(0, 1)


def spec(memory_frames=3, interval=3, **kw):
    base = dict(num_layers=2, num_heads=2, head_dim=8, frame_tokens=4, num_frames=12, sink_frames=3)
    return CacheSpec(**{**base, **kw}, memory_frames=memory_frames, memory_interval=interval)


@pytest.mark.parametrize("interval", [3, 1])
def test_the_bank_attends_records_and_replaces_as_memflow_states_it(interval):
    """Two rows of random keys through blocks of 3 frames (two denoising passes, then the context pass), row 1
    restarted midway so the rows differ in history and bank: every call's attention over the engine's keys equals,
    in float64 (fp32 tolerance 1e-5), attention over the window (a twin cache without the bank) plus the frames
    the plain bank above holds; the bank fills at blocks 0, n, 2n and replaces its least relevant frame after."""
    sp = spec(interval=interval)
    Sf, M, heads, dh = sp.frame_tokens, sp.memory_frames, sp.num_heads, sp.head_dim
    mem = StreamKVCache(sp, rows=2, dtype=torch.float32, device="cpu")
    twin = StreamKVCache(spec(memory_frames=0), rows=2, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    text = torch.randn(sp.num_layers, 2, heads, 7, dh, generator=g)
    for c in (mem, twin):
        c.set_cross([0, 1], text[:, 0], text[:, 0])
        c.set_cross([1], text[:, 1], text[:, 1])
    attend = get_attention("sdpa").attend
    banks = [[[] for _ in range(2)] for _ in range(sp.num_layers)]   # [layer][row] -> [(k, v)]
    contexts, block, replaced = [0, 0], [0, 0], 0
    for step in range(14):
        if step == 6:   # row 1 starts again: a new stream (its window and bank forgotten)
            for c in (mem, twin):
                c.reset_rows([1])
            banks = [[layer[0], []] for layer in banks]
            contexts[1], block[1] = 0, 0
        starts = [b * 3 * Sf for b in block]
        for p, context in enumerate((False, False, True)):
            plans = [c.plan(starts, 3 * Sf, pop=[p == 0] * 2, context=context) for c in (mem, twin)]
            for li in range(sp.num_layers):
                q, k_new, v_new = (torch.randn(2, 3 * Sf, heads, dh, generator=g) for _ in range(3))
                k, v, lens, _ = mem.update(li, plans[0], k_new, v_new)
                wk, wv, wlens, _ = twin.update(li, plans[1], k_new, v_new)
                got = attend(q, k, v, lens)
                for r in range(2):
                    n = plans[1].new_local_end[r]
                    keys = torch.cat([wk[r, :n], *[f[0] for f in banks[li][r]]])
                    vals = torch.cat([wv[r, :n], *[f[1] for f in banks[li][r]]])
                    torch.testing.assert_close(got[r].double(), attention64(q[r], keys, vals), rtol=1e-5, atol=1e-5)
                    if context and contexts[r] % interval == 0:   # the block's first frame, seen from the next block
                        new = (k_new[r, :Sf].double(), v_new[r, :Sf].double())
                        if len(banks[li][r]) < M:
                            banks[li][r].append(new)
                        else:
                            banks[li][r] = scope_compress(banks[li][r], new, text[li, r].double(), M)
                            replaced += 1
            for c, plan in zip((mem, twin), plans):
                c.commit(plan)
        contexts = [x + 1 for x in contexts]
        block = [b + 1 for b in block]
    assert mem.memory.recorded == [sum(1 for b in range(14) if b % interval == 0),
                                   sum(1 for b in range(8) if b % interval == 0)]
    assert replaced > 0                                # the bank was full and replaced frames


def test_the_saliency_is_scopes_score_of_each_frame():
    """``memory_saliency`` (means first) equals Scope's full text-to-key attention scores averaged (float64)."""
    g = torch.Generator().manual_seed(1)
    text, bank = torch.randn(2, 3, 11, 8, generator=g), torch.randn(2, 4 * 5, 3, 8, generator=g)
    got = memory_saliency(text, bank, 5)
    for b in range(2):
        scores = torch.einsum("htd,lhd->htl", text[b].double(), bank[b].double()) / 8 ** 0.5
        want = scores.mean(1).mean(0).view(4, 5).mean(1)
        torch.testing.assert_close(got[b].double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the stream
def traced(overrides, base=TINY):
    """A pipeline (noise draws zero) and the velocity of every DiT call it makes."""
    return traced_pipeline(base + overrides, lambda x, t, plan, out: out.clone())


def t2v_blocks(overrides, blocks: int, switch_at=None):
    pipe, calls = traced(["t2v=true", *overrides])
    d = pipe.driver
    s = d.open("a red kite over the sea", seed=0)
    firsts, banks = [], []
    for k in range(blocks):
        if k == switch_at:
            memory = d.executor.cache.memory
            bank = None if memory is None else memory.k.clone()
            d.set_prompt(s, "a city street at night")
            banks.append((bank, None if memory is None else memory.k.clone()))
        firsts.append(len(calls))
        d._run([d.scheduler.noise_chunk(s)])
    return pipe, calls, firsts, banks


def test_memflow_streams_t2v_with_its_bank_and_keeps_it_through_the_recache():
    """The tiny model with MemFlow's recipe, T2V in single-wo: block 0 is the stream without the bank (nothing
    recorded yet), every later block differs from it (the bank holds block 0's first frame from block 1 on); the
    prompt switch's recache rewrites the window and leaves the bank as it was."""
    pipe, calls, firsts, banks = t2v_blocks([], blocks=12, switch_at=10)
    cfg, cache = pipe.driver.cfg, pipe.driver.executor.cache
    assert (cfg.memory, cfg.memory_record_interval, cfg.kv_rebuild, cfg.context_pass) == (3, 3, "recache", True)
    assert cache.memory.recorded == [4] and cache.memory.contexts == [12]   # blocks 0, 3, 6, 9
    before, after = banks[0]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    _, plain, plain_firsts, _ = t2v_blocks(["memory_frames=0"], blocks=12, switch_at=10)
    assert plain_firsts == firsts
    torch.testing.assert_close(calls[firsts[0]], plain[firsts[0]], rtol=0, atol=0)
    for k in range(1, 12):
        assert not torch.allclose(calls[firsts[k]], plain[firsts[k]], atol=1e-4), k
    assert all(torch.isfinite(c).all() for c in calls)


def test_memflow_streams_video_to_video_through_the_front_door():
    """V2V through push / set_prompt / flush: every input frame comes out, finite; the recache ran once (4 replay
    calls over the 12-frame window) and the bank recorded every 3rd block."""
    from test_backbone_mechanics import stream_v2v_with_a_prompt_switch
    pipe = build_pipeline(compose_config("config", TINY))
    _, replays = stream_v2v_with_a_prompt_switch(pipe, 4, 2)
    assert len(replays) == 4
    assert pipe.driver.executor.cache.memory.recorded == [3]       # blocks 0, 3, 6 of 7


def test_memflow_generates_text_to_video_through_the_front_door():
    """T2V through start / generate / set_prompt / generate: finite frames of whole blocks, the recache ran on the
    switch and the bank went on recording across it."""
    pipe = build_pipeline(compose_config("config", TINY + ["t2v=true"]))
    replays, run = [], pipe.driver.executor.run
    pipe.driver.executor.run = lambda job, *a: (replays.append(job) if not job.chunks and not job.stream_batch
                                                else None) or run(job, *a)
    pipe.start("a red kite over the sea")
    first = pipe.generate(9 + 12 * 4)
    pipe.set_prompt("a city street at night")
    second = pipe.generate(12 * 3)
    for out in (first, second):
        assert out.shape[1:] == (H, W, 3) and len(out) and torch.isfinite(out).all()
    assert len(replays) == 4
    memory = pipe.driver.executor.cache.memory
    assert memory.recorded == [sum(1 for b in range(memory.contexts[0]) if b % 3 == 0)] and memory.contexts[0] >= 7


def test_a_new_stream_starts_with_an_empty_bank():
    pipe, _ = traced(["t2v=true"])
    d, cache = pipe.driver, pipe.driver.executor.cache
    s = d.open("a red kite over the sea", seed=0)
    for _ in range(2):
        d._run([d.scheduler.noise_chunk(s)])
    assert cache.memory.recorded == [1] and cache.memory.k.abs().sum() > 0
    d.close(s)
    d.open("a city street at night", seed=1)
    assert cache.memory.recorded == [0] and cache.memory.k.abs().sum() == 0


def test_the_bank_runs_in_single_wo_only():
    single = pipeline_config(compose_config("config", ["backbone=memflow"])).validate()
    assert single.memory == 0 and "mode=single_wo" in single.memory_note
    pipe = build_pipeline(compose_config("config", [o for o in TINY if o != "mode=single_wo"]))
    assert pipe.driver.executor.cache.memory is None
    from sdv2_lab.settings import describe_paths
    assert "memory bank of 3 frames" in describe_paths(compose_config("config", ["backbone=memflow",
                                                                                 "mode=single_wo"]))
    assert "memory" not in describe_paths(compose_config("config", ["backbone=memflow"]))


# ---------------------------------------------------------------------------------------------- the files
def test_the_official_base_and_lora_load_as_the_merged_plain_weights(tmp_path):
    """MemFlow's base.pt (LongLive's container) + lora.pt (PEFT names under 'generator_lora', every linear of the
    blocks, alpha 256 as the entry's) streams exactly as the LoRA merged by hand into a plain Wan file."""
    from sdv2_lab.backbones.checkpoints import load_backbone
    cfg = dit_config(compose_config("config", ["backbone=tiny"]))
    sd = {k: v.clone() for k, v in load_backbone(cfg, "dummy", dtype=torch.float32, seed=5).state_dict().items()}
    g, r, alpha = torch.Generator().manual_seed(2), 4, 256
    lora, merged = {}, dict(sd)
    for name in [k[:-len(".weight")] for k in sd if k.startswith("blocks.") and k.endswith(".weight")
                 and sd[k].dim() == 2]:
        out_f, in_f = sd[f"{name}.weight"].shape
        a, b = torch.randn(r, in_f, generator=g) * 0.02, torch.randn(out_f, r, generator=g) * 0.02
        lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"] = a, b
        merged[f"{name}.weight"] = (sd[f"{name}.weight"].double() + alpha / r * (b.double() @ a.double())).float()
    assert len(lora) == 2 * 2 * 10                     # 2 layers x (q, k, v, o of both attentions + 2 FFN linears)
    torch.save({"generator_ema": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "base.pt")
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    torch.save({"generator": {f"model.{k}": v for k, v in merged.items()}}, tmp_path / "merged.pt")
    official = ["backbone=memflow", *TINY_SIZES, "weights=real", f"weights.checkpoint={tmp_path / 'base.pt'}",
                f"backbone.checkpoint.lora={tmp_path / 'lora.pt'}"]
    plain = ["backbone=memflow", *TINY_SIZES, "weights=real", f"weights.checkpoint={tmp_path / 'merged.pt'}",
             "backbone.checkpoint.lora=null"]
    streams = []
    for ov in (official, plain):
        c = compose_config("config", ov)
        assert c.backbone.checkpoint.lora_alpha == alpha
        dit = load_backbone(dit_config(c), c.weights.checkpoint, dtype=torch.float32, **dit_load_options(c))
        pipe, calls = traced(["backbone=memflow", *TINY_SIZES, "t2v=true"],
                             base=[o for o in TINY if not o.startswith("backbone")])
        pipe.dit.load_state_dict(dit.state_dict())   # the files' DiT in a stream of the entry's recipe
        assert pipe.driver.cfg.memory == 3
        s = pipe.driver.open("a red kite over the sea", seed=0)
        for _ in range(5):
            pipe.driver._run([pipe.driver.scheduler.noise_chunk(s)])
        streams.append(calls)
    assert len(streams[0]) == len(streams[1]) > 0
    for x, y in zip(*streams):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged["blocks.0.self_attn.q.weight"], sd["blocks.0.self_attn.q.weight"])


# ---------------------------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("override,message", [
    ("memory_frames=-1", r"memory_frames must be 0 \(off\) or a positive number of latent frames, got -1"),
    ("memory_frames=2.5", r"memory_frames must be 0 \(off\) or a positive number of latent frames, got 2.5"),
    ("memory_frames=true", r"memory_frames must be 0 \(off\) or a positive number of latent frames, got True"),
    ("memory_record_interval=0", r"memory_record_interval must be a positive number of blocks, got 0"),
    ("context_pass=false", r"memory_frames=3 \(MemFlow's memory bank\) .* needs context_pass=true"),
    ("kv_attention_bias=0.3", r"memory_frames=3 \(MemFlow's memory bank\) and kv_attention_bias=0.3 \(Krea's\) "
                              r"do not combine"),
])
def test_bad_memory_values_are_refused_with_what_was_expected(override, message):
    with pytest.raises(ValueError, match=message):
        pipeline_config(compose_config("config", ["backbone=memflow", "mode=single_wo", override])).validate()


def test_the_cache_spec_checks_its_memory_keys():
    with pytest.raises(ValueError, match="memory_frames must be 0"):
        spec(memory_frames=-2)
    with pytest.raises(ValueError, match="memory_record_interval must be a positive number of blocks, got 0"):
        spec(interval=0)
    with pytest.raises(ValueError, match="do not combine"):
        spec(key_bias=0.5)
    cache = StreamKVCache(spec(), rows=1, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="memory bank .* mode=single_wo"):
        cache.expand_batch(2)


def test_the_entry_says_what_memflow_runs():
    c = compose_config("config", ["backbone=memflow"])
    p = pipeline_config(c)
    assert (p.memory_frames, p.memory_record_interval, p.num_kv_cache, p.sink_frames, p.frames_per_block) == \
        (3, 3, 12, 3, 3)
    assert p.kv_recache and p.context_pass and p.adapt_sink_threshold == -1
    assert list(c.denoising_step_list) == [1000, 750, 500, 250] and c.timestep_shift == 5.0
    ck = c.backbone.checkpoint
    assert (ck.path, ck.lora, ck.lora_alpha) == ("ckpts/memflow/base.pt", "ckpts/memflow/lora.pt", 256)
    assert c.backbone.dim == 1536 and c.backbone.num_layers == 30
