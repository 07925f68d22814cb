"""The runner pool and the router with real runner processes: start, restart with backoff after a
crash, stop when no longer wanted; a request routed to this node's head; shutdown aborts."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from agent.generation import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)
from agent.models.store import ModelStore
from agent.runtime.protocol import RunnerConfig
from agent.serving import pool as pool_module
from agent.serving.engine import NodeEngine
from agent.serving.pool import RunnerPlan, RunnerPool, base_config, resolve_dtype
from agent.serving.router import HeadRoute, Router, RouteTable
from agent.settings import NodeSettings
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


async def until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def located(model_dir: Path) -> Callable[[str, RunnerConfig], Awaitable[Path]]:
    async def locate(model: str, config: RunnerConfig) -> Path:
        return model_dir

    return locate


def test_dtype_and_runner_settings_come_from_node_settings(tmp_path: Path) -> None:
    assert resolve_dtype(NodeSettings(state_dir=tmp_path)) == "float32"  # "auto"
    settings = NodeSettings(state_dir=tmp_path, dtype="bfloat16", max_batch=3,
                            peer_timeout_s=10.0)
    config = base_config(settings, kv_bits=8)
    assert (config.dtype, config.max_batch, config.kv_bits) == ("bfloat16", 3, 8)
    assert config.link_timeout_s == 20.0


def test_the_pool_restarts_a_crashed_runner_and_stops_an_unwanted_one(
        tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "RESTART_BACKOFF_S", (0.1,))
    settings = NodeSettings(state_dir=tmp_path / "state")

    async def main() -> None:
        pool = RunnerPool(settings)
        plan = RunnerPlan("tiny", base_config(settings))
        await pool.apply({"tiny-0/0": plan}, located(tiny_dir))
        await until("the runner", lambda: pool.serving("tiny-0/0") is not None)
        first = pool.serving("tiny-0/0")
        assert first is not None and first.pid is not None
        assert [m for m, _ in pool.heads()] == ["tiny"]
        os.kill(first.pid, signal.SIGKILL)
        await until("the restart", lambda: (r := pool.serving("tiny-0/0")) is not None
                    and r is not first)
        assert [s.state for s in pool.states()] == ["ready"]
        again = pool.serving("tiny-0/0")
        assert again is not None
        await pool.apply({}, located(tiny_dir))
        assert pool.states() == [] and not again.alive
        await pool.close()

    asyncio.run(main())


def test_a_request_goes_to_the_local_head_and_shutdown_ends_it(tiny_dir: Path,
                                                              tmp_path: Path) -> None:
    settings = NodeSettings(state_dir=tmp_path / "state")

    async def main() -> None:
        pool = RunnerPool(settings)
        router = Router(pool, wait_s=30.0)
        engine = NodeEngine(ModelStore(tmp_path / "models"), pool, router)
        await pool.apply({"tiny-0/0": RunnerPlan("tiny", base_config(settings))},
                         located(tiny_dir))
        router.publish(RouteTable(node_id="me", routes={
            "tiny": HeadRoute("tiny-0", ("me",), local_key="tiny-0/0")}))
        request = GenerationRequest(id="a", model="tiny", prompt_tokens=[5, 6, 7],
                                    sampling=SamplingParams(max_tokens=4, temperature=0.0))
        events = [e async for e in engine.generate(request)]  # waits for the runner to start
        assert isinstance(events[0], TokenChunk) and isinstance(events[-1], Finished)
        long = msgspec_replace(request, id="b", max_tokens=400)
        stream = engine.generate(long)
        assert isinstance(await anext(stream), TokenChunk)
        assert engine.in_flight() == 1
        assert engine.abort_all("going away") == 1
        last = [e async for e in stream][-1]
        assert isinstance(last, Failed) and last.code == "unavailable"
        refused = [e async for e in engine.generate(msgspec_replace(request, id="c"))]
        assert isinstance(refused[0], Failed) and refused[0].code == "unavailable"
        await engine.close()

    asyncio.run(main())


def test_a_model_no_node_holds_is_not_found_at_once(tmp_path: Path) -> None:
    settings = NodeSettings(state_dir=tmp_path / "state")

    async def main() -> None:
        pool = RunnerPool(settings)
        router = Router(pool, wait_s=30.0)
        engine = NodeEngine(ModelStore(tmp_path / "models"), pool, router)
        router.publish(RouteTable(node_id="me", placeable=frozenset({"other"})))
        request = GenerationRequest(id="a", model="nothing", prompt_tokens=[5],
                                    sampling=SamplingParams(max_tokens=1))
        started = time.monotonic()
        events = [e async for e in engine.generate(request)]
        assert isinstance(events[0], Failed) and events[0].code == "not_found"
        assert time.monotonic() - started < 5.0
        assert router.take_demand() == set()
        # A model some node holds is demanded (the controller places it) while the request waits.
        waiting = asyncio.create_task(router.route("other"))
        await asyncio.wait_for(router.demand_arrived(), 10)
        assert router.take_demand() == {"other"}
        waiting.cancel()

    asyncio.run(main())


def msgspec_replace(request: GenerationRequest, *, id: str,
                    max_tokens: int | None = None) -> GenerationRequest:
    import msgspec

    sampling = request.sampling if max_tokens is None else msgspec.structs.replace(
        request.sampling, max_tokens=max_tokens)
    return msgspec.structs.replace(request, id=id, sampling=sampling)


def test_a_quiet_remote_stream_fails_once_a_node_of_its_instance_is_not_heard_from(
        tmp_path: Path) -> None:
    """A cut link sends no FIN: the stream must end when membership loses the node."""
    settings = NodeSettings(state_dir=tmp_path / "state")

    async def silent_peer(request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        await asyncio.Event().wait()  # the head's node is cut off: nothing ever arrives
        yield Failed(id=request.id, code="internal", message="unreachable")

    async def main() -> None:
        pool = RunnerPool(settings)
        router = Router(pool, wait_s=30.0)
        engine = NodeEngine(ModelStore(tmp_path / "models"), pool, router)
        route = HeadRoute("m-0", ("me", "peer"), remote=silent_peer)
        router.publish(RouteTable(node_id="me", routes={"m": route}))
        request = GenerationRequest(id="a", model="m", prompt_tokens=[5],
                                    sampling=SamplingParams(max_tokens=1))
        first = asyncio.create_task(anext(engine.generate(request)))
        await until("the request in flight", lambda: engine.in_flight() == 1)
        router.publish(RouteTable(node_id="me", routes={"m": route}, down={"peer": "n2"}))
        event = await asyncio.wait_for(first, 10)
        assert isinstance(event, Failed) and event.code == "internal"
        assert "lost node n2" in event.message

    asyncio.run(main())
