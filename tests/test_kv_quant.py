"""The quantized KV cache (`kv_bits` 4 or 8): sizes, accuracy, batching, chunked prefill, the
prefix cache, a follower mirroring the head's journal, and the wiring from cluster.toml.

Tiny random llamas here have head_dim 64 (hidden 256, 4 heads), SmolLM2's: the quantization
group is then 64, as placement assumes. Accuracy bounds: 8-bit keys and values carry ~0.7%
relative error per element (measured on SmolLM2's layers), which leaves greedy tokens unchanged
on these models; 4-bit carries ~12%, so its logits are only checked to stay close (cosine), and
its implementation is checked exactly against quantize-then-dequantize of the true keys.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from agent.cluster.memory_model import _KV_QUANT_GROUP, kv_bytes_per_token_per_layer
from agent.cluster.state import ModelShape, NodeProfile, Placement, Stage
from agent.cluster.wiring import runner_configs
from agent.generation import (
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
)
from agent.runtime.compute import LocalCompute
from agent.runtime.follower import Follower
from agent.runtime.kv import KV_QUANT_GROUP, KvGeometry, KvSlots
from agent.runtime.model import Decoder, load_decoder
from agent.runtime.prefix import PrefixCache
from agent.runtime.protocol import RunnerConfig
from agent.runtime.scheduler import Scheduler, SchedulerLimits
from agent.runtime.step import make_decode_fn, prefill
from tests.scheduler_tools import finished as final
from tests.scheduler_tools import run_all, tokens_of
from tests.tiny_models import make_tiny_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden=256, heads=4,
                           kv_heads=2, layers=2)


def geometry(dec: Decoder, bits: int | None) -> KvGeometry:
    return KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim, bits=bits)


def cosine(a: mx.array, b: mx.array) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float((a * b).sum() / (mx.linalg.norm(a) * mx.linalg.norm(b)))


def greedy(dec: Decoder, bits: int | None, prompt: list[int], n: int, *,
           chunk: int | None = None) -> tuple[list[int], list[mx.array]]:
    """Greedy tokens and the logits of every step, one sequence, compiled decode."""
    g = geometry(dec, bits)
    kv = KvSlots(g, chunk=32)
    row = kv.acquire("x", len(prompt) + n + 1)
    kv.ensure_capacity(len(prompt) + n + 1)
    step = chunk or len(prompt)
    for start in range(0, len(prompt), step):
        logits = prefill(dec, mx.array(prompt[start:start + step]), start, row, kv.keys,
                         kv.values, quant=g.quant)
        mx.eval(logits, kv.keys, kv.values)
    decode = make_decode_fn(dec, compiled=True, quant=g.quant)
    token = int(mx.argmax(logits[0]).item())
    tokens, all_logits = [token], [logits[0]]
    for position in range(len(prompt), len(prompt) + n - 1):
        out = decode(mx.array([token]), mx.array([position]), *kv.keys, *kv.values)
        arrays = len(kv.keys)
        kv.keys, kv.values = list(out[1:1 + arrays]), list(out[1 + arrays:])
        token = int(mx.argmax(out[0][0]).item())
        tokens.append(token)
        all_logits.append(out[0][0])
    return tokens, all_logits


PROMPT = [3 + (i * 37 + (i * i) % 11) % 256 for i in range(70)]


# ---- sizes -----------------------------------------------------------------------------------


def test_bytes_per_token_is_the_quantized_size_and_matches_placement() -> None:
    smollm2 = ModelShape(
        name="smollm2-135m", num_layers=30, num_heads=9, num_kv_heads=3, hidden_size=576,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
        layer_bytes=14_160_384, embedding_bytes=113_246_208, kv_bytes_per_token_per_layer=1536,
        context_length=8192)
    full = KvGeometry(30, 3, 64).bytes_per_token
    assert full == 30 * 1536
    eight, four = KvGeometry(30, 3, 64, bits=8), KvGeometry(30, 3, 64, bits=4)
    # Per head and token: 64 codes of 8 (4) bits plus a float32 scale and bias per 64.
    assert eight.bytes_per_token == 2 * 30 * 3 * (64 + 8)
    assert four.bytes_per_token == 2 * 30 * 3 * (32 + 8)
    assert full / eight.bytes_per_token == pytest.approx(3.56, abs=0.01)
    assert full / four.bytes_per_token == pytest.approx(6.4)
    assert KV_QUANT_GROUP == _KV_QUANT_GROUP == eight.quant.group  # type: ignore[union-attr]
    for g in (eight, four):
        assert g.bytes_per_token == 30 * kv_bytes_per_token_per_layer(smollm2, g.bits)
    # What the slots allocate is what bytes_per_token says.
    kv = KvSlots(eight, chunk=32)
    kv.acquire("a", 40)
    kv.acquire("b", 40)
    arrays = sum(a.nbytes for a in kv.keys + kv.values)
    assert arrays == kv.allocated_bytes == 2 * 64 * eight.bytes_per_token
    assert len(kv.keys) == 3 * 30 and kv.keys[0].dtype == mx.uint32


def test_unsupported_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="4 or 8"):
        KvGeometry(2, 2, 64, bits=3)
    with pytest.raises(ValueError, match="multiple of 32"):
        KvGeometry(2, 2, 16, bits=8)
    assert KvGeometry(2, 2, 96, bits=4).quant.group == 32  # type: ignore[union-attr]


# ---- accuracy --------------------------------------------------------------------------------


def test_the_stored_keys_are_the_quantized_true_keys(tiny_dir: Path) -> None:
    """Layer 0 sees exact inputs, so what the cache holds for it is exactly quantize(keys)."""
    dec = load_decoder(tiny_dir)
    plain, quantized = KvSlots(geometry(dec, None)), KvSlots(geometry(dec, 4))
    for kv in (plain, quantized):
        row = kv.acquire("x", len(PROMPT) + 1)
        mx.eval(prefill(dec, mx.array(PROMPT), 0, row, kv.keys, kv.values,
                        quant=kv.geometry.quant))
    n = len(PROMPT)
    for true, parts in ((plain.keys[0], quantized.keys[:3]),
                        (plain.values[0], quantized.values[:3])):
        want = mx.quantize(true[:, :, :n], group_size=64, bits=4)
        for a, b in zip(parts, want, strict=True):
            assert mx.array_equal(a[:, :, :n], b).item()


def test_eight_bit_generates_what_float32_generates(tiny_dir: Path) -> None:
    dec = load_decoder(tiny_dir)
    tokens, logits = greedy(dec, None, PROMPT, 24)
    tokens8, logits8 = greedy(dec, 8, PROMPT, 24)
    assert tokens8 == tokens
    assert min(cosine(a, b) for a, b in zip(logits, logits8, strict=True)) > 0.999


def test_four_bit_logits_stay_close(tiny_dir: Path) -> None:
    dec = load_decoder(tiny_dir)
    _, logits = greedy(dec, None, PROMPT, 12)
    tokens4, logits4 = greedy(dec, 4, PROMPT, 12)
    assert len(tokens4) == 12
    assert cosine(logits[0], logits4[0]) > 0.98  # the prompt's logits
    assert min(cosine(a, b) for a, b in zip(logits, logits4, strict=True)) > 0.95


@pytest.mark.parametrize("bits", [8, 4])
def test_chunked_prefill_equals_one_pass_when_quantized(tiny_dir: Path, bits: int) -> None:
    """Attention reads the stored form, so chunking changes nothing."""
    dec = load_decoder(tiny_dir)
    tokens, logits = greedy(dec, bits, PROMPT, 6)
    for chunk in (7, 32):
        chunked_tokens, chunked = greedy(dec, bits, PROMPT, 6, chunk=chunk)
        assert chunked_tokens == tokens
        for a, b in zip(logits, chunked, strict=True):
            assert mx.allclose(a, b, atol=ATOL).item(), chunk


def test_smollm2_eight_bit_matches_float32(smollm2_dir: Path) -> None:
    dec = load_decoder(smollm2_dir)
    prompt = load_tokenizer(smollm2_dir).encode(
        "The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg ")
    tokens, logits = greedy(dec, None, prompt, 12)
    tokens8, logits8 = greedy(dec, 8, prompt, 12)
    assert tokens8 == tokens
    assert min(cosine(a, b) for a, b in zip(logits, logits8, strict=True)) > 0.995


# ---- the scheduler: batching, the prefix cache, a mirroring follower -------------------------


def make_scheduler(model_dir: Path, bits: int | None, *, prefix: PrefixCache | None = None,
                   compute: type[LocalCompute] = LocalCompute, **limits: int
                   ) -> tuple[Scheduler, list[GenerationEvent]]:
    events: list[GenerationEvent] = []
    dec = load_decoder(model_dir)
    journal: list[tuple] | None = [] if compute is not LocalCompute else None
    kv = KvSlots(geometry(dec, bits), chunk=32, journal=journal)
    defaults = {"context_length": 512, "kv_budget_bytes": 1 << 30}
    sched = Scheduler(dec, load_tokenizer(model_dir), kv, SchedulerLimits(**(defaults | limits)),
                      events.append, prefix_cache=prefix, compute=compute(dec, kv, compiled=True))
    if prefix is not None:
        prefix.journal = journal
    return sched, events


def request(rid: str, prompt: list[int], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(id=rid, model="tiny", prompt_tokens=prompt,
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))








@pytest.mark.parametrize("bits", [8, 4])
def test_rows_at_different_positions_generate_what_each_generates_alone(tiny_dir: Path,
                                                                        bits: int) -> None:
    """Quantization is per token and head, so a row's results do not depend on its batch."""
    prompts = {"a": PROMPT[:9], "b": PROMPT, "c": PROMPT[20:45]}
    alone = {}
    for rid, prompt in prompts.items():
        sched, events = make_scheduler(tiny_dir, bits)
        sched.submit(request(rid, prompt, 12))
        run_all(sched)
        alone[rid] = tokens_of(events, rid)
    sched, events = make_scheduler(tiny_dir, bits, prefill_chunk=16)
    sched.submit(request("a", prompts["a"], 12))
    sched.step()
    sched.step()
    sched.submit(request("b", prompts["b"], 12))  # joins while "a" decodes, prefills in chunks
    sched.step()
    sched.submit(request("c", prompts["c"], 12))
    most = 0
    for _ in range(200):
        if sched.idle:
            break
        sched.step()
        positions = {s.length for s in sched.running.values()}
        most = max(most, len(positions))
    assert most >= 2  # rows really were at different positions in one step
    for rid in prompts:
        assert tokens_of(events, rid) == alone[rid], rid


