"""Pipeline parallel across real runner processes linked by TCP on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from agent.generation import Failed, Finished, GenerationRequest, SamplingParams, TokenChunk
from agent.runtime.client import RunnerProcess
from agent.runtime.environment import runner_environment
from agent.runtime.protocol import RunnerConfig
from agent.settings import NodeSettings
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", layers=6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pipeline_configs(model_dir: Path, splits: list[tuple[int, int]], **extra: object
                     ) -> list[RunnerConfig]:
    ports = [free_port() for _ in splits]
    configs = []
    for i, (start, stop) in enumerate(splits):
        downstream = ports[(i + 1) % len(splits)]
        configs.append(RunnerConfig(
            model_name="tiny", model_dir=str(model_dir), role="head" if i == 0 else "follower",
            layer_start=start, layer_stop=stop, listen=f"127.0.0.1:{ports[i]}",
            downstream=f"127.0.0.1:{downstream}", **extra))
    return configs


async def start_all(configs: list[RunnerConfig], tmp_path: Path) -> list[RunnerProcess]:
    env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state", blas_threads=1))
    runners = [RunnerProcess(c, env) for c in configs]
    await asyncio.gather(*(r.start(timeout=120) for r in runners))
    return runners


def prompt_request(rid: str, prompt: list[int], n: int) -> GenerationRequest:
    return GenerationRequest(id=rid, model="tiny", prompt_tokens=prompt,
                             sampling=SamplingParams(max_tokens=n, temperature=0.0))


async def tokens(runner: RunnerProcess, request: GenerationRequest) -> tuple[list[int], object]:
    out: list[int] = []
    async for event in runner.generate(request):
        if isinstance(event, TokenChunk):
            out += event.token_ids
        else:
            return out, event
    raise AssertionError("no final event")


PROMPTS = {"a": [5, 6, 7, 8, 9], "b": list(range(20, 70)), "c": [100, 3]}


async def run_prompts(runner: RunnerProcess) -> dict[str, list[int]]:
    results = await asyncio.gather(*(tokens(runner, prompt_request(k, p, 16))
                                     for k, p in PROMPTS.items()))
    for _, end in results:
        assert isinstance(end, Finished)
    # A second turn that extends "b" exercises the prefix cache across stages.
    turn2 = PROMPTS["b"] + results[1][0] + [7, 7]
    again, end = await tokens(runner, prompt_request("b2", turn2, 8))
    assert isinstance(end, Finished)
    return {**{k: r[0] for k, r in zip(PROMPTS, results, strict=True)}, "b2": again,
            "b2_cached": [end.usage.cached_tokens]}


def test_three_stage_pipeline_generates_what_one_process_does(tiny_dir: Path,
                                                              tmp_path: Path) -> None:
    async def main() -> None:
        solo = (await start_all([RunnerConfig(model_name="tiny", model_dir=str(tiny_dir))],
                                tmp_path))[0]
        try:
            expected = await run_prompts(solo)
        finally:
            await solo.stop()
        runners = await start_all(pipeline_configs(tiny_dir, [(0, 2), (2, 4), (4, 6)]), tmp_path)
        try:
            got = await run_prompts(runners[0])
        finally:
            for r in runners:
                await r.stop()
        assert got == expected
        assert got["b2_cached"][0] > len(PROMPTS["b"])

    asyncio.run(main())


def test_killing_a_follower_fails_the_stream_within_seconds(tiny_dir: Path,
                                                            tmp_path: Path) -> None:
    async def main() -> None:
        runners = await start_all(
            pipeline_configs(tiny_dir, [(0, 3), (3, 6)], link_timeout_s=3.0), tmp_path)
        head, follower = runners
        try:
            stream = head.generate(prompt_request("long", [5, 6, 7], 450))
            assert isinstance(await anext(stream), TokenChunk)
            assert follower.pid is not None
            os.kill(follower.pid, signal.SIGKILL)
            killed = time.monotonic()
            last = None
            async for event in stream:
                last = event
            assert isinstance(last, Failed) and "stage" in last.message
            assert time.monotonic() - killed < 5.0
        finally:
            for r in runners:
                await r.stop()

    asyncio.run(main())


def tensor_configs(model_dir: Path, ranks: int) -> list[RunnerConfig]:
    ring = [f"127.0.0.1:{free_port()}" for _ in range(ranks)]
    links = [f"127.0.0.1:{free_port()}" for _ in range(ranks)]
    return [
        RunnerConfig(model_name="tiny", model_dir=str(model_dir),
                     role="solo" if rank == 0 else "tp_follower", tp_rank=rank, tp_hosts=ring,
                     tp_peers=links[1:] if rank == 0 else [], listen=links[rank])
        for rank in range(ranks)
    ]


async def first_logprobs(runner: RunnerProcess) -> list[float]:
    """The top-5 logprobs of a fixed prompt's first 4 greedy tokens, from a real runner."""
    request = GenerationRequest(
        id="lp", model="tiny", prompt_tokens=list(range(5, 40)),
        sampling=SamplingParams(max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=5))
    values = []
    async for event in runner.generate(request):
        if isinstance(event, TokenChunk) and event.logprobs:
            values += [t.logprob for t in event.logprobs[0].top]
    return values


