"""Long prompts at the scheduler level, on tiny random models: chunked prefill interleaves with the
decode steps of running streams and computes what one pass computes, and the KV figures the
scheduler reports (`Scheduler.snapshot()`, which the runner turns into the KV metrics) are exact.

Random tiny models give near-tied logits, so equality of chunked and one-pass prefill is checked
on logits and KV (to float32 tolerance) as well as on greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from agent.generation import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
)
from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.model import load_decoder
from agent.runtime.prefix import PrefixCache
from agent.runtime.scheduler import (
    FIRST_PREFILL_SLICE,
    MIN_PREFILL_SLICE,
    Scheduler,
    SchedulerLimits,
    prefill_slice,
)
from agent.runtime.step import prefill
from tests.scheduler_tools import finished as final
from tests.scheduler_tools import run_all, tokens_of
from tests.tiny_models import make_tiny_model

CONTEXT = 512  # the tiny models' max_position_embeddings
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", layers=3)


def make_scheduler(model_dir: Path, *, prefix: PrefixCache | None = None, kv_chunk: int = 32,
                   **limits: float) -> tuple[Scheduler, list[GenerationEvent]]:
    """Fixed-size prefill slices unless a test asks for time-sized ones (prefill_gap_steps)."""
    events: list[GenerationEvent] = []
    dec = load_decoder(model_dir)
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim),
                 chunk=kv_chunk)
    defaults = {"context_length": CONTEXT, "kv_budget_bytes": 1 << 30, "prefill_gap_steps": 0}
    # Prompt lookup off: these tests trace prefill slices between plain decode steps (a random
    # model repeats itself, so drafts would turn decode steps into verify steps).
    sched = Scheduler(dec, load_tokenizer(model_dir), kv, SchedulerLimits(**(defaults | limits)),
                      events.append, prefix_cache=prefix, prompt_lookup=False)
    return sched, events


def request(rid: str, prompt: list[int], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(id=rid, model="tiny", prompt_tokens=prompt,
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))


def long_prompt(n: int, seed: int = 0) -> list[int]:
    """n byte-level token ids (3..258), varied so attention has something to do."""
    return [3 + (seed + i * 37 + (i * i) % 11) % 256 for i in range(n)]






class Recorder:
    """Wraps a scheduler's compute to log each prefill chunk (row, start, length) and decode step,
    and keeps the logits of every prefill chunk that finished a prompt."""

    def __init__(self, sched: Scheduler) -> None:
        self.log: list[tuple[str, int, int]] = []
        self.first_logits: list[mx.array] = []
        compute = sched.compute
        inner_prefill, inner_decode = compute.prefill, compute.decode

        def prefill_(row: int, start: int, tokens: list[int]) -> mx.array:
            self.log.append(("prefill", start, len(tokens)))
            logits = inner_prefill(row, start, tokens)
            self.first_logits.append(logits)
            return logits

        def decode_(tokens: list[int], positions: list[int]) -> mx.array:
            self.log.append(("decode", 0, 0))
            return inner_decode(tokens, positions)

        compute.prefill = prefill_  # type: ignore[method-assign]
        compute.decode = decode_  # type: ignore[method-assign]


def prefilling(sched: Scheduler, rid: str, limit: int = 1000) -> bool:
    """True while request `rid` waits for admission or is still prefilling (bounded)."""
    assert sched.stats.decode_steps_total < limit, "prefill did not finish"
    if any(r.id == rid for r in sched.waiting):
        return True
    seq = sched.running.get(rid)
    return seq is not None and seq.in_prefill




# ---- chunked prefill interleaves with decode ------------------------------------------------


def test_a_long_prompt_prefills_in_chunks_while_a_running_stream_keeps_decoding(
    tiny_dir: Path,
) -> None:
    chunk, prompt_len = 32, 300
    sched, events = make_scheduler(tiny_dir, prefill_chunk=chunk, solo_prefill_chunk=256)
    recorder = Recorder(sched)
    sched.submit(request("stream", [5, 6, 7, 8], 120))
    sched.step()  # the stream's prompt
    sched.step()  # ... and its first decode step: it is running
    stream = sched.running["stream"]
    sched.submit(request("long", long_prompt(prompt_len), 4))
    recorder.log.clear()
    generated_per_step = []
    while prefilling(sched, "long"):
        before = stream.generated
        sched.step()
        generated_per_step.append(stream.generated - before)
    prefills = [entry for entry in recorder.log if entry[0] == "prefill"]
    # The whole prompt went through in slices of `prefill_chunk`, in order, none skipped.
    assert [n for _, _, n in prefills] == [chunk] * (prompt_len // chunk) + [prompt_len % chunk]
    assert [start for _, start, _ in prefills] == list(range(0, prompt_len, chunk))
    # Exactly one decode step of the running stream between (and after) consecutive chunks, and
    # the stream got one token out of every one of those steps.
    kinds = [kind for kind, _, _ in recorder.log]
    assert kinds == ["prefill", "decode"] * len(prefills)
    assert generated_per_step == [1] * len(prefills)
    run_all(sched)
    assert final(events, "stream").usage.completion_tokens == 120
    assert final(events, "long").usage.completion_tokens == 4


def test_a_prompt_alone_prefills_in_solo_chunks(tiny_dir: Path) -> None:
    sched, _ = make_scheduler(tiny_dir, prefill_chunk=32, solo_prefill_chunk=128)
    recorder = Recorder(sched)
    sched.submit(request("alone", long_prompt(300), 2))
    run_all(sched)
    prefills = [n for kind, _, n in recorder.log if kind == "prefill"]
    assert prefills == [128, 128, 44]


def test_decode_steps_between_chunks_match_the_chunk_setting(tiny_dir: Path) -> None:
    """Smaller chunks mean more, shorter interruptions; the number of decode steps a running
    stream gets during one prefill is ceil(prompt / prefill_chunk)."""
    prompt_len = 200
    for chunk in (16, 50, 128):
        sched, _ = make_scheduler(tiny_dir, prefill_chunk=chunk, solo_prefill_chunk=512)
        recorder = Recorder(sched)
        sched.submit(request("stream", [9, 9, 9], 100))
        sched.step()
        sched.step()
        sched.submit(request("long", long_prompt(prompt_len, seed=chunk), 1))
        recorder.log.clear()
        stream = sched.running["stream"]
        before = stream.generated
        while prefilling(sched, "long"):
            sched.step()
        # Tokens the stream got, not decode calls: a greedy batch also queues its next step
        # ahead (lookahead decode), which is a call but not yet a step the stream got.
        assert stream.generated - before == -(-prompt_len // chunk)
        chunks = sum(1 for kind, _, _ in recorder.log if kind == "prefill")
        assert chunks == -(-prompt_len // chunk)


# ---- chunked prefill computes what one pass computes ----------------------------------------


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
def test_chunked_prefill_gives_the_logits_and_kv_of_one_pass(tmp_path: Path,
                                                             architecture: str) -> None:
    model_dir = make_tiny_model(tmp_path / architecture, architecture=architecture, layers=3)
    dec = load_decoder(model_dir)
    prompt = long_prompt(333, seed=3)

    def run(chunks: list[int]) -> tuple[mx.array, list[mx.array], list[mx.array]]:
        kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
        row = kv.acquire("x", len(prompt) + 1)
        start, logits = 0, None
        for n in chunks:
            logits = prefill(dec, mx.array(prompt[start:start + n]), start, row, kv.keys,
                             kv.values)
            mx.eval(logits, kv.keys, kv.values)
            start += n
        assert start == len(prompt) and logits is not None
        keys, values = kv.read_row(row, len(prompt))
        return logits, keys, values

    whole = run([len(prompt)])
    for chunks in ([32] * 10 + [13], [1, 100, 200, 32], [300, 33], [128, 128, 77]):
        logits, keys, values = run(chunks)
        assert mx.allclose(logits, whole[0], atol=ATOL).item(), chunks
        for a, b in zip(keys + values, whole[1] + whole[2], strict=True):
            assert mx.allclose(a, b, atol=ATOL).item(), chunks


def test_interleaved_chunked_prefill_generates_what_one_pass_alone_generates(
    tiny_dir: Path,
) -> None:
    """A prompt prefilled in small slices between another stream's decode steps (whose harmless
    writes land in the prefilling row's next slot) yields the first-token logits and the tokens
    of the same prompt prefilled in one pass with nothing else running."""
    prompt = long_prompt(290, seed=5)
    alone, alone_events = make_scheduler(tiny_dir, solo_prefill_chunk=CONTEXT)
    alone_rec = Recorder(alone)
    alone.submit(request("long", prompt, 16))
    run_all(alone)
    assert [n for kind, _, n in alone_rec.log if kind == "prefill"] == [len(prompt)]

    busy, busy_events = make_scheduler(tiny_dir, prefill_chunk=24, solo_prefill_chunk=CONTEXT)
    busy_rec = Recorder(busy)
    busy.submit(request("stream", [7, 8, 9], 200))
    busy.step()
    busy.step()
    busy.submit(request("long", prompt, 16))
    run_all(busy)
    chunks = [n for kind, _, n in busy_rec.log if kind == "prefill"][1:]  # after the stream's
    assert len(chunks) == -(-len(prompt) // 24)
    assert mx.allclose(busy_rec.first_logits[-1], alone_rec.first_logits[0], atol=ATOL).item()
    assert tokens_of(busy_events, "long") == tokens_of(alone_events, "long")
    assert final(busy_events, "long").usage.completion_tokens == 16


# ---- KV budget figures are exact --------------------------------------------------------------


def _bytes_per_token(model_dir: Path) -> int:
    """From the model's own config: keys and values, every layer and KV head, float32."""
    import json

    cfg = json.loads((model_dir / "config.json").read_text())
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4