def test_snapshot_kv_figures_are_exact_when_quantized(tiny_dir: Path) -> None:
    dec = load_decoder(tiny_dir)
    per_token = geometry(dec, 8).bytes_per_token
    budget = per_token * 300
    prefix = PrefixCache(per_token * 200, min_tokens=4)
    sched, _ = make_scheduler(tiny_dir, 8, prefix=prefix, kv_budget_bytes=budget)
    sched.submit(request("a", PROMPT, 30))
    sched.submit(request("b", PROMPT[:20], 60))
    sched.submit(request("c", PROMPT[5:50], 40))
    for _ in range(300):
        if sched.idle:
            break
        sched.step()
        snap = sched.snapshot()
        arrays = sum(a.nbytes for a in sched.kv.keys + sched.kv.values)
        assert snap["kv_allocated_bytes"] == arrays == sched.kv.allocated_bytes <= budget
        assert snap["kv_capacity_bytes"] == budget
        assert snap["kv_used_bytes"] == sum(s.length for s in sched.running.values()) * per_token
        cached = sum(len(e.tokens) for e in prefix.entries.values())
        assert snap["prefix_cache_bytes"] == cached * per_token
    assert sched.idle


@pytest.mark.parametrize("bits", [8, 4])
def test_a_second_turn_from_the_prefix_cache_generates_what_a_cold_one_does(tiny_dir: Path,
                                                                           bits: int) -> None:
    turn1 = PROMPT[:50]
    sched, events = make_scheduler(tiny_dir, bits, prefix=PrefixCache(1 << 26))
    sched.submit(request("t1", turn1, 8))
    run_all(sched)
    reply = tokens_of(events, "t1")
    turn2 = turn1 + reply + [70, 71, 72, 73]
    sched.submit(request("t2", turn2, 8))
    run_all(sched)
    assert final(events, "t2").usage.cached_tokens == len(turn1) + len(reply) - 1
    cold, cold_events = make_scheduler(tiny_dir, bits)
    cold.submit(request("t2", turn2, 8))
    run_all(cold)
    assert tokens_of(events, "t2") == tokens_of(cold_events, "t2")


