"""Speculative decoding: prompt-lookup drafts, the acceptance rule, and the scheduler's
verification steps, which must give exactly what plain decoding gives (greedy) or the same
distribution (sampled)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import msgspec
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from agent.generation import GenerationEvent, GenerationRequest, SamplingParams, TokenChunk
from agent.models.draft_check import check_draft_model, tokenizer_facts, tokenizer_mismatch
from agent.runtime.acceptance import (
    accept_drafted,
    greedy_kept,
    residual_logits,
    verified_tokens,
)
from agent.runtime.client import RunnerProcess
from agent.runtime.compute import LocalCompute
from agent.runtime.drafting import MISSES_TO_PAUSE, PromptLookup, continuation, next_draft_len
from agent.runtime.environment import runner_environment
from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.model import load_decoder
from agent.runtime.protocol import RunnerConfig
from agent.runtime.sampling import RowSampler
from agent.runtime.scheduler import Scheduler, SchedulerLimits
from agent.settings import NodeSettings
from tests.scheduler_tools import finished, run_all, tokens_of
from tests.tiny_models import make_tiny_model

# ---- drafting (pure) --------------------------------------------------------------------------


def lookup_over(tokens: list[int], **kwargs: object) -> PromptLookup:
    drafter = PromptLookup(**kwargs)  # type: ignore[arg-type]
    drafter.extend(tokens)
    return drafter


def test_prompt_lookup_proposes_what_followed_the_longest_match() -> None:
    #        0  1  2  3  4  5  6  7  8  9
    text = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 4, 6, 7]
    # "6 7" occurred twice (latest: followed by 2 3 4); "4 6 7" never did: the 2-gram decides.
    assert lookup_over(text).propose(3, len(text)) == [2, 3, 4]
    # The longer match wins over a more recent shorter one.
    text = [1, 2, 3, 10, 11, 9, 2, 3, 20, 1, 2, 3]
    assert lookup_over(text).propose(2, len(text)) == [10, 11]
    assert lookup_over([1, 2, 3, 4]).propose(4, 4) == []  # nothing repeats
    assert lookup_over(text).propose(0, len(text)) == []


def test_a_repeating_span_is_drafted_whole() -> None:
    assert continuation([1, 2, 3, 1, 2], 3, 5) == [1, 2, 1, 2, 1]
    drafter = lookup_over([7, 8, 7, 8, 7, 8])
    assert drafter.propose(4, 6) == [7, 8, 7, 8]


def test_draft_length_follows_acceptance() -> None:
    assert next_draft_len(4, 4, 4, 12) == 6  # all kept: guess further
    assert next_draft_len(10, 4, 4, 12) == 12  # a short draft (limited by room) kept whole
    assert next_draft_len(11, 11, 11, 12) == 12
    assert next_draft_len(8, 8, 2, 12) == 3  # kept 2: try one past that
    assert next_draft_len(8, 8, 0, 12) == 1


def test_drafting_pauses_where_it_keeps_failing_and_comes_back() -> None:
    text = [1, 2, 3, 4, 1, 2]
    drafter = lookup_over(text)
    for _ in range(MISSES_TO_PAUSE):
        assert drafter.propose(4, 3)
        drafter.feedback(len(drafter.propose(4, 3)), 0)
    assert drafter.paused and drafter.propose(4, 3) == [] and not drafter.could_draft(3)
    drafter.extend([9] * 13 + [1, 2])
    assert drafter.paused
    drafter.extend([5, 1, 2])  # 16 more tokens and more: the pause is over
    assert not drafter.paused and drafter.propose(4, 3)
    assert drafter.stats.passes == MISSES_TO_PAUSE and drafter.stats.accepted == 0


def test_a_prediction_drafts_from_the_start_and_where_the_output_rejoins_it() -> None:
    prompt = [50, 51, 52]
    drafter = lookup_over(prompt, prediction=[1, 2, 3, 4, 5, 6, 7, 8])
    assert drafter.propose(3, len(prompt)) == [1, 2, 3]
    drafter.feedback(3, 3)
    drafter.extend([1, 2, 3])
    assert drafter.propose(2, len(prompt)) == [4, 5]  # still verbatim: continue it
    drafter.feedback(2, 1)
    drafter.extend([4, 9, 5, 6])  # the output left the prediction, then rejoined at "5 6"
    assert drafter.propose(2, len(prompt)) == [7, 8]
    assert drafter.stats.predicted_accepted == 4 and drafter.stats.predicted_rejected == 1
    only = lookup_over([1, 2, 1], prediction=[], lookup_prompt=False)
    assert only.propose(4, 3) == []  # prompt lookup off, no prediction: no draft


# ---- the acceptance rule (pure, real MLX) ----------------------------------------------------


def test_a_deterministic_draft_is_kept_with_its_probability() -> None:
    probs = mx.array([0.1, 0.6, 0.3])
    assert accept_drafted(probs, 1, 0.59) and not accept_drafted(probs, 1, 0.61)
    assert not accept_drafted(probs, 0, 0.11) and accept_drafted(probs, 2, 0.0)
    residual = mx.softmax(residual_logits(mx.log(probs), 1)).tolist()
    assert residual == pytest.approx([0.25, 0.0, 0.75])
    assert greedy_kept([4, 5, 6, 7], [4, 5, 9]) == 2
    assert greedy_kept([4, 5, 6], [4, 5]) == 2
    assert greedy_kept([1], []) == 0


def test_greedy_verification_yields_the_argmax_at_each_position() -> None:
    sampler = RowSampler(SamplingParams(max_tokens=8, temperature=0.0))
    logits = mx.array([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    assert list(verified_tokens(sampler, logits, [1, 2], [])) == [(1, True, 0), (0, False, 1)]
    assert list(verified_tokens(sampler, logits, [1, 0], [])) == [
        (1, True, 0), (0, True, 1), (2, False, 2)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model whose vocabulary is 12 tokens, its head scaled so a few dominate."""
    directory = make_tiny_model(tmp_path_factory.mktemp("small") / "m", seed=3, tie=False)
    weights = mx.load(str(directory / "model.safetensors"))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:12]
    weights["lm_head.weight"] = weights["lm_head.weight"][:12] * 3.0
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"vocab_size": 12}))
    return directory


