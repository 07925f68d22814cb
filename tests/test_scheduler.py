"""The continuous-batching scheduler on a tiny real model: admission, batching, cancellation."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from agent.generation import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.model import load_decoder
from agent.runtime.prefix import PrefixCache
from agent.runtime.scheduler import Scheduler, SchedulerLimits
from tests.scheduler_tools import ending as final
from tests.scheduler_tools import run_all, tokens_of
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def make_scheduler(model_dir: Path, *, prefix: PrefixCache | None = None,
                   prompt_lookup: bool = True, **limits: int
                   ) -> tuple[Scheduler, list[GenerationEvent]]:
    events: list[GenerationEvent] = []
    dec = load_decoder(model_dir)
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim), chunk=32)
    defaults = {"context_length": 512, "kv_budget_bytes": 1 << 30}
    sched = Scheduler(dec, load_tokenizer(model_dir), kv, SchedulerLimits(**(defaults | limits)),
                      events.append, prefix_cache=prefix, prompt_lookup=prompt_lookup)
    return sched, events


def request(rid: str, prompt: list[int], max_tokens: int = 8, **sampling: object
            ) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    if sampling:
        params = SamplingParams(**({"max_tokens": max_tokens, "temperature": 0.0} | sampling))
    return GenerationRequest(id=rid, model="tiny", prompt_tokens=prompt, sampling=params)








def each_alone(model_dir: Path, prompts: dict[str, list[int]], max_tokens: int
               ) -> dict[str, list[int]]:
    """The greedy ids each prompt generates on a scheduler of its own."""
    alone = {}
    for rid, prompt in prompts.items():
        sched, events = make_scheduler(model_dir)
        sched.submit(request(rid, prompt, max_tokens))
        run_all(sched)
        alone[rid] = tokens_of(events, rid)
    return alone


def test_batched_requests_generate_what_each_generates_alone(tiny_dir: Path) -> None:
    prompts = {"a": [10, 20, 30], "b": list(range(40, 75)), "c": [200, 201]}
    alone = each_alone(tiny_dir, prompts, 12)
    sched, events = make_scheduler(tiny_dir)
    sched.submit(request("a", prompts["a"], 12))
    sched.step()
    sched.step()  # "a" is decoding when the others join
    sched.submit(request("b", prompts["b"], 12))
    sched.submit(request("c", prompts["c"], 12))
    run_all(sched)
    for rid in prompts:
        assert tokens_of(events, rid) == alone[rid]
        end = final(events, rid)
        assert isinstance(end, Finished) and end.reason == "length"
        assert end.usage.completion_tokens == 12 and end.usage.prompt_tokens == len(prompts[rid])
    assert sched.kv.rows == 1  # compacted once everyone left


def test_prompt_longer_than_context_fails_before_any_work(tiny_dir: Path) -> None:
    sched, events = make_scheduler(tiny_dir, context_length=16)
    sched.submit(request("long", list(range(3, 40))))
    end = final(events, "long")
    assert isinstance(end, Failed) and end.code == "bad_request"
    assert "37 tokens" in end.message and "16" in end.message
    assert sched.idle


def test_request_over_the_whole_kv_budget_is_rejected_as_never_fitting(tiny_dir: Path) -> None:
    sched, events = make_scheduler(tiny_dir, kv_budget_bytes=10_000)
    sched.submit(request("big", list(range(3, 100)), 100))
    end = final(events, "big")
    assert isinstance(end, Failed) and end.code == "bad_request" and "KV" in end.message


def test_full_queue_answers_overloaded(tiny_dir: Path) -> None:
    sched, events = make_scheduler(tiny_dir, max_batch=1, max_queue=1)
    for i in range(3):
        sched.submit(request(str(i), [5, 6, 7], 4))
    sched.step()  # "0" runs, "1" waits ...
    sched.submit(request("3", [5, 6], 4))  # ... so the queue is full
    overloaded = [e for e in events if isinstance(e, Failed) and e.code == "overloaded"]
    assert {e.id for e in overloaded} == {"2", "3"}
    run_all(sched)
    assert isinstance(final(events, "1"), Finished)


def test_cancel_frees_the_row_and_reports_cancelled(tiny_dir: Path) -> None:
    sched, events = make_scheduler(tiny_dir)
    sched.submit(request("x", [5, 6, 7], 100))
    sched.submit(request("y", [8, 9], 5))
    sched.step()
    sched.step()
    sched.cancel("x")
    run_all(sched)
    end = final(events, "x")
    assert isinstance(end, Finished) and end.reason == "cancelled"
    assert end.usage.completion_tokens < 100
    assert sched.kv.owners() == [None]


def test_stop_token_ids_end_generation(tiny_dir: Path) -> None:
    sched, events = make_scheduler(tiny_dir)
    sched.submit(request("free", [5, 6, 7], 6))
    run_all(sched)
    first = tokens_of(events, "free")[0]
    sched2, events2 = make_scheduler(tiny_dir)
    sched2.submit(request("stopped", [5, 6, 7], 6, stop_token_ids=(first,)))
    run_all(sched2)
    end = final(events2, "stopped")
    assert isinstance(end, Finished) and end.reason == "stop"
    assert end.usage.completion_tokens == 1 and tokens_of(events2, "stopped") == []


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_dir: Path) -> None:
    def sample(others: int) -> list[int]:
        sched, events = make_scheduler(tiny_dir)
        sched.submit(request("s", [5, 6, 7], 10, temperature=1.0, seed=1234, top_p=0.9))
        for i in range(others):
            sched.submit(request(f"o{i}", [9, 9, 9], 10, temperature=1.0))
        run_all(sched)
        return tokens_of(events, "s")

    assert sample(0) == sample(0) == sample(2)


def test_logprobs_report_the_chosen_token_and_alternatives(tiny_dir: Path) -> None:
    sched, events = make_scheduler(tiny_dir)
    sched.submit(request("lp", [5, 6, 7], 3, logprobs=True, top_logprobs=3))
    run_all(sched)
    chunks = [e for e in events if isinstance(e, TokenChunk) and e.logprobs]
    assert len(chunks) == 3
    for chunk in chunks:
        entry = chunk.logprobs[0]  # type: ignore[index]
        assert len(entry.top) == 3 and entry.logprob <= 0.0
        # greedy: the chosen token is the most likely one
        assert entry.top[0].token_id == entry.token_id
        assert abs(entry.top[0].logprob - entry.logprob) < 1e-5


def test_second_turn_reuses_the_first_turns_cache_and_generates_the_same(tiny_dir: Path) -> None:
    turn1 = list(range(10, 60))
    sched, events = make_scheduler(tiny_dir, prefix=PrefixCache(1 << 26))
    sched.submit(request("t1", turn1, 8))
    run_all(sched)
    reply = tokens_of(events, "t1")
    turn2 = turn1 + reply + [70, 71, 72, 73]
    sched.submit(request("t2", turn2, 8))
    run_all(sched)
    end = final(events, "t2")
    assert isinstance(end, Finished)
    # Every token of turn 1 whose KV was computed is reused (the last reply token never was).
    assert end.usage.cached_tokens == len(turn1) + len(reply) - 1
    cold, cold_events = make_scheduler(tiny_dir)
    cold.submit(request("t2", turn2, 8))
    run_all(cold)
    assert tokens_of(events, "t2") == tokens_of(cold_events, "t2")
    assert final(cold_events, "t2").usage.cached_tokens == 0  # type: ignore[union-attr]


def test_prefix_cache_evicts_to_stay_within_its_byte_bound(tiny_dir: Path) -> None:
    dec = load_decoder(tiny_dir)
    per_token = KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim).bytes_per_token
    bound = per_token * 100
    prefix = PrefixCache(bound)
    sched, events = make_scheduler(tiny_dir, prefix=prefix)
    for i in range(6):
        sched.submit(request(f"p{i}", [3 + i] * 40, 4))
        run_all(sched)
        assert prefix.bytes <= bound
    assert prefix.stats.evictions >= 3 and len(prefix.entries) <= 2
    # The newest conversation is still cached and still gives the same answer.
    sched.submit(request("again", [3 + 5] * 40 + tokens_of(events, "p5")[:3] + [9], 4))
    run_all(sched)
    assert final(events, "again").usage.cached_tokens > 0  # type: ignore[union-attr]


def test_token_ids_outside_the_vocabulary_are_a_bad_request(tiny_dir: Path) -> None:
    sched, events = make_scheduler(tiny_dir)
    vocab = sched.decoder.config.vocab_size
    sched.submit(request("oov", [5, vocab + 7, 6]))
    sched.submit(request("neg", [-1, 5]))
    for rid, bad in (("oov", vocab + 7), ("neg", -1)):
        end = final(events, rid)
        assert isinstance(end, Failed) and end.code == "bad_request"
        assert f"token id {bad}" in end.message
    assert sched.idle


def _lookahead_trace(model_dir: Path, *, lookahead: bool) -> tuple[list[GenerationEvent], int]:
    """A busy schedule: staggered arrivals, a cancel, a stop token, different lengths, rows
    freed and compacted, capacity grown past a chunk. Returns its events and lookahead steps.
    Prompt lookup is off: this random model repeats itself, so drafts would replace lookahead."""
    sched, events = make_scheduler(model_dir, prompt_lookup=False)
    if not lookahead:
        sched.compute.lazy_decode = False  # type: ignore[misc]
    sched.submit(request("a", [10, 20, 30], 70))
    for _ in range(5):
        sched.step()
    sched.submit(request("b", list(range(40, 75)), 20))
    sched.submit(request("c", [200, 201], 45))
    for _ in range(12):
        sched.step()
    sched.cancel("c")
    sched.submit(request("d", [7, 8, 9, 10], 30, stop_token_ids=[tokens_of(events, "a")[3]]))
    run_all(sched)
    return events, sched.stats.lookahead_steps_total


def test_lookahead_decoding_generates_exactly_what_step_by_step_decoding_does(
        tiny_dir: Path) -> None:
    plain, none_ahead = _lookahead_trace(tiny_dir, lookahead=False)
    ahead, steps_ahead = _lookahead_trace(tiny_dir, lookahead=True)
    assert none_ahead == 0
    assert steps_ahead > 40  # the long stretches really ran one step ahead
    for rid in "abcd":
        assert tokens_of(ahead, rid) == tokens_of(plain, rid), rid
        assert final(ahead, rid) == final(plain, rid), rid
    assert len(tokens_of(plain, "a")) == 70


def test_the_stream_carries_every_generated_token_id(tiny_dir: Path) -> None:
    """Tokens whose text is held back (a possible stop string, an incomplete character) still
    reach the stream, with the next chunk that has text or at the end."""
    prompts = {f"r{i}": [3 + i, 50 + 7 * i, 200 + i] for i in range(4)}
    sched, events = make_scheduler(tiny_dir)
    sched.eos_ids = set()
    for rid, prompt in prompts.items():
        sched.submit(request(rid, prompt, 40))
    run_all(sched)
    texts = {rid: "".join(e.text for e in events if isinstance(e, TokenChunk) and e.id == rid)
             for rid in prompts}
    # A stop string that starts like each reply's text but never completes: the matcher holds
    # those characters back until they cannot be a stop any more.
    sched, events = make_scheduler(tiny_dir)
    sched.eos_ids = set()
    for rid, prompt in prompts.items():
        sched.submit(request(rid, prompt, 40, stop=[texts[rid][5:8] + "\u2603"]))
    run_all(sched)
    held_back = 0
    for rid in prompts:
        end = final(events, rid)
        assert isinstance(end, Finished) and end.reason == "length"
        chunks = [e for e in events if isinstance(e, TokenChunk) and e.id == rid]
        assert "".join(c.text for c in chunks) == texts[rid]
        assert len([t for c in chunks for t in c.token_ids]) == end.usage.completion_tokens == 40
        held_back += sum(len(c.token_ids) > 1 for c in chunks)
    assert held_back > 0  # tokens really were held back


def test_short_prompts_arriving_together_start_in_one_round(tiny_dir: Path) -> None:
    prompts = {"a": [10, 20, 30], "long": list(range(40, 90)), "b": [200, 201],
               "c": [5, 6, 7, 8]}
    alone = each_alone(tiny_dir, prompts, 6)
    sched, events = make_scheduler(tiny_dir)
    for rid, prompt in prompts.items():
        sched.submit(request(rid, prompt, 6))
    sched.step()
    # The first prompt's chunk, then every later one that fits whole in what is left of the
    # round's slice (32 tokens before the prefill speed is measured): the long one waits its
    # turn untouched (no partial chunk), the short ones after it start now.
    started = {e.id for e in events if isinstance(e, TokenChunk)}
    assert started == {"a", "b", "c"}
    assert sched.running["long"].prefilled == 0
    run_all(sched)
    for rid in prompts:
        assert tokens_of(events, rid) == alone[rid]
