"""Draft models: a small model with the target's tokenizer drafts, the target verifies. Greedy
output is exactly plain decoding's (even with a random draft that is almost never right), sampled
output keeps plain sampling's distribution (the min(1, p/q) rule), and a draft whose tokenizer
differs is refused."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from agent.generation import GenerationEvent, GenerationRequest, SamplingParams
from agent.runtime.acceptance import accept_sampled, residual_from, verified_tokens
from agent.runtime.compute import LocalCompute
from agent.runtime.draft_model import DraftModel, DraftRow, Want, load_draft_model
from agent.runtime.drafting import FIRST_PAUSE
from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.model import load_decoder
from agent.runtime.protocol import RunnerConfig
from agent.runtime.sampling import RowSampler
from agent.runtime.scheduler import Scheduler, SchedulerLimits
from agent.spec import validate_spec_file
from tests.draft_models import make_smollm2_draft, with_other_eos, with_swapped_tokens
from tests.scheduler_tools import finished, run_all, tokens_of
from tests.test_pipeline import pipeline_configs, start_all
from tests.test_speculative import total_variation
from tests.test_speculative_dist import generate
from tests.tiny_models import make_tiny_model

# ---- the acceptance rule for a sampled draft (pure, real MLX) --------------------------------


def test_a_sampled_draft_is_kept_with_probability_p_over_q() -> None:
    p = mx.array([0.1, 0.6, 0.3])
    q = mx.array([0.5, 0.3, 0.2])
    # p(1) > q(1): always kept; p(0) / q(0) = 0.2: kept below that uniform only.
    assert accept_sampled(p, q, 1, 0.999)
    assert accept_sampled(p, q, 0, 0.19) and not accept_sampled(p, q, 0, 0.21)
    # The residual max(0, p - q), normalised: where p exceeds q.
    residual = mx.softmax(residual_from(p, q)).tolist()
    assert residual == pytest.approx([0.0, 0.3 / 0.4, 0.1 / 0.4])


def test_a_draft_models_pace_follows_what_the_target_kept() -> None:
    row = DraftRow(row=0)
    row.feedback(4, 4, 100)
    assert row.draft_len == 6  # all kept: draft further
    row.feedback(6, 2, 103)
    assert row.draft_len == 3  # one past what was kept
    for tokens in (104, 105, 106):  # keeps missing: drafting pauses, longer each time
        row.feedback(1, 0, tokens)
    assert row.resume_at == 106 + FIRST_PAUSE and row.pause_len == 2 * FIRST_PAUSE
    assert row.stats.drafted == 13 and row.stats.accepted == 6


def small_vocab(directory: Path, seed: int) -> Path:
    """A tiny random model whose vocabulary is 12 tokens, its head scaled so a few dominate."""
    directory = make_tiny_model(directory, seed=seed, tie=False)
    weights = mx.load(str(directory / "model.safetensors"))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:12]
    weights["lm_head.weight"] = weights["lm_head.weight"][:12] * 3.0
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"vocab_size": 12}))
    return directory


def test_sampled_drafts_keep_plain_sampling_distribution(tmp_path: Path) -> None:
    """4,000 seeded runs: a draft model (another random model) samples two tokens from its own
    q, the target verifies them; each of the first three tokens is distributed as plain
    sampling's (total variation below 0.03)."""
    target = load_decoder(small_vocab(tmp_path / "t", 3))
    draft_dir = small_vocab(tmp_path / "d", 8)
    params = SamplingParams(max_tokens=8, temperature=0.9, top_k=6, top_p=0.95, min_p=0.02)
    prompt = (3, 7, 1, 4)
    memo: dict[tuple[str, tuple[int, ...]], mx.array] = {}
    draft_dec = load_decoder(draft_dir)

    def logits_after(which: str, tokens: tuple[int, ...]) -> mx.array:
        if (which, tokens) not in memo:
            dec = target if which == "t" else draft_dec
            kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
            kv.acquire("r", len(tokens) + 1)
            memo[which, tokens] = LocalCompute(dec, kv, compiled=False).prefill(
                0, 0, list(tokens))[0]
        return memo[which, tokens]

    def dist(which: str, tokens: tuple[int, ...]) -> dict[int, float]:
        probs = mx.softmax(RowSampler(params).filtered(logits_after(which, tokens))).tolist()
        return {i: p for i, p in enumerate(probs) if p > 0}

    exact: list[Counter[int]] = [Counter(), Counter(), Counter()]
    for t1, p1 in dist("t", prompt).items():
        exact[0][t1] += p1
        for t2, p2 in dist("t", (*prompt, t1)).items():
            exact[1][t2] += p1 * p2
            for t3, p3 in dist("t", (*prompt, t1, t2)).items():
                exact[2][t3] += p1 * p2 * p3
    # The real drafter's proposal is a draw from the draft's q (checked once, then the runs
    # draw as it does, from the memoised draft distributions, to keep 4,000 runs quick).
    model = DraftModel(draft_dec, vocab=12, compiled=False)
    seeded = RowSampler(msgspec.structs.replace(params, seed=1))
    proposal = model.propose([Want("x", list(prompt), 2, seeded)])
    got = proposal["x"]
    assert len(got.tokens) == 2 and got.q is not None
    q1 = mx.softmax(RowSampler(params).filtered(logits_after("d", prompt)))
    assert mx.allclose(got.q[0], q1, atol=1e-5)
    q2 = mx.softmax(RowSampler(params).filtered(logits_after("d", (*prompt, got.tokens[0]))))
    assert mx.allclose(got.q[1], q2, atol=1e-5)

    runs = 4000
    seen: list[Counter[int]] = [Counter(), Counter(), Counter()]
    kept_counts: Counter[int] = Counter()
    for seed in range(runs):
        sampler = RowSampler(msgspec.structs.replace(params, seed=seed))
        drafts, qs = [], []
        for _ in range(2):
            filtered = sampler.filtered(logits_after("d", (*prompt, *drafts)))
            qs.append(mx.softmax(filtered))
            drafts.append(int(mx.random.categorical(filtered, key=sampler.next_key()).item()))
        verify_logits = mx.stack([logits_after("t", (*prompt, *drafts[:i])) for i in range(3)])
        out: list[int] = []
        kept = 0
        for token, from_draft, _ in verified_tokens(sampler, verify_logits, drafts,
                                                    list(prompt), mx.stack(qs)):
            out.append(token)
            kept += from_draft
            sampler.history.append(token)
        kept_counts[kept] += 1
        while len(out) < 3:  # past a rejection, plain sampling goes on
            out.append(int(sampler.choose(logits_after("t", (*prompt, *out))).item()))
        for i, token in enumerate(out[:3]):
            seen[i][token] += 1
    assert len(kept_counts) >= 2  # both kept and rejected drafts happened
    for i in range(3):
        empirical = {t: c / runs for t, c in seen[i].items()}
        assert total_variation(empirical, dict(exact[i])) < 0.03, (i, empirical, exact[i])