def total_variation(a: dict[int, float], b: dict[int, float]) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def test_sampled_output_keeps_plain_sampling_distribution(small_vocab_dir: Path) -> None:
    """4,000 seeded runs of drafting + verification against the exact distribution of plain
    sampling, for each of the first three tokens: total variation below 0.03."""
    dec = load_decoder(small_vocab_dir)
    params = SamplingParams(max_tokens=8, temperature=0.9, top_k=6, top_p=0.95, min_p=0.02)
    prompt = [3, 7, 1, 4]
    memo: dict[tuple[int, ...], mx.array] = {}

    def logits_after(tokens: tuple[int, ...]) -> mx.array:
        """The model's next-token logits after `tokens` (each context computed once)."""
        if tokens not in memo:
            kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
            kv.acquire("r", len(tokens) + 1)
            memo[tokens] = LocalCompute(dec, kv, compiled=False).prefill(0, 0, list(tokens))[0]
        return memo[tokens]

    def plain(tokens: tuple[int, ...]) -> dict[int, float]:
        probs = mx.softmax(RowSampler(params).filtered(logits_after(tokens))).tolist()
        return {i: p for i, p in enumerate(probs) if p > 0}

    exact: list[Counter[int]] = [Counter(), Counter(), Counter()]
    for t1, p1 in plain(tuple(prompt)).items():
        exact[0][t1] += p1
        for t2, p2 in plain((*prompt, t1)).items():
            exact[1][t2] += p1 * p2
            for t3, p3 in plain((*prompt, t1, t2)).items():
                exact[2][t3] += p1 * p2 * p3
    # A draft of the second most likely first token, then the likeliest after it: some runs
    # keep both, some reject at the first or second position.
    ranked = sorted(exact[0], key=exact[0].__getitem__, reverse=True)
    d1 = ranked[1]
    d2 = max(plain((*prompt, d1)).items(), key=lambda kv: kv[1])[0]
    # The verification pass: the pending (last prompt) token and the draft in one step.
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
    kv.acquire("r", 16)
    compute = LocalCompute(dec, kv, compiled=False)
    compute.prefill(0, 0, prompt[:-1])
    verify_logits = compute.verify([[prompt[-1], d1, d2]], [len(prompt) - 1])[0]
    runs = 4000
    seen: list[Counter[int]] = [Counter(), Counter(), Counter()]
    outcomes = Counter()
    for seed in range(runs):
        sampler = RowSampler(msgspec.structs.replace(params, seed=seed))
        out: list[int] = []
        for token, _kept, _ in verified_tokens(sampler, verify_logits, [d1, d2], prompt):
            out.append(token)
            sampler.history.append(token)
            if len(out) == 3:
                break
        outcomes[sum(1 for t, d in zip(out, [d1, d2], strict=False) if t == d)] += 1
        while len(out) < 3:  # past a rejection, plain sampling goes on
            token = int(sampler.choose(logits_after((*prompt, *out))).item())
            out.append(token)
        for i, token in enumerate(out):
            seen[i][token] += 1
    assert len(outcomes) >= 2  # both kept and rejected drafts happened
    for i in range(3):
        empirical = {t: c / runs for t, c in seen[i].items()}
        assert total_variation(empirical, dict(exact[i])) < 0.03, (i, empirical, exact[i])
    # Seeded runs reproduce.
    again = RowSampler(msgspec.structs.replace(params, seed=11))
    first = [t for t, _, _ in verified_tokens(again, verify_logits, [d1, d2], prompt)]
    again = RowSampler(msgspec.structs.replace(params, seed=11))
    assert [t for t, _, _ in verified_tokens(again, verify_logits, [d1, d2], prompt)] == first


