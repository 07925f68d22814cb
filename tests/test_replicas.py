"""Replicas (pure and in-process): the spec's replica settings, several replicas on one pinned
node, `replicas = "auto"`, and a request moved to another replica when its first one fails
before streaming (real engine and router, peer streams standing in for remote heads)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from agent.cluster.placement import memory_needed
from agent.cluster.reconcile import (
    DesiredInstance,
    DesiredState,
    ObservedState,
    apply,
    desired_from_spec,
    plan,
    plan_with_problems,
)
from agent.generation import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
    Usage,
)
from agent.models.store import ModelStore
from agent.serving.engine import NodeEngine
from agent.serving.pool import RunnerPool
from agent.serving.router import HeadRoute, Router, RouteTable
from agent.settings import NodeSettings
from agent.spec import ClusterSpec, ModelEntry, parse_spec
from tests.test_placement import SMOLLM2, node

GiB = 1 << 30
SHAPES = {"m": SMOLLM2.model_copy(update={"name": "m"})}


def test_the_spec_takes_replicas_auto_and_scaling_settings() -> None:
    spec, errors = parse_spec('[[models]]\nmodel = "m"\nreplicas = 2\nnodes = ["a"]\n'
                              'max_replicas = 3\nscale_up_wait_s = 0.5\nscale_up_after_s = 1\n'
                              'keep_alive = 30\n\n[[models]]\nmodel = "n"\nreplicas = "auto"\n')
    assert errors == [] and spec is not None
    assert spec.models[0].max_replicas == 3 and spec.models[0].keep_alive == 30.0
    assert spec.models[1].replicas == "auto"
    _, errors = parse_spec('[[models]]\nmodel = "m"\nreplicas = 3\nmax_replicas = 2\n')
    assert [e.path for e in errors] == ["models[0].max_replicas"]
    _, errors = parse_spec('[[models]]\nmodel = "m"\nreplicas = "many"\n')
    assert [e.path for e in errors] == ["models[0].replicas"]


def test_two_replicas_share_one_pinned_node_where_memory_allows() -> None:
    spec = ClusterSpec(models=[ModelEntry(model="m", replicas=2, nodes=["node0"])])
    desired = desired_from_spec(spec, SHAPES)
    big = ObservedState(nodes=[node(0, 8 * GiB)])
    after = apply(plan(desired, big), big)
    assert sorted(p.instance_id for p in after.placements) == ["m-0", "m-1"]
    assert {p.head_node for p in after.placements} == {"n0"}
    assert plan(desired, after) == []
    # Room for one only: the second is a problem with its reason, the first still runs.
    need = memory_needed(SHAPES["m"], after.placements[0])["n0"]
    small = ObservedState(nodes=[node(0, need * 3 // 2)])
    actions, problems = plan_with_problems(desired, small)
    assert [p.instance_id for p in apply(actions, small).placements] == ["m-0"]
    assert [p.instance_id for p in problems] == ["m-1"]


def test_auto_replicas_put_one_on_each_node_the_model_fits() -> None:
    spec = ClusterSpec(models=[ModelEntry(model="m", replicas="auto")])
    desired = desired_from_spec(spec, SHAPES)
    nodes = [node(0, 8 * GiB), node(1, 8 * GiB), node(2, 100 << 20)]
    after = apply(plan(desired, ObservedState(nodes=nodes)), ObservedState(nodes=nodes))
    assert sorted(p.head_node for p in after.placements) == ["n0", "n1"]
    assert plan(desired, after) == []
    # A node joining that fits gets one more.
    grown = after.model_copy(update={"nodes": [*nodes, node(3, 8 * GiB)]})
    grown = apply(plan(desired, grown), grown)
    assert sorted(p.head_node for p in grown.placements) == ["n0", "n1", "n3"]


def test_api_replicas_are_placed_like_spec_ones() -> None:
    desired = DesiredState(instances=[DesiredInstance(key="api-m", model="m", replicas=2,
                                                      owner="api")], shapes=SHAPES)
    nodes = [node(0, 8 * GiB), node(1, 8 * GiB)]
    after = apply(plan(desired, ObservedState(nodes=nodes)), ObservedState(nodes=nodes))
    assert sorted((p.instance_id, p.head_node) for p in after.placements) == [
        ("api-m-0", "n0"), ("api-m-1", "n1")] or sorted(
        (p.instance_id, p.head_node) for p in after.placements) == [
        ("api-m-0", "n1"), ("api-m-1", "n0")]


# --- retry before the first token (real engine and router) ----------------------------------


def _peer(name: str, calls: list[str], *, fail_at: int | None) -> HeadRoute:
    async def stream(request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        calls.append(name)
        for i in range(3):
            if fail_at == i:
                yield Failed(id=request.id, code="internal", message=f"{name} died")
                return
            await asyncio.sleep(0)
            yield TokenChunk(id=request.id, text=f"{name}{i} ", token_ids=[i])
        yield Finished(id=request.id, reason="length",
                       usage=Usage(prompt_tokens=1, completion_tokens=3))

    return HeadRoute(f"m-{name}", (f"node-{name}",), remote=stream, node_id=f"node-{name}")


async def _run(engine: NodeEngine) -> list[GenerationEvent]:
    request = GenerationRequest(id="r1", model="m", prompt_tokens=[1, 2, 3],
                                sampling=SamplingParams(max_tokens=3))
    return [e async for e in engine.generate(request)]


def test_a_request_failed_before_its_first_token_moves_to_another_replica(tmp_path: Path) -> None:
    async def main() -> None:
        settings = NodeSettings(state_dir=tmp_path, models_dir=tmp_path / "models")
        pool = RunnerPool(settings)
        router = Router(pool, wait_s=5.0)
        engine = NodeEngine(ModelStore(tmp_path / "models"), pool, router)
        calls: list[str] = []
        # "a" looks idle (chosen first) and dies before streaming; "b" answers.
        router.publish(RouteTable(node_id="me", routes={"m": (
            _peer("a", calls, fail_at=0), _peer("b", calls, fail_at=None))}))
        events = await _run(engine)
        assert calls == ["a", "b"]
        assert "".join(e.text for e in events if isinstance(e, TokenChunk)) == "b0 b1 b2 "
        assert isinstance(events[-1], Finished)
        # Once a token streamed, a failure is the request's own: not redone elsewhere.
        calls.clear()
        router.publish(RouteTable(node_id="me", routes={"m": (
            _peer("a", calls, fail_at=1), _peer("b", calls, fail_at=None))}))
        events = await _run(engine)
        assert calls == ["a"] and isinstance(events[-1], Failed)
        # With no other replica left, the failure is the answer.
        calls.clear()
        router.publish(RouteTable(node_id="me", routes={"m": (_peer("a", calls, fail_at=0),)}))
        events = await _run(engine)
        assert calls == ["a"] and isinstance(events[-1], Failed)

    asyncio.run(main())