def _tokens_in_cache(sched: Scheduler) -> int:
    """Counted from what each sequence has been through, not from its `length` field: a sequence
    in prefill has its prefilled tokens cached; one decoding has its prompt and every generated
    token but the last (sampled, not yet fed back)."""
    total = 0
    for seq in sched.running.values():
        if seq.in_prefill:
            total += seq.prefilled
        else:
            total += len(seq.prompt) + max(0, seq.generated - 1)
    return total


def _array_bytes(arrays: list[mx.array]) -> int:
    return sum(a.size * a.itemsize for a in arrays)


def test_snapshot_kv_figures_are_exact_at_every_step(tiny_dir: Path) -> None:
    per_token = _bytes_per_token(tiny_dir)
    budget = per_token * 2000
    prefix = PrefixCache(per_token * 400, min_tokens=4)
    sched, events = make_scheduler(tiny_dir, prefix=prefix, prefill_chunk=40,
                                   solo_prefill_chunk=64, kv_budget_bytes=budget)
    assert sched.kv.geometry.bytes_per_token == per_token
    plan = {0: ("a", long_prompt(30), 40), 3: ("b", long_prompt(150, seed=1), 10),
            5: ("c", long_prompt(90, seed=2), 25), 60: ("d", [*long_prompt(30), 9, 9], 5)}
    seen_used = set()
    for step in range(400):
        if step in plan:
            rid, prompt, max_tokens = plan[step]
            sched.submit(request(rid, prompt, max_tokens))
        if sched.idle and step > max(plan):
            break
        sched.step()
        snap = sched.snapshot()
        used = _tokens_in_cache(sched) * per_token
        reserved = sum(len(s.prompt) + s.max_tokens for s in sched.running.values()) * per_token
        assert snap["kv_used_bytes"] == used, step
        assert snap["kv_reserved_bytes"] == reserved, step
        assert snap["kv_capacity_bytes"] == budget
        assert used <= reserved <= budget
        # What is allocated is what the arrays hold, and every cached token has a slot.
        allocated = _array_bytes(sched.kv.keys) + _array_bytes(sched.kv.values)
        assert snap["kv_allocated_bytes"] == allocated
        assert allocated == sched.kv.rows * sched.kv.capacity * per_token
        assert all(s.length <= sched.kv.capacity for s in sched.running.values())
        # The prefix cache's bytes are the sum of its entries, token for token.
        entries = list(prefix.entries.values())
        assert snap["prefix_cache_bytes"] == sum(len(e.tokens) for e in entries) * per_token
        assert snap["prefix_cache_bytes"] == sum(
            _array_bytes(e.keys) + _array_bytes(e.values) for e in entries)
        assert snap["prefix_cache_bytes"] <= prefix.max_bytes
        seen_used.add(snap["kv_used_bytes"])
    else:
        raise AssertionError("scheduler did not finish")
    assert len(seen_used) > 30  # the figure moved with the work, not just at the ends
    snap = sched.snapshot()
    assert snap["kv_used_bytes"] == 0 and snap["kv_reserved_bytes"] == 0
    # "d" starts with "a"'s prompt: served from the prefix cache.
    assert final(events, "d").usage.cached_tokens >= 30 - 1
    assert snap["prefix_hits"] >= 1


