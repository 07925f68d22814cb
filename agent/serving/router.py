"""The router: where this node sends a request for a model — its own head runner, or a peer's.

The cluster controller decides and publishes its decisions here as a `RouteTable` (which
instance serves each model, where that instance's head is, which nodes are not heard from, which
models could be placed); the router only reads the latest table. A request for a model nobody
serves yet is recorded as *demand*, which the controller turns into an on-demand placement, and
the request waits (bounded) for the route to appear.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.engine import ModelNotFound, canonical_name
from agent.generation import GenerationEvent, GenerationRequest
from agent.runtime.client import RunnerProcess
from agent.serving.pool import RunnerPool

# Streams one request from the node holding an instance's head (agent/cluster/remote_head.py).
RemoteStream = Callable[[GenerationRequest], AsyncIterator[GenerationEvent]]


@dataclass(frozen=True)
class HeadRoute:
    """The instance a model's requests go to, and how to reach its head."""

    instance_id: str
    nodes: tuple[str, ...]  # every node the instance spans
    local_key: str | None = None  # the head runner's pool key, when the head is on this node
    remote: RemoteStream | None = None  # when the head is on a peer (None: no address yet)


@dataclass(frozen=True)
class RouteTable:
    """The controller's routing decisions, published whole."""

    node_id: str = ""
    routes: Mapping[str, HeadRoute] = field(default_factory=dict)  # model -> its instance
    down: Mapping[str, str] = field(default_factory=dict)  # node id -> name: not heard from
    placeable: frozenset[str] = frozenset()  # models some node's store holds
    planned: frozenset[str] = frozenset()  # models the spec asks for: wait, never add one


@dataclass(frozen=True)
class Destination:
    """Where one request goes: this node's head runner, or the route's remote head."""

    route: HeadRoute
    runner: RunnerProcess | None

    def open(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if self.runner is not None:
            return self.runner.generate(request)
        assert self.route.remote is not None
        return self.route.remote(request)


class Router:
    POLL_S = 0.2  # how often a waiting request looks again (runners come up in seconds)
    RECHECK_S = 2.0  # how long a request for a model no node lists waits for a fresh table

    def __init__(self, pool: RunnerPool, *, wait_s: float) -> None:
        self.pool = pool
        self.wait_s = wait_s
        self._table = RouteTable()
        self._demand: set[str] = set()
        self._demanded = asyncio.Event()

    # ---- fed by the controller ----------------------------------------------------------------
    def publish(self, table: RouteTable) -> None:
        self._table = table

    def take_demand(self) -> set[str]:
        """Models requests wait for that no instance serves yet (the controller places them)."""
        demand, self._demand = self._demand, set()
        self._demanded.clear()
        return demand

    async def demand_arrived(self) -> None:
        await self._demanded.wait()

    # ---- asked by the engine ------------------------------------------------------------------
    async def route(self, model: str) -> Destination:
        """Where a request for `model` goes; waits (bounded) while its instance is placed, its
        head starts, or a node of it is not heard from. Raises ModelNotFound when no node has
        the model, TimeoutError when it does not come up in time."""
        name = canonical_name(model)
        deadline = time.monotonic() + self.wait_s
        demanded = False
        unlisted: RouteTable | None = None  # the table that listed no holder of the model
        recheck_by = 0.0
        while True:
            table = self._table
            route = table.routes.get(name)
            if route is not None and self.lost(route) is None:
                if route.local_key is not None:
                    runner = self.pool.serving(route.local_key)
                    if runner is not None:
                        return Destination(route, runner)
                elif route.remote is not None:
                    return Destination(route, None)
            elif route is None and not demanded and name not in table.planned:
                if name in table.placeable or Path(name).is_dir():  # a path serves here
                    self._demand.add(name)
                    self._demanded.set()
                    demanded = True
                elif unlisted is None:
                    # The table may predate the model (just pulled, a peer just seen): wake
                    # the controller and decide on the table it publishes next.
                    unlisted, recheck_by = table, time.monotonic() + self.RECHECK_S
                    self._demanded.set()
                elif table is not unlisted or time.monotonic() > recheck_by:
                    raise ModelNotFound(name)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not come up within {self.wait_s:.0f}s")
            await asyncio.sleep(self.POLL_S)

    def lost(self, route: HeadRoute) -> str | None:
        """The name of a node of the route's instance that is not heard from, if any."""
        table = self._table
        for node in route.nodes:
            if node != table.node_id and node in table.down:
                return table.down[node]
        return None

    async def local_head(self, model: str) -> RunnerProcess | None:
        """This node's head runner for `model` (a peer's request for it); while this node is the
        head of its instance and the runner is (re)starting, wait for it (bounded)."""
        name = canonical_name(model)
        deadline = time.monotonic() + self.wait_s
        while True:
            route = self._table.routes.get(name)
            key = route.local_key if route is not None else None
            runner = self.pool.serving(key) if key is not None else None
            if runner is not None or key is None or time.monotonic() > deadline:
                return runner
            await asyncio.sleep(self.POLL_S)

    def head_dir(self, model: str) -> Path | None:
        """The weights directory of this node's head runner for `model`, if it runs one."""
        route = self._table.routes.get(canonical_name(model))
        if route is None or route.local_key is None:
            return None
        return self.pool.model_dir(route.local_key)
