"""Drafted tokens on micro-batches' ordinary trips round a pipeline ring (runtime/ring.py), in
one process: a compute that claims several stages but runs each submitted step at once drives
the ring's verify micro-batches (drafts, acceptance on return, held lengths, harmless writes
of rows outside a micro-batch) against plain synchronous decoding, fast. The real pipelines are
in test_speculative_dist.py."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from agent.generation import GenerationEvent, GenerationRequest, SamplingParams, TokenChunk
from agent.runtime import ring
from agent.runtime.compute import LocalCompute
from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.model import load_decoder
from agent.runtime.prefix import PrefixCache
from agent.runtime.scheduler import Scheduler, SchedulerLimits
from agent.runtime.verify import RowsVerify, make_verify_fn
from tests.scheduler_tools import finished, run_all, tokens_of
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden=256, heads=4,
                           kv_heads=2, layers=3)


def make_scheduler(model_dir: Path, stages: int, *, lookup: bool, prefix: bool = False,
                   bits: int | None = None) -> tuple[Scheduler, list[GenerationEvent]]:
    events: list[GenerationEvent] = []
    dec = load_decoder(model_dir)
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim,
                            bits=bits), chunk=32)
    compute = LocalCompute(dec, kv, compiled=True)
    compute.stages = stages  # type: ignore[misc]  # a ring of `stages`, each step done at once
    limits = SchedulerLimits(context_length=512, kv_budget_bytes=1 << 30, max_batch=16)
    cache = PrefixCache(1 << 26, min_tokens=4) if prefix else None
    sched = Scheduler(dec, load_tokenizer(model_dir), kv, limits, events.append,
                      compute=compute, prefix_cache=cache, prompt_lookup=lookup)
    return sched, events


def request(rid: str, prompt: list[int], n: int, stop: list[str] | None = None
            ) -> GenerationRequest:
    return GenerationRequest(id=rid, model="tiny", prompt_tokens=prompt,
                             sampling=SamplingParams(max_tokens=n, temperature=0.0,
                                                     stop=stop or [],
                                                     logprobs=rid not in PLAIN_ARGMAX))


# Rows whose whole job is an argmax (no logprobs): acceptance's greedy path; the others report
# logprobs (acceptance's position-by-position path).
PLAIN_ARGMAX = ("copy", "loop2")


def logprobs_of(events: list[GenerationEvent], rid: str) -> list[float]:
    """The chosen tokens' logprobs: a random model's greedy ids repeat one token, so a wrong
    KV entry shows in these long before it changes an id."""
    return [lp.logprob for e in events if isinstance(e, TokenChunk) and e.id == rid
            for lp in e.logprobs or []]


def close(got: dict[str, list[float]], expected: dict[str, list[float]]) -> bool:
    return got.keys() == expected.keys() and all(
        len(got[k]) == len(v) and all(abs(a - b) < 1e-4 for a, b in zip(got[k], v, strict=True))
        for k, v in expected.items())


# Edit-style prompts repeat (a random model's output then repeats too, so lookup drafts and
# keeps); free ones do not.
PROMPTS = {"copy": [40, 41, 42, 43, 44] * 5, "loop": [7, 8, 9] * 6,
           "free": [100, 3, 77], "copy2": [60, 61, 62, 63] * 6, "free2": [5, 150, 33, 90],
           "loop2": [11, 12] * 8}


def run(model_dir: Path, stages: int, lookup: bool, *, n: int = 20, cancel: bool = False,
        bits: int | None = None
        ) -> tuple[dict[str, list[int]], dict[str, str], Scheduler, dict[str, list[float]]]:
    sched, events = make_scheduler(model_dir, stages, lookup=lookup, prefix=True, bits=bits)
    for rid, prompt in PROMPTS.items():
        # Different max tokens: some end inside an accepted draft.
        sched.submit(request(rid, prompt, n + len(rid) % 4))
    if cancel:  # a cancel while micro-batches (verify ones among them) are in flight
        for _ in range(5):
            sched.step()
        sched.cancel("copy2")
        sched.submit(request("late", PROMPTS["copy"][3:] + [7, 8, 9] * 3, n))
    run_all(sched)
    ids = {rid: tokens_of(events, rid) for rid in [*PROMPTS, *(["late"] if cancel else [])]}
    reasons = {rid: finished(events, rid).reason for rid in ids}
    return ids, reasons, sched, {rid: logprobs_of(events, rid) for rid in ids}


@pytest.mark.parametrize(("stages", "bits"), [(2, None), (3, None), (2, 8)])
def test_verify_micro_batches_match_plain_synchronous_decoding(tiny_dir: Path, stages: int,
                                                               bits: int | None) -> None:
    expected, reasons, _, lps = run(tiny_dir, 1, lookup=False, bits=bits)
    got, got_reasons, sched, got_lps = run(tiny_dir, stages, lookup=True, bits=bits)
    assert got == expected and got_reasons == reasons and close(got_lps, lps)
    assert sched.ring is not None and sched.ring.verify_microbatches_total > 0
    assert sched.ring.overlapped_steps_total > 0
    stats = sched.speculator.stats
    assert stats.accepted_tokens > 0 and stats.verify_steps > 0


def test_rows_inside_a_range_whose_verify_step_is_in_flight_keep_their_drafts(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interleaved micro-batches (every other ready row): a later micro-batch's range spans a
    row whose verify step is still in flight, and its harmless write for that row must land
    past every position the verify step may keep."""
    expected, reasons, _, lps = run(tiny_dir, 1, lookup=False)

    def every_other(ready: list[int], total: int, stages: int) -> list[int]:
        return [r for r in sorted(ready) if r % 2 == min(ready) % 2]

    monkeypatch.setattr(ring, "split_rows", every_other)
    got, got_reasons, sched, got_lps = run(tiny_dir, 2, lookup=True)
    assert got == expected and got_reasons == reasons and close(got_lps, lps)
    assert sched.ring is not None and sched.ring.verify_microbatches_total > 0


