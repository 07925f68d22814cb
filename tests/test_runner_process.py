"""The runner as a real subprocess: streaming, concurrency, crash handling, bad models."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from agent.generation import Failed, Finished, GenerationRequest, SamplingParams, TokenChunk
from agent.runtime.client import RunnerProcess, RunnerStartError
from agent.runtime.environment import runner_environment
from agent.runtime.protocol import RunnerConfig
from agent.settings import NodeSettings
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def runner_for(model_dir: Path, tmp_path: Path, **config: object) -> RunnerProcess:
    env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state"))
    return RunnerProcess(RunnerConfig(model_name="tiny", model_dir=str(model_dir), **config), env)


def greedy(rid: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(id=rid, model="tiny", prompt_tokens=[5, 6, 7, 8],
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def collect(runner: RunnerProcess, request: GenerationRequest) -> tuple[list[int], object]:
    tokens: list[int] = []
    async for event in runner.generate(request):
        if isinstance(event, TokenChunk):
            tokens += event.token_ids
        else:
            return tokens, event
    raise AssertionError("stream ended without a final event")


def test_concurrent_requests_stream_and_finish(tiny_dir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        runner = runner_for(tiny_dir, tmp_path)
        ready = await runner.start()
        assert ready.context_length == 512 and ready.kv_bytes_per_token > 0
        try:
            alone = await collect(runner, greedy("solo", 20))
            results = await asyncio.gather(*(collect(runner, greedy(f"r{i}", 20))
                                             for i in range(4)))
            for tokens, end in results:
                assert isinstance(end, Finished) and end.reason == "length"
                assert tokens == alone[0]
        finally:
            await runner.stop()
        assert not runner.alive

    asyncio.run(main())


def test_killed_runner_fails_in_flight_requests_promptly(tiny_dir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        runner = runner_for(tiny_dir, tmp_path)
        await runner.start()
        stream = runner.generate(greedy("long", 400))
        first = await anext(stream)
        assert isinstance(first, TokenChunk)
        assert runner.pid is not None
        os.kill(runner.pid, signal.SIGKILL)
        killed = time.monotonic()
        last = None
        async for event in stream:
            last = event
        assert isinstance(last, Failed) and last.code == "internal"
        assert "exit" in last.message
        assert time.monotonic() - killed < 5.0
        # A new request on the dead runner fails at once instead of hanging.
        _, end = await collect(runner, greedy("after", 3))
        assert isinstance(end, Failed)

    asyncio.run(main())


def test_abandoned_stream_cancels_in_the_runner(tiny_dir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        runner = runner_for(tiny_dir, tmp_path, stats_interval_s=0.05)
        await runner.start()
        try:
            stream = runner.generate(greedy("gone", 400))
            await anext(stream)
            await stream.aclose()  # what a client disconnect does
            for _ in range(100):
                await asyncio.sleep(0.05)
                if runner.last_stats.get("active") == 0.0:
                    break
            assert runner.last_stats.get("active") == 0.0
            assert runner.last_stats["generated_tokens_total"] < 400
        finally:
            await runner.stop()

    asyncio.run(main())


def test_a_model_that_cannot_load_reports_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "mamba"}')

    async def main() -> None:
        runner = runner_for(broken, tmp_path)
        with pytest.raises(RunnerStartError, match="mamba"):
            await runner.start(timeout=120)
        assert not runner.alive

    asyncio.run(main())