def test_admission_waits_for_kv_budget_and_never_overcommits(tiny_dir: Path) -> None:
    """Each request's need (prompt + max_tokens) is known before admission: with room for one
    request at a time, the second waits in the queue until the first has finished."""
    per_token = _bytes_per_token(tiny_dir)
    budget = per_token * 200
    sched, events = make_scheduler(tiny_dir, kv_budget_bytes=budget, prefill_chunk=32)
    sched.submit(request("first", long_prompt(100), 50))
    sched.submit(request("second", long_prompt(100, seed=4), 50))
    finished_first_at = None
    for step in range(500):
        if sched.idle:
            break
        sched.step()
        snap = sched.snapshot()
        assert snap["kv_reserved_bytes"] <= budget
        if finished_first_at is None and any(
                isinstance(e, Finished) and e.id == "first" for e in events):
            finished_first_at = step
        if finished_first_at is None:
            assert snap["active"] == 1 and snap["queued"] == 1
    assert finished_first_at is not None
    assert final(events, "second").usage.completion_tokens == 50


def test_allocated_kv_stays_within_the_budget_with_one_long_and_several_short(
    tiny_dir: Path,
) -> None:
    """Every row is as long as the longest and rows come in powers of two, so reserved tokens
    alone would let this mix allocate ~6x the budget: the short requests must wait until the
    long one is done (and then run together), and what the arrays hold never exceeds it."""
    per_token = _bytes_per_token(tiny_dir)
    budget = per_token * 600
    sched, events = make_scheduler(tiny_dir, kv_budget_bytes=budget, prefill_chunk=64)
    sched.submit(request("long", long_prompt(400), 20))
    for i in range(4):
        sched.submit(request(f"short{i}", [5 + i] * 8, 30))
    worst = 0
    most_running = 0
    for _ in range(300):
        if sched.idle:
            break
        sched.step()
        snap = sched.snapshot()
        assert snap["kv_reserved_bytes"] <= budget
        allocated = _array_bytes(sched.kv.keys) + _array_bytes(sched.kv.values)
        assert snap["kv_allocated_bytes"] == allocated
        assert all(s.length <= sched.kv.capacity for s in sched.running.values())
        worst = max(worst, allocated)
        most_running = max(most_running, len(sched.running))
        if "long" in sched.running:
            assert list(sched.running) == ["long"]  # the short ones wait in the queue
    else:
        raise AssertionError("scheduler did not finish")
    assert worst <= budget, f"allocated {worst / budget:.1f}x the KV budget"
    assert most_running == 4  # ... and then run as one batch
    for rid, n in [("long", 20)] + [(f"short{i}", 30) for i in range(4)]:
        assert final(events, rid).usage.completion_tokens == n