# ---- SmolLM2 with a random draft of its tokenizer --------------------------------------------


@pytest.fixture(scope="module")
def smollm2_draft(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_smollm2_draft(smollm2_dir, tmp_path_factory.mktemp("draft") / "smollm2-draft")


def run_scheduler(model_dir: Path, dec: Any, requests: list[GenerationRequest],
                  draft: Path | None) -> tuple[Scheduler, list[GenerationEvent]]:
    events: list[GenerationEvent] = []
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim), chunk=32)
    drafter = (load_draft_model(draft, model_dir, vocab=dec.config.vocab_size, compiled=False)
               if draft is not None else None)
    sched = Scheduler(dec, load_tokenizer(model_dir), kv,
                      SchedulerLimits(context_length=256, kv_budget_bytes=1 << 28),
                      events.append, compiled=False, prompt_lookup=False, draft_model=drafter)
    for r in requests:
        sched.submit(r)
    run_all(sched)
    return sched, events


@pytest.mark.slow
def test_a_random_draft_leaves_greedy_smollm2_output_unchanged(
        smollm2_dir: Path, smollm2_draft: Path) -> None:
    """Alone, then in a batch where one row drafts from its prediction, one keeps logprobs and
    rows whose draft paused (a random draft keeps missing) decode beside rows that draft."""
    tok = load_tokenizer(smollm2_dir)

    def req(rid: str, text: str, n: int, **extra: object) -> GenerationRequest:
        sampling = {"max_tokens": n, "temperature": 0.0}
        sampling |= {k: v for k, v in extra.items() if k != "prediction_tokens"}
        return GenerationRequest(id=rid, model="m", prompt_tokens=tok.encode(text),
                                 sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
                                 prediction_tokens=extra.get("prediction_tokens"))  # type: ignore[arg-type]

    dec = load_decoder(smollm2_dir)
    alone = [req("alone", "The capital of France is", 8)]
    batch = [req("a", "List three colors:", 6), req("b", "def add(a, b):", 8, logprobs=True),
             req("p", "Say hello.", 6, prediction_tokens=tok.encode("Hello! How are you?"))]
    for requests in (alone, batch):
        _, plain = run_scheduler(smollm2_dir, dec, requests, None)
        sched, drafted = run_scheduler(smollm2_dir, dec, requests, smollm2_draft)
        stats = sched.speculator.stats
        assert stats.model_drafted_tokens > 0 and stats.verify_steps > 0
        assert stats.model_accepted_tokens < stats.model_drafted_tokens  # a poor draft
        for r in requests:
            assert tokens_of(drafted, r.id) == tokens_of(plain, r.id), r.id
            assert finished(drafted, r.id).reason == finished(plain, r.id).reason
        snap = sched.snapshot()
        assert snap["draft_model_drafted_tokens_total"] == stats.model_drafted_tokens