class MirroredCompute(LocalCompute):
    """Runs the step here and on a Follower holding the same layers, fed the head's journal the
    way a tensor peer is, so the follower's quantized cache can be compared with the head's."""

    def __init__(self, decoder: Decoder, kv: KvSlots, *, compiled: bool) -> None:
        super().__init__(decoder, kv, compiled=compiled)
        assert kv.journal is not None
        self.journal = kv.journal
        self.mirror = Follower(decoder, KvSlots(kv.geometry, chunk=kv.chunk), compiled=compiled,
                               embeds=True)

    def _follow(self, op: str, row: int, start: int, positions: list[int],
                tokens: list[int]) -> None:
        self.mirror.apply(list(self.journal))
        self.journal.clear()
        self.mirror.step(op, row, start, positions, mx.array(tokens))

    def prefill(self, row: int, start: int, tokens: list[int]) -> mx.array:
        self._follow("prefill", row, start, [], tokens)
        return super().prefill(row, start, tokens)

    def decode(self, tokens: list[int], positions: list[int]) -> mx.array:
        self._follow("decode", 0, 0, positions, tokens)
        return super().decode(tokens, positions)

    def verify(self, tokens: list[list[int]], starts: list[int]) -> mx.array:
        # A speculative verification step: a peer gets the width in `start`, tokens flat.
        self._follow("verify", 0, len(tokens[0]), starts, [t for row in tokens for t in row])
        return super().verify(tokens, starts)


