"""Micro-batches in flight (runtime/ring.py), in one process: a compute that claims several
stages but runs each submitted step at once drives the ring's whole bookkeeping (splitting rows
into micro-batches, harmless writes, joins, leaves, compaction, sliced prompts) against the
synchronous scheduler, fast. The real pipelines are in test_microbatch_pipeline.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from agent.generation import GenerationEvent, GenerationRequest, SamplingParams
from agent.runtime.compute import LocalCompute
from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.model import load_decoder
from agent.runtime.prefix import PrefixCache
from agent.runtime.ring import lone_prompt_slices, split_rows
from agent.runtime.scheduler import Scheduler, SchedulerLimits
from tests.scheduler_tools import finished, run_all, tokens_of
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # head_dim 64: a quantized KV cache needs a multiple of 32.
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden=256, heads=4,
                           kv_heads=2, layers=3)


def make_scheduler(model_dir: Path, stages: int, *, bits: int | None = None, prefix: bool = False,
                   **limits: int) -> tuple[Scheduler, list[GenerationEvent]]:
    events: list[GenerationEvent] = []
    dec = load_decoder(model_dir)
    geometry = KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim, bits=bits)
    kv = KvSlots(geometry, chunk=32)
    compute = LocalCompute(dec, kv, compiled=True)
    compute.stages = stages  # type: ignore[misc]  # a ring of `stages`, each step done at once
    defaults = {"context_length": 512, "kv_budget_bytes": 1 << 30, "max_batch": 16}
    cache = PrefixCache(1 << 26, min_tokens=4) if prefix else None
    sched = Scheduler(dec, load_tokenizer(model_dir), kv, SchedulerLimits(**(defaults | limits)),
                      events.append, compute=compute, prefix_cache=cache)
    assert (sched.ring is not None) == (stages > 1)
    return sched, events


def request(rid: str, prompt: list[int], n: int, stop: list[str] | None = None
            ) -> GenerationRequest:
    return GenerationRequest(id=rid, model="tiny", prompt_tokens=prompt,
                             sampling=SamplingParams(max_tokens=n, temperature=0.0,
                                                     stop=stop or []))


PROMPTS = {f"s{i}": [(7 * i + j) % 180 + 3 for j in range(3 + 5 * i)] for i in range(8)}


def streams(sched: Scheduler, events: list[GenerationEvent], n: int = 12) -> dict[str, list[int]]:
    for rid, prompt in PROMPTS.items():
        sched.submit(request(rid, prompt, n + len(rid) % 3))
    run_all(sched)
    return {rid: tokens_of(events, rid) for rid in PROMPTS}


def test_pure_splits() -> None:
    assert split_rows([5, 1, 3, 0], 8, 2) == [0, 1, 3, 5]
    assert split_rows([9, 8, 10], 16, 2) == [8, 9, 10]
    assert split_rows([2, 0, 1], 3, 3) == [0]
    assert lone_prompt_slices(2000, 0, 2, 0.0, 2048) == [256] * 7 + [208]
    assert lone_prompt_slices(100, 0, 2, 0.0, 2048) == [100]
    assert max(lone_prompt_slices(100_000, 0, 2, 0.0, 2048)) == 2048


@pytest.mark.parametrize("stages", [2, 3])
def test_eight_streams_in_micro_batches_match_the_synchronous_round(tiny_dir: Path,
                                                                   stages: int) -> None:
    expected = streams(*make_scheduler(tiny_dir, 1))
    sched, events = make_scheduler(tiny_dir, stages)
    assert streams(sched, events) == expected
    assert sched.ring is not None and sched.ring.overlapped_steps_total > 0
    assert sched.ring.in_flight_max == stages


def test_joins_leaves_stops_and_a_long_prompt_mid_flight(tiny_dir: Path) -> None:
    long_prompt = [(11 * j) % 190 + 3 for j in range(300)]

    def scenario(stages: int) -> tuple[dict[str, list[int]], dict[str, str]]:
        sched, events = make_scheduler(tiny_dir, stages, prefix=True, prefill_chunk=64)
        for rid in ("s0", "s1", "s2", "s3"):
            sched.submit(request(rid, PROMPTS[rid], 20))
        for _ in range(6):
            sched.step()
        sched.submit(request("long", long_prompt, 10))
        sched.cancel("s1")
        for rid in ("s4", "s5"):
            sched.submit(request(rid, PROMPTS[rid], 4))  # join and leave while others run
        for _ in range(4):
            sched.step()
        sched.submit(request("stop", PROMPTS["s6"], 30, stop=[stop_text]))
        run_all(sched)
        ids = {rid: tokens_of(events, rid) for rid in ("s0", "s2", "s3", "s4", "s5", "long",
                                                       "stop")}
        reasons = {rid: finished(events, rid).reason for rid in ids}
        return ids, reasons

    sched, events = make_scheduler(tiny_dir, 1)
    sched.submit(request("probe", PROMPTS["s6"], 8))
    run_all(sched)
    stop_text = sched.tokenizer.decode(tokens_of(events, "probe")[3:5])
    assert stop_text.strip()
    single = scenario(1)
    assert single[1]["stop"] == "stop"
    assert scenario(3) == single


def test_a_lone_long_prompt_goes_round_in_slices(tiny_dir: Path) -> None:
    long_prompt = [(13 * j) % 190 + 3 for j in range(600)]
    alone, events = make_scheduler(tiny_dir, 1, context_length=1024)
    alone.submit(request("long", long_prompt, 6))
    run_all(alone)
    sched, ring_events = make_scheduler(tiny_dir, 2, context_length=1024)
    sched.submit(request("long", long_prompt, 6))
    run_all(sched)
    assert len(tokens_of(events, "long")) == 6
    assert tokens_of(ring_events, "long") == tokens_of(events, "long")
    assert sched.ring is not None and sched.ring.in_flight_max == 2


def test_kv_bits_8_in_micro_batches(tiny_dir: Path) -> None:
    expected = streams(*make_scheduler(tiny_dir, 1, bits=8))
    assert streams(*make_scheduler(tiny_dir, 2, bits=8)) == expected


@pytest.mark.parametrize("bits", [None, 8])
def test_a_micro_batch_step_gives_the_whole_batch_steps_logits(tiny_dir: Path,
                                                              bits: int | None) -> None:
    """Two row ranges stepped apart give, row for row, the logits of one step over every row
    (the ring's micro-batches and the synchronous round compute the same sums)."""
    import mlx.core as mx

    from agent.runtime.rowstep import RowsDecode
    from agent.runtime.step import make_decode_fn

    dec = load_decoder(tiny_dir)

    def cache() -> KvSlots:
        kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim,
                                bits=bits), chunk=32)
        for row in range(8):
            kv.acquire(f"r{row}", 40)
        kv.ensure_capacity(40)
        return kv

    whole_kv, rows_kv = cache(), cache()
    whole = make_decode_fn(dec, compiled=True, quant=whole_kv.geometry.quant)
    rows = RowsDecode(dec, compiled=True, quant=rows_kv.geometry.quant)
    for step in range(4):
        tokens = [(3 * r + step) % 100 + 3 for r in range(8)]
        positions = [step + r for r in range(8)]
        full = whole_kv.step_in_place(whole, mx.array(tokens), mx.array(positions))
        parts = [rows_kv.step_in_place(rows(first), mx.array(tokens[first:first + 4]),
                                       mx.array(positions[first:first + 4]))
                 for first in (0, 4)]
        assert mx.array_equal(full, mx.concatenate(parts)).item(), f"step {step}"