# ---- draft models: the same tokenizer ---------------------------------------------------------


def test_a_draft_model_needs_the_targets_vocabulary_and_special_tokens(tmp_path: Path) -> None:
    target = make_tiny_model(tmp_path / "target")
    draft = make_tiny_model(tmp_path / "draft", seed=9, layers=1)
    check_draft_model(draft, target)  # another model, the same tokenizer: fine
    assert tokenizer_mismatch(tokenizer_facts(draft), tokenizer_facts(target)) is None
    swapped = make_tiny_model(tmp_path / "swapped", layers=1)
    data = json.loads((swapped / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.__getitem__)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, different meaning
    (swapped / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="same size"):
        check_draft_model(swapped, target)
    other_eos = make_tiny_model(tmp_path / "eos", layers=1)
    config = json.loads((other_eos / "config.json").read_text())
    (other_eos / "config.json").write_text(json.dumps(config | {"eos_token_id": 0}))
    with pytest.raises(ValueError, match="special tokens"):
        check_draft_model(other_eos, target)


# ---- the scheduler -----------------------------------------------------------------------------


def make_scheduler(model_dir: Path, *, lookup: bool, **limits: int
                   ) -> tuple[Scheduler, list[GenerationEvent]]:
    events: list[GenerationEvent] = []
    dec = load_decoder(model_dir)
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim), chunk=32)
    defaults = {"context_length": 512, "kv_budget_bytes": 1 << 30}
    sched = Scheduler(dec, load_tokenizer(model_dir), kv, SchedulerLimits(**(defaults | limits)),
                      events.append, prompt_lookup=lookup)
    return sched, events


def request(rid: str, prompt: list[int], max_tokens: int = 24, **sampling: object
            ) -> GenerationRequest:
    params = SamplingParams(**({"max_tokens": max_tokens, "temperature": 0.0} | sampling))
    return GenerationRequest(id=rid, model="tiny", prompt_tokens=prompt, sampling=params)


def test_drafted_greedy_batch_generates_what_plain_decoding_does(tiny_dir: Path) -> None:
    repeated = [40, 41, 42, 43, 44] * 6
    requests = [request("copy", repeated, 40), request("free", [10, 20, 30], 30),
                request("short", repeated[:12], 5), request("lp", repeated, 16, logprobs=True,
                                                              top_logprobs=2)]
    results = {}
    for lookup in (False, True):
        sched, events = make_scheduler(tiny_dir, lookup=lookup)
        for r in requests:
            sched.submit(r)
        run_all(sched)
        results[lookup] = (
            {r.id: tokens_of(events, r.id) for r in requests},
            {r.id: finished(events, r.id) for r in requests},
            [e for e in events if getattr(e, "id", "") == "lp"],
        )
        if lookup:
            assert sched.speculator.stats.accepted_tokens > 0
            snap = sched.snapshot()
            assert snap["drafted_tokens_total"] >= snap["accepted_draft_tokens_total"] > 0
    assert results[True][0] == results[False][0]
    for rid, end in results[False][1].items():
        assert results[True][1][rid].reason == end.reason
        assert results[True][1][rid].usage == end.usage
    plain_lp = [lp for e in results[False][2] for lp in (getattr(e, "logprobs", None) or [])]
    drafted_lp = [lp for e in results[True][2] for lp in (getattr(e, "logprobs", None) or [])]
    assert [lp.token_id for lp in drafted_lp] == [lp.token_id for lp in plain_lp]
    for a, b in zip(drafted_lp, plain_lp, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_a_prediction_drafts_even_with_prompt_lookup_off(tiny_dir: Path) -> None:
    plain, events = make_scheduler(tiny_dir, lookup=False)
    plain.submit(request("p", [10, 20, 30], 20))
    run_all(plain)
    reply = tokens_of(events, "p")
    wrong = [*reply[:6], 99, 98, 97, *reply[9:]]
    sched, events = make_scheduler(tiny_dir, lookup=False)
    sched.submit(GenerationRequest(id="p", model="tiny", prompt_tokens=[10, 20, 30],
                                   sampling=SamplingParams(max_tokens=20, temperature=0.0),
                                   prediction_tokens=wrong))
    run_all(sched)
    assert tokens_of(events, "p") == reply
    usage = finished(events, "p").usage
    assert usage.accepted_prediction_tokens >= 6
    assert usage.accepted_prediction_tokens + usage.rejected_prediction_tokens == len(wrong)
    assert sched.speculator.stats.verify_steps > 0


def test_seeded_drafted_sampling_is_reproducible(tiny_dir: Path) -> None:
    repeated = [40, 41, 42, 43, 44] * 6
    outputs = []
    for _ in range(2):
        sched, events = make_scheduler(tiny_dir, lookup=True)
        sched.submit(request("s", repeated, 30, temperature=0.7, seed=5, top_p=0.9))
        run_all(sched)
        outputs.append(tokens_of(events, "s"))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 30


# ---- SmolLM2: the real model, one batch of 8 ----------------------------------------------------

PASSAGE = ("Every morning the miller opened the great wooden doors and listened to the water "
           "turning the wheel. He had worked there for forty years, and his father before him, "
           "and the sound of the river was the first thing he heard each day.")
RECORD = '{"name": "Ada Lovelace", "born": 1815, "field": "mathematics", "country": "England"}'
RECORD_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "born": {"type": "integer"}, "field": {"type": "string"},
    "country": {"type": "string"}}, "required": ["name", "born", "field", "country"],
    "additionalProperties": False}