def test_a_follower_replaying_the_journal_mirrors_the_quantized_cache(tiny_dir: Path) -> None:
    sched, events = make_scheduler(tiny_dir, 8, prefix=PrefixCache(1 << 26, min_tokens=4),
                                   compute=MirroredCompute, prefill_chunk=16)
    compute = sched.compute
    assert isinstance(compute, MirroredCompute)
    mirror = compute.mirror.kv

    def same() -> None:
        # Layout changes after the last step (compaction) reach the follower with the next one.
        compute.mirror.apply(list(compute.journal))
        compute.journal.clear()
        mx.eval(mirror.keys, mirror.values)
        assert (mirror.rows, mirror.capacity) == (sched.kv.rows, sched.kv.capacity)
        for a, b in zip(sched.kv.keys + sched.kv.values, mirror.keys + mirror.values,
                        strict=True):
            assert a.dtype == b.dtype and mx.allclose(a, b, atol=ATOL).item()

    sched.submit(request("a", PROMPT[:30], 10))
    sched.submit(request("b", PROMPT, 20))
    steps = 0
    while not sched.idle:
        sched.step()
        steps += 1
        if steps % 5 == 0:
            same()
    # A turn that starts from "a"'s cached prefix: the follower loads its own saved copy.
    sched.submit(request("a2", PROMPT[:30] + tokens_of(events, "a") + [9, 9], 5))
    sched.step()
    same()
    run_all(sched)
    assert final(events, "a2").usage.cached_tokens > 30
    assert compute.mirror.saved  # the follower kept its copies of the prefix entries