def test_admission_regroups_stale_rows_rather_than_overflowing(tiny_dir: Path) -> None:
    """Rows and capacity left over from a finished long sequence do not push the allocation past
    the budget when more rows are needed: the capacity is cut back when it finishes, and the
    running rows are regrouped to the row count the budget allows first. A request whose peak
    alone exceeds the budget still gets the "can never fit" answer."""
    per_token = _bytes_per_token(tiny_dir)
    budget = per_token * 500
    sched, events = make_scheduler(tiny_dir, kv_budget_bytes=budget, prefill_chunk=64)
    sched.submit(request("long", long_prompt(100), 10))
    for i in range(3):
        sched.submit(request(f"s{i}", [7 + i] * 8, 40))
    for _ in range(100):
        sched.step()
        if "long" not in sched.running:
            break
    assert "long" not in sched.running and len(sched.running) == 3
    # The long row's capacity is cut back as soon as it finishes: decode attends over all of
    # it, so the short rows would pay for it every step.
    assert sched.kv.rows == 4 and sched.kv.capacity < 100
    sched.submit(request("n0", [3] * 8, 40))
    sched.submit(request("n1", [4] * 8, 40))
    sched.submit(request("never", long_prompt(480), 40))
    most_running, worst = 0, 0
    for _ in range(500):
        if sched.idle:
            break
        sched.step()
        most_running = max(most_running, len(sched.running))
        worst = max(worst, _array_bytes(sched.kv.keys) + _array_bytes(sched.kv.values))
        assert all(s.length <= sched.kv.capacity for s in sched.running.values())
    else:
        raise AssertionError("scheduler did not finish")
    # Five rows at once means eight allocated: at the old capacity that is 1.6x the budget.
    assert most_running == 5
    assert worst <= budget, f"allocated {worst / budget:.1f}x the KV budget"
    failed = [e for e in events if getattr(e, "id", None) == "never"]
    assert len(failed) == 1 and failed[0].code == "bad_request"  # type: ignore[union-attr]
    assert "KV budget" in failed[0].message  # type: ignore[union-attr]
    for rid in ("s0", "s1", "s2", "n0", "n1"):
        assert final(events, rid).usage.completion_tokens == 40