@pytest.mark.slow
def test_smollm2_batch_of_8_with_drafts_generates_what_plain_decoding_does(
        smollm2_dir: Path, tmp_path: Path) -> None:
    """Greedy ids, texts, finish reasons and usage are the same with prompt lookup on and off,
    in one batch of 8 on a real runner: copy tasks that draft (one ending on a stop string
    inside the copied span, one whose max tokens lands inside a draft, one under a JSON
    schema) beside free chat rows that do not."""
    tokenizer = load_tokenizer(smollm2_dir)

    def chat(text: str) -> list[int]:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                  add_generation_prompt=True))

    copy = chat(f"Repeat this text exactly:\n\n{PASSAGE}")
    requests = [
        request("copy", copy, 40),
        request("stop", copy, 40, stop=["forty years"]),
        request("short", copy, 21),
        GenerationRequest(id="json", model="m", prompt_tokens=chat(f"Repeat this JSON: {RECORD}"),
                          sampling=SamplingParams(max_tokens=40, temperature=0.0),
                          json_schema=RECORD_SCHEMA),
        *[request(f"chat{i}", chat(q), 16) for i, q in enumerate(
            ["Name a colour.", "What is 2 + 2?", "Say hello.", "Name a fruit."])],
    ]

    async def run(lookup: bool) -> tuple[dict[str, tuple[list[int], str, object]],
                                         dict[str, float]]:
        env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state", blas_threads=1))
        runner = RunnerProcess(RunnerConfig(model_name="m", model_dir=str(smollm2_dir),
                                            prompt_lookup=lookup, stats_interval_s=0.2), env)
        await runner.start(timeout=180)
        try:
            async def one(r: GenerationRequest) -> tuple[list[int], str, object]:
                ids: list[int] = []
                text = ""
                async for event in runner.generate(r):
                    if isinstance(event, TokenChunk):
                        ids += event.token_ids
                        text += event.text
                    else:
                        return ids, text, event
                raise AssertionError("no final event")

            results = await asyncio.gather(*(one(r) for r in requests))
            deadline = time.monotonic() + 10
            while runner.last_stats.get("generated_tokens_total", 0) < sum(
                    len(ids) for ids, _, _ in results) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            return dict(zip([r.id for r in requests], results, strict=True)), runner.last_stats
        finally:
            await runner.stop()

    plain, _ = asyncio.run(run(False))
    drafted, stats = asyncio.run(run(True))
    assert drafted == plain
    assert plain["stop"][2].stop_sequence == "forty years"  # type: ignore[attr-defined]
    assert plain["short"][2].reason == "length"  # type: ignore[attr-defined]
    assert json.loads(plain["json"][1]).keys() == RECORD_SCHEMA["properties"].keys()
    assert stats["accepted_draft_tokens_total"] > 40, stats
