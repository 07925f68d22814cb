"""Pipelined micro-batches across real runner processes on loopback: 2- and 3-stage pipelines
(and a 2-stage one with kv_bits=8, and one whose stages are tensor groups) serve 8 concurrent
greedy streams and give each stream the ids one process gives it, with streams joining and
leaving mid-flight, stop strings and a long prompt arriving while others decode.

One pipeline per configuration is started for the module and shared by its tests."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from mlx_lm.tokenizer_utils import load as load_tokenizer

from agent.generation import Finished, GenerationRequest, SamplingParams, TokenChunk
from agent.runtime.client import RunnerProcess
from agent.runtime.protocol import RunnerConfig
from tests.test_pipeline import hybrid_configs, pipeline_configs, start_all
from tests.tiny_models import make_tiny_model

T = TypeVar("T")
LAYERS = 6
SPLITS = {1: [(0, LAYERS)], 2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 4), (4, 6)]}
FAST = {"stats_interval_s": 0.2, "context_length": 1024}


class Pipelines:
    """Runner sets by name, all on one event loop that outlives the tests."""

    def __init__(self, model_dir: Path, state: Path) -> None:
        self.model_dir = model_dir
        self.state = state
        self.loop = asyncio.new_event_loop()
        self.sets: dict[str, list[RunnerProcess]] = {}

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 300))

    def get(self, name: str) -> RunnerProcess:
        """The head of the named runner set, started on first use."""
        if name not in self.sets:
            self.sets[name] = self.run(start_all(self.configs(name), self.state))
        return self.sets[name][0]

    def configs(self, name: str) -> list[RunnerConfig]:
        kind, _, arg = name.partition(":")
        extra: dict[str, Any] = dict(FAST)
        if "kv8" in name:
            extra["kv_bits"] = 8
        if kind == "solo":
            return [RunnerConfig(model_name="tiny", model_dir=str(self.model_dir), **extra)]
        if kind == "hybrid":
            return [msgspec.structs.replace(c, **extra)
                    for c in hybrid_configs(self.model_dir, SPLITS[2], 2)]
        return pipeline_configs(self.model_dir, SPLITS[int(arg[0])], **extra)

    def close(self) -> None:
        for runners in self.sets.values():
            for runner in runners:
                self.run(runner.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipelines]:
    # head_dim 64, so the same model also runs with a quantized KV cache.
    model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden=256, heads=4,
                                kv_heads=2, layers=LAYERS)
    pipes = Pipelines(model_dir, tmp_path_factory.mktemp("state"))
    yield pipes
    pipes.close()


def request(rid: str, prompt: list[int], n: int, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(id=rid, model="tiny", prompt_tokens=prompt,
                             sampling=SamplingParams(max_tokens=n, temperature=0.0, **sampling))


async def collect(runner: RunnerProcess, req: GenerationRequest,
                  started: asyncio.Event | None = None) -> tuple[list[int], Finished]:
    ids: list[int] = []
    async for event in runner.generate(req):
        if isinstance(event, TokenChunk):
            ids += event.token_ids
            if started is not None:
                started.set()
        else:
            assert isinstance(event, Finished), event
            return ids, event
    raise AssertionError("no final event")


PROMPTS = {f"s{i}": [(7 * i + j) % 180 + 3 for j in range(3 + 4 * i)] for i in range(8)}


async def eight_streams(runner: RunnerProcess) -> dict[str, list[int]]:
    results = await asyncio.gather(*(collect(runner, request(rid, p, 24 + i))
                                     for i, (rid, p) in enumerate(PROMPTS.items())))
    return {rid: ids for rid, (ids, _) in zip(PROMPTS, results, strict=True)}


@pytest.mark.parametrize("stages", [2, 3])
def test_eight_streams_match_one_process_stream_by_stream(pipelines: Pipelines,
                                                          stages: int) -> None:
    expected = pipelines.run(eight_streams(pipelines.get("solo")))
    head = pipelines.get(f"pipe:{stages}")
    assert pipelines.run(eight_streams(head)) == expected

    async def overlapped() -> None:
        while head.last_stats.get("microbatches_in_flight_max", 0) < stages:
            await asyncio.sleep(0.05)

    pipelines.run(overlapped())  # every stage had a micro-batch at once
    assert head.last_stats["pipeline_stages"] == stages
    if stages == 2:  # greedy steps came back as each row's pick (the vocabulary is split)
        assert head.last_stats["head_vocab_share"] < 1
        assert head.last_stats["greedy_picks_total"] > 0


async def greedy_beside_logprobs(runner: RunnerProcess) -> dict[str, Any]:
    """Eight streams at once, every other one asking for logprobs: micro-batches that mix
    rows wanting only their argmax with rows wanting their logits."""
    async def one(i: int, rid: str) -> tuple[list[int], list[float]]:
        sampling = {"logprobs": True, "top_logprobs": 3} if i % 2 else {}
        ids: list[int] = []
        values: list[float] = []
        async for event in runner.generate(request(rid, PROMPTS[rid], 12 + i, **sampling)):
            if isinstance(event, TokenChunk):
                ids += event.token_ids
                values += [t.logprob for lp in event.logprobs or [] for t in lp.top]
        return ids, values

    results = await asyncio.gather(*(one(i, rid) for i, rid in enumerate(PROMPTS)))
    return dict(zip(PROMPTS, results, strict=True))


def test_greedy_streams_beside_logprob_streams_match_one_process(pipelines: Pipelines) -> None:
    expected = pipelines.run(greedy_beside_logprobs(pipelines.get("solo")))
    got = pipelines.run(greedy_beside_logprobs(pipelines.get("pipe:2")))
    for rid in PROMPTS:
        assert got[rid][0] == expected[rid][0]
        assert len(got[rid][1]) == len(expected[rid][1])
        assert max((abs(a - b) for a, b in zip(got[rid][1], expected[rid][1], strict=True)),
                   default=0.0) < 1e-4  # as test_tensor_groups_inside_stages_in_micro_batches
    assert any(values for _, values in got.values())


async def mixed_traffic(runner: RunnerProcess, stop_text: str) -> dict[str, Any]:
    """Streams that join and leave while others run, one that ends on a stop string, and a
    long prompt that arrives while the others decode."""
    first = asyncio.Event()
    early = [asyncio.create_task(collect(runner, request(rid, PROMPTS[rid], 40),
                                         first if rid == "s0" else None))
             for rid in ("s0", "s1", "s2", "s3")]
    await first.wait()
    long_prompt = [(11 * j) % 190 + 3 for j in range(400)]
    late = {
        "long": asyncio.create_task(collect(runner, request("long", long_prompt, 12))),
        "s4": asyncio.create_task(collect(runner, request("s4", PROMPTS["s4"], 3))),
        "stop": asyncio.create_task(collect(runner, request("stop", PROMPTS["s6"], 40,
                                                            stop=[stop_text]))),
    }
    out: dict[str, Any] = {}
    for rid, task in late.items():
        ids, end = await task
        out[rid] = (ids, end.reason)
    # Joins after the first late ones have left.
    out["s5"] = (await collect(runner, request("s5", PROMPTS["s5"], 6)))[0]
    for rid, task in zip(("s0", "s1", "s2", "s3"), early, strict=True):
        out[rid] = (await task)[0]
    return out


def stop_text_for(pipelines: Pipelines) -> str:
    ids, _ = pipelines.run(collect(pipelines.get("solo"), request("probe", PROMPTS["s6"], 8)))
    text = load_tokenizer(pipelines.model_dir).decode(ids[4:6])
    assert text.strip()
    return text


def test_joins_leaves_stops_and_a_long_prompt_match_one_process(pipelines: Pipelines) -> None:
    stop_text = stop_text_for(pipelines)
    expected = pipelines.run(mixed_traffic(pipelines.get("solo"), stop_text))
    assert expected["stop"][1] == "stop"
    for stages in (2, 3):
        assert pipelines.run(mixed_traffic(pipelines.get(f"pipe:{stages}"), stop_text)) \
            == expected


@pytest.mark.slow
def test_kv_bits_8_pipeline_matches_one_process(pipelines: Pipelines) -> None:
    expected = pipelines.run(eight_streams(pipelines.get("solo:kv8")))
    assert pipelines.run(eight_streams(pipelines.get("pipe:2:kv8"))) == expected


async def first_logprobs(runner: RunnerProcess) -> dict[str, list[float]]:
    async def one(rid: str) -> list[float]:
        req = request(rid, PROMPTS[rid], 4, logprobs=True, top_logprobs=5)
        values: list[float] = []
        async for event in runner.generate(req):
            if isinstance(event, TokenChunk) and event.logprobs:
                values += [t.logprob for t in event.logprobs[0].top]
        return values

    results = await asyncio.gather(*(one(rid) for rid in PROMPTS))
    return dict(zip(PROMPTS, results, strict=True))


@pytest.mark.slow
def test_tensor_groups_inside_stages_in_micro_batches(pipelines: Pipelines) -> None:
    """Tensor-parallel sums differ in the last bits, so compare distributions, not tokens (as
    test_pipeline does); greedy ids of concurrent streams also match."""
    expected = pipelines.run(first_logprobs(pipelines.get("solo")))
    head = pipelines.get("hybrid")
    got = pipelines.run(first_logprobs(head))
    for rid in PROMPTS:
        assert len(got[rid]) == len(expected[rid]) == 20
        assert max(abs(a - b) for a, b in zip(got[rid], expected[rid], strict=True)) < 1e-4
    assert pipelines.run(eight_streams(head)) == pipelines.run(
        eight_streams(pipelines.get("solo")))
    assert head.last_stats.get("overlapped_steps_total", 0) > 0


def test_stage_busy_time_moves_under_load(pipelines: Pipelines) -> None:
    """Each stage's busy seconds (flock_stage_busy_seconds_total) rise while streams decode,
    and the last stage projects part of the vocabulary for decode steps."""
    head = pipelines.get("pipe:2")
    pipelines.run(eight_streams(head))

    async def reported() -> dict[str, float]:
        while "stage_busy_seconds_total_1" not in head.last_stats:
            await asyncio.sleep(0.05)
        return dict(head.last_stats)

    before = pipelines.run(reported())
    pipelines.run(eight_streams(head))

    async def moved() -> dict[str, float]:
        while not all(head.last_stats.get(f"stage_busy_seconds_total_{i}", 0)
                      > before[f"stage_busy_seconds_total_{i}"] for i in (0, 1)):
            await asyncio.sleep(0.05)
        return dict(head.last_stats)

    after = pipelines.run(moved())
    assert "stage_busy_seconds_total_2" not in after
    assert 0 < after["head_vocab_share"] < 1


def test_a_lone_long_prompt_in_block_aligned_slices_matches_one_process(
        pipelines: Pipelines) -> None:
    """A prompt prefilled alone goes round in slices ending on the attention kernel's query
    blocks (`ring.lone_prompt_slices`: 500 tokens are 256 + 244); a second that shares its
    first 100 tokens (where the prefix cache has them, its first slice starts mid-block)."""
    first = [(13 * j) % 190 + 3 for j in range(500)]
    second = first[:100] + [(17 * j) % 190 + 3 for j in range(400)]

    async def lone(runner: RunnerProcess) -> list[list[int]]:
        return [(await collect(runner, request(f"lone{i}", p, 8)))[0]
                for i, p in enumerate((first, second))]

    expected = pipelines.run(lone(pipelines.get("solo")))
    for stages in (2, 3):
        assert pipelines.run(lone(pipelines.get(f"pipe:{stages}"))) == expected