# ---- prefill slices sized by time --------------------------------------------------------------
def test_prefill_slice_takes_at_most_the_gap_budget_in_time() -> None:
    # 50 ms decode steps, 10 ms a prompt token, 6 steps: 30 tokens a slice.
    assert prefill_slice(512, 6.0, 0.050, 0.010) == 30
    # Fast prefill: capped at the most tokens a slice may hold.
    assert prefill_slice(512, 6.0, 0.050, 0.00001) == 512
    # Very slow prefill: never below the smallest useful slice.
    assert prefill_slice(512, 6.0, 0.050, 1.0) == MIN_PREFILL_SLICE
    assert prefill_slice(8, 6.0, 0.050, 1.0) == 8
    # Nothing measured yet: a small first slice; adaptation off: the fixed size.
    assert prefill_slice(512, 6.0, None, None) == FIRST_PREFILL_SLICE
    assert prefill_slice(512, 0.0, 0.050, 0.010) == 512


def test_time_sized_slices_follow_the_measured_speeds_and_cover_the_prompt(
        tiny_dir: Path) -> None:
    sched, events = make_scheduler(tiny_dir, prefill_chunk=96, solo_prefill_chunk=512,
                                   prefill_gap_steps=2.0)
    recorder = Recorder(sched)
    sched.submit(request("stream", [9, 9, 9], 200))
    for _ in range(4):
        sched.step()
    prompt_len = 400
    sched.submit(request("long", long_prompt(prompt_len, seed=3), 2))
    recorder.log.clear()
    sizes = []
    while prefilling(sched, "long"):
        expected = prefill_slice(96, 2.0, sched.decode_step_s, sched.prefill_s_per_token)
        before = len(recorder.log)
        sched.step()
        slices = [n for kind, _, n in recorder.log[before:] if kind == "prefill"]
        if slices:
            assert slices[0] == min(expected, prompt_len - sum(sizes))
            sizes += slices
    assert sizes[0] == FIRST_PREFILL_SLICE
    assert sum(sizes) == prompt_len and all(MIN_PREFILL_SLICE <= n <= 96 for n in sizes[:-1])
    assert sched.decode_step_s and sched.prefill_s_per_token  # both measured
    run_all(sched)
    assert final(events, "long").usage.completion_tokens == 2