# ---- across processes: the draft in a pipeline head --------------------------------------------


def test_a_pipeline_head_drafts_with_its_draft_model(tmp_path: Path) -> None:
    """A 2-stage pipeline whose head loads a draft model (a tiny model of the same tokenizer)
    gives what one plain process gives, greedy ids and logprobs."""
    target = make_tiny_model(tmp_path / "t", layers=4)
    draft = make_tiny_model(tmp_path / "d", layers=1, seed=9)
    prompts = {"x": [10, 20, 30, 40], "y": [100, 3, 77]}

    async def main() -> None:
        solo = (await start_all([RunnerConfig(model_name="tiny", model_dir=str(target),
                                              prompt_lookup=False)], tmp_path))[0]
        try:
            expected = await generate(solo, prompts)
        finally:
            await solo.stop()
        configs = pipeline_configs(target, [(0, 2), (2, 4)], stats_interval_s=0.2,
                                   prompt_lookup=False, pipeline_microbatch=False,
                                   draft_name="d", draft_dir=str(draft))
        runners = await start_all(configs, tmp_path)
        try:
            got = await generate(runners[0], prompts)
            for _ in range(100):
                if runners[0].last_stats.get("draft_model_drafted_tokens_total", 0) > 0:
                    break
                await asyncio.sleep(0.1)
            stats = runners[0].last_stats
        finally:
            for r in runners:
                await r.stop()
        assert stats["draft_model_drafted_tokens_total"] > 0, stats
        for rid, (ids, lps) in expected.items():
            assert got[rid][0] == ids, rid
            assert max(abs(a - b) for a, b in zip(got[rid][1], lps, strict=True)) < 1e-4

    asyncio.run(main())


# ---- refusing a draft of another tokenizer ---------------------------------------------------