def test_tensor_parallel_logits_match_one_process(tiny_dir: Path, tmp_path: Path) -> None:
    """Tiny random models have near-tied logits, so compare the distributions, not tokens."""

    async def main() -> None:
        solo = (await start_all([RunnerConfig(model_name="tiny", model_dir=str(tiny_dir))],
                                tmp_path))[0]
        try:
            expected = await first_logprobs(solo)
        finally:
            await solo.stop()
        runners = await start_all(tensor_configs(tiny_dir, 2), tmp_path)
        try:
            got = await first_logprobs(runners[0])
            results = await asyncio.gather(*(tokens(runners[0], prompt_request(k, p, 8))
                                             for k, p in PROMPTS.items()))
            assert all(isinstance(end, Finished) for _, end in results)
        finally:
            for r in runners:
                await r.stop()
        assert len(got) == len(expected) == 20
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4

    asyncio.run(main())


def hybrid_configs(model_dir: Path, splits: list[tuple[int, int]], ranks: int
                   ) -> list[RunnerConfig]:
    """Pipeline stages, each a tensor group of `ranks` processes."""
    stage_links = [f"127.0.0.1:{free_port()}" for _ in splits]
    configs = []
    for i, (start, stop) in enumerate(splits):
        ring = [f"127.0.0.1:{free_port()}" for _ in range(ranks)]
        peers = [f"127.0.0.1:{free_port()}" for _ in range(ranks - 1)]
        for rank in range(ranks):
            common = {"model_name": "tiny", "model_dir": str(model_dir), "layer_start": start,
                      "layer_stop": stop, "tp_rank": rank, "tp_hosts": ring}
            if rank == 0:
                configs.append(RunnerConfig(
                    role="head" if i == 0 else "follower", listen=stage_links[i],
                    downstream=stage_links[(i + 1) % len(splits)], tp_peers=peers, **common))
            else:
                configs.append(RunnerConfig(role="tp_follower", listen=peers[rank - 1],
                                            **common))
    return configs


def test_hybrid_tensor_groups_inside_pipeline_stages(tiny_dir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        solo = (await start_all([RunnerConfig(model_name="tiny", model_dir=str(tiny_dir))],
                                tmp_path))[0]
        request = GenerationRequest(
            id="lp", model="tiny", prompt_tokens=list(range(5, 40)),
            sampling=SamplingParams(max_tokens=4, temperature=0.0, logprobs=True,
                                    top_logprobs=5))

        async def logprobs(runner: RunnerProcess) -> list[float]:
            values = []
            async for event in runner.generate(request):
                if isinstance(event, TokenChunk) and event.logprobs:
                    values += [t.logprob for t in event.logprobs[0].top]
            return values

        try:
            expected = await logprobs(solo)
        finally:
            await solo.stop()
        runners = await start_all(hybrid_configs(tiny_dir, [(0, 3), (3, 6)], 2), tmp_path)
        try:
            got = await logprobs(runners[0])
        finally:
            for r in runners:
                await r.stop()
        assert len(got) == len(expected) == 20
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4

    asyncio.run(main())