def test_a_cancel_with_a_verify_micro_batch_in_flight(tiny_dir: Path) -> None:
    expected, _, _, lps = run(tiny_dir, 1, lookup=False, cancel=True)
    got, _, sched, got_lps = run(tiny_dir, 3, lookup=True, cancel=True)
    assert got["late"] == expected["late"]
    del lps["copy2"], got_lps["copy2"]
    assert close(got_lps, lps)
    assert {k: v for k, v in got.items() if k != "copy2"} == \
        {k: v for k, v in expected.items() if k != "copy2"}
    assert sched.ring is not None and sched.ring.verify_microbatches_total > 0


def test_a_lone_stream_verifies_in_the_ring_as_stop_and_wait_does(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = {"copy": PROMPTS["copy"]}
    sched, events = make_scheduler(tiny_dir, 3, lookup=True)
    sched.submit(request("copy", prompts["copy"], 24))
    run_all(sched)
    monkeypatch.setattr(ring, "SOLO_VERIFY", False)
    alone, alone_events = make_scheduler(tiny_dir, 3, lookup=True)
    alone.submit(request("copy", prompts["copy"], 24))
    run_all(alone)
    assert tokens_of(alone_events, "copy") == tokens_of(events, "copy")
    assert alone.ring is not None and alone.ring.verify_microbatches_total > 0
    assert sched.ring is not None and sched.ring.verify_microbatches_total == 0


def test_a_row_range_verify_step_is_the_whole_batch_step_on_those_rows(tiny_dir: Path) -> None:
    dec = load_decoder(tiny_dir)
    rows, capacity = 4, 32
    shape = (rows, dec.local_kv_heads, capacity, dec.config.head_dim)
    keys = [mx.random.normal(shape, key=mx.random.key(i)) for i in range(len(dec.layers))]
    values = [mx.random.normal(shape, key=mx.random.key(10 + i)) for i in range(len(dec.layers))]
    tokens = mx.array([[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16]])
    starts = mx.array([4, 9, 2, 7])
    whole = make_verify_fn(dec, compiled=False)(tokens, starts, *keys, *values)
    part = RowsVerify(dec, compiled=False)(1)(tokens[1:3], starts[1:3], *keys, *values)
    assert mx.allclose(part[0], whole[0][1:3], atol=1e-5)
    layers = len(dec.layers)
    for new, full, old in zip(part[1:], whole[1:], [*keys, *values], strict=True):
        assert mx.allclose(new[1:3], full[1:3], atol=1e-5)
        assert mx.array_equal(new[0], old[0]) and mx.array_equal(new[3], old[3])
    assert len(part) == 1 + 2 * layers