# ---- the setting reaches the runner ------------------------------------------------------------


def test_runner_load_builds_a_quantized_cache(tiny_dir: Path) -> None:
    from agent.runtime.runner import load

    config = RunnerConfig(model_name="tiny", model_dir=str(tiny_dir), kv_bits=8,
                          kv_budget_bytes=1 << 24)
    (dec, _, kv, limits, _), ready = load(config)
    assert kv.geometry.bits == 8 and kv.limit_bytes == limits.kv_budget_bytes == 1 << 24
    assert ready.kv_bytes_per_token == geometry(dec, 8).bytes_per_token
    assert ready.kv_bytes_per_token < geometry(dec, None).bytes_per_token / 3


def test_cluster_toml_kv_bits_reaches_every_ranks_runner_config(tmp_path: Path) -> None:
    from agent.cluster.controller import ClusterController
    from agent.models.store import ModelStore
    from agent.serving.pool import RunnerPool
    from agent.serving.router import Router
    from agent.settings import NodeSettings

    settings = NodeSettings(state_dir=tmp_path / "state", models_dir=tmp_path / "models",
                            discovery_enabled=False)
    pool = RunnerPool(settings)
    controller = ClusterController(settings, store=ModelStore(tmp_path / "models"), pool=pool,
                                   router=Router(pool, wait_s=1.0))
    errors = controller.propose_spec(
        '[[models]]\nmodel = "smollm2-135m"\nstrategy = "tensor"\nkv_bits = 8\n\n'
        '[[models]]\nmodel = "other"\n')
    assert errors == []
    base = controller.base_config("smollm2-135m")
    assert base.kv_bits == 8
    assert controller.base_config("other").kv_bits is None
    profiles = {f"n{i}": NodeProfile(node_id=f"n{i}", name=f"node{i}", version="0.1.0",
                                     addresses=[f"10.0.0.{i}"], api_port=52415,
                                     memory_total_bytes=1 << 34,
                                     memory_available_bytes=1 << 33, data_port=52500)
                for i in range(3)}
    for stages, strategy in (([Stage(layer_start=0, layer_stop=30, nodes=["n0", "n1", "n2"])],
                              "tensor"),
                             ([Stage(layer_start=0, layer_stop=15, nodes=["n0"]),
                               Stage(layer_start=15, layer_stop=30, nodes=["n1"])], "pipeline")):
        placement = Placement(instance_id="m-0", model="smollm2-135m",
                              strategy=strategy, stages=stages)  # type: ignore[arg-type]
        configs = runner_configs(placement, 0, profiles, base)
        assert len(configs) == sum(len(s.nodes) for s in stages)
        assert {c.kv_bits for c in configs.values()} == {8}


def test_a_three_stage_pipeline_with_kv_bits_generates_what_one_process_does(
    tmp_path: Path,
) -> None:
    """Real runner processes: the head and its followers each hold a quantized cache for their
    layers, mirrored through the journal (prefix cache included)."""
    import asyncio

    from tests.test_pipeline import pipeline_configs, run_prompts, start_all

    model_dir = make_tiny_model(tmp_path / "m", hidden=256, heads=4, kv_heads=2, layers=3)

    async def main() -> None:
        solo = (await start_all([RunnerConfig(model_name="tiny", model_dir=str(model_dir),
                                              kv_bits=8)], tmp_path))[0]
        try:
            expected = await run_prompts(solo)
        finally:
            await solo.stop()
        configs = pipeline_configs(model_dir, [(0, 1), (1, 2), (2, 3)], kv_bits=8)
        runners = await start_all(configs, tmp_path)
        try:
            got = await run_prompts(runners[0])
        finally:
            for r in runners:
                await r.stop()
        assert got == expected
        assert got["b2_cached"][0] > 50

    asyncio.run(main())