def test_spec_validation_refuses_a_draft_of_another_tokenizer(tmp_path: Path) -> None:
    target = make_tiny_model(tmp_path / "target")
    good = make_tiny_model(tmp_path / "good", layers=1, seed=4)
    swapped = tmp_path / "swapped"
    other_eos = tmp_path / "eos"
    for directory, change in ((swapped, "vocab"), (other_eos, "eos")):
        make_tiny_model(directory, layers=1, seed=5)
        if change == "vocab":
            data = json.loads((directory / "tokenizer.json").read_text())
            vocab = data["model"]["vocab"]
            a, b = sorted(vocab, key=vocab.__getitem__)[10:12]
            vocab[a], vocab[b] = vocab[b], vocab[a]
            (directory / "tokenizer.json").write_text(json.dumps(data))
        else:
            config = json.loads((directory / "config.json").read_text())
            (directory / "config.json").write_text(json.dumps(config | {"eos_token_id": 0}))
    spec = tmp_path / "cluster.toml"
    for draft, expected in ((good, None), (swapped, "same size"), (other_eos, "special tokens")):
        spec.write_text(f'[[models]]\nmodel = "{target}"\ndraft = "{draft}"\n')
        errors = validate_spec_file(spec)
        if expected is None:
            assert errors == []
        else:
            assert [e.path for e in errors] == ["models[0].draft"], errors
            assert expected in errors[0].message and "cannot draft for" in errors[0].message
    spec.write_text(f'[[models]]\nmodel = "{target}"\ndraft = ""\n')
    assert [e.path for e in validate_spec_file(spec)] == ["models[0].draft"]


def test_smollm2_draft_helpers_differ_where_they_should(smollm2_dir: Path,
                                                         smollm2_draft: Path,
                                                         tmp_path: Path) -> None:
    from agent.models.draft_check import check_draft_model

    check_draft_model(smollm2_draft, smollm2_dir)
    with pytest.raises(ValueError, match="same size"):
        check_draft_model(with_swapped_tokens(smollm2_draft, tmp_path / "sw"), smollm2_dir)
    with pytest.raises(ValueError, match="special tokens"):
        check_draft_model(with_other_eos(smollm2_draft, tmp_path / "eos"), smollm2_dir)


# ---- the draft in another process: a draft runner answering the head over a link ------------


@pytest.mark.slow
def test_a_head_drafts_with_a_draft_runner_over_a_link(tmp_path: Path) -> None:
    """A head asks a draft runner (another process, loopback TCP) for its drafts: greedy
    output is plain decoding's, seeded sampling reproduces. Stopping the draft runner leaves
    the head serving, undrafted."""
    from live_agent import free_port

    target = make_tiny_model(tmp_path / "t", layers=2)
    draft = make_tiny_model(tmp_path / "d", layers=1, seed=9)
    prompts = {"x": [10, 20, 30, 40], "y": [100, 3, 77]}
    port = free_port()

    async def sampled(runner: Any) -> list[int]:
        request = GenerationRequest(id="s", model="tiny", prompt_tokens=[5, 6, 7],
                                    sampling=SamplingParams(max_tokens=16, temperature=0.8,
                                                            seed=3))
        ids: list[int] = []
        async for event in runner.generate(request):
            ids += getattr(event, "token_ids", [])
        return ids

    async def main() -> None:
        base = RunnerConfig(model_name="tiny", model_dir=str(target), prompt_lookup=False,
                            stats_interval_s=0.2)
        plain = (await start_all([base], tmp_path))[0]
        try:
            expected = await generate(plain, prompts)
        finally:
            await plain.stop()
        server_config = RunnerConfig(model_name="d", model_dir=str(draft), role="draft",
                                     listen=f"127.0.0.1:{port}")
        head_config = msgspec.structs.replace(base, draft_name="d",
                                              draft_remote=f"127.0.0.1:{port}")
        server, head = await start_all([server_config, head_config], tmp_path)
        try:
            got = await generate(head, prompts)
            remote_sampled = [await sampled(head), await sampled(head)]
            for _ in range(100):
                if head.last_stats.get("draft_model_drafted_tokens_total", 0) > 0:
                    break
                await asyncio.sleep(0.1)
            stats = head.last_stats
            await server.stop()
            after = await generate(head, {"z": [9, 8, 7]})
        finally:
            await head.stop()
            await server.stop()
        assert stats["draft_model_drafted_tokens_total"] > 0, stats
        for rid, (ids, _) in expected.items():
            assert got[rid][0] == ids, rid
        assert len(after["z"][0]) == 24
        assert remote_sampled[0] == remote_sampled[1] and len(remote_sampled[0]) == 16

    asyncio.run(main())
