"""The router: where this node sends a request for a model — its own head runner, or a peer's.

The cluster controller decides and publishes its decisions here as a `RouteTable` (the
replicas serving each model, where each one's head is, which nodes are not heard from, which
models could be placed); the router only reads the latest table. Between replicas it picks the
one that answers soonest (`balance.choose_replica`) from their measured loads: this node's
heads measured on the spot, peers' from their reports, plus what this node sent since. A
request for a model nobody serves yet is recorded as *demand*, which the controller turns into
an on-demand placement, and the request waits (bounded) for the route to appear.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.engine import ModelNotFound, canonical_name
from agent.generation import GenerationEvent, GenerationRequest
from agent.runtime.client import RunnerProcess
from agent.serving.balance import (
    Candidate,
    Choice,
    LoadBook,
    PrefixIndex,
    RateMeter,
    ReplicaLoad,
    choose_replica,
    measured_load,
)
from agent.serving.pool import RunnerPool

# Streams one request from the node holding an instance's head (agent/cluster/remote_head.py).
RemoteStream = Callable[[GenerationRequest], AsyncIterator[GenerationEvent]]


@dataclass(frozen=True)
class HeadRoute:
    """One replica of a model: its instance, and how to reach its head."""

    instance_id: str
    nodes: tuple[str, ...]  # every node the instance spans
    local_key: str | None = None  # the head runner's pool key, when the head is on this node
    remote: RemoteStream | None = None  # when the head is on a peer (None: no address yet)
    node_id: str = ""  # the node its head runs on


Routes = HeadRoute | tuple[HeadRoute, ...]


@dataclass(frozen=True)
class RouteTable:
    """The controller's routing decisions, published whole."""

    node_id: str = ""
    # model -> its replicas (one HeadRoute is one replica)
    routes: Mapping[str, Routes] = field(default_factory=dict)
    down: Mapping[str, str] = field(default_factory=dict)  # node id -> name: not heard from
    placeable: frozenset[str] = frozenset()  # models some node's store holds
    planned: frozenset[str] = frozenset()  # models the spec asks for: wait, never add one
    draining: frozenset[str] = frozenset()  # instances that take no new requests

    def replicas(self, model: str) -> tuple[HeadRoute, ...]:
        routes = self.routes.get(model)
        if routes is None:
            return ()
        return routes if isinstance(routes, tuple) else (routes,)


@dataclass(frozen=True)
class Destination:
    """Where one request goes: this node's head runner, or the route's remote head."""

    route: HeadRoute
    runner: RunnerProcess | None
    choice: Choice | None = None

    def open(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if self.runner is not None:
            return self.runner.generate(request)
        assert self.route.remote is not None
        return self.route.remote(request)


@dataclass
class _Report:
    load: ReplicaLoad
    measured_at: float  # this node's monotonic clock


@dataclass
class RouteDecision:
    """One routing choice, as status shows the last few."""

    at: float  # wall clock
    model: str
    instance_id: str
    reason: str
    eta_s: float
    candidates: int


class Router:
    POLL_S = 0.2  # how often a waiting request looks again (runners come up in seconds)
    RECHECK_S = 2.0  # how long a request for a model no node lists waits for a fresh table
    REPORT_STALE_S = 5.0  # a peer's load report older than this is not used

    def __init__(self, pool: RunnerPool, *, wait_s: float, metrics: Any = None) -> None:
        self.pool = pool
        self.wait_s = wait_s
        self.metrics = metrics  # FlockMetrics (set by the cluster controller), or None
        self._table = RouteTable()
        self._demand: set[str] = set()
        self._demanded = asyncio.Event()
        self.outgoing = LoadBook()  # requests this node sent to peers' heads
        self.serving = LoadBook()  # requests this node's head runners run (its own, peers')
        self.prefixes = PrefixIndex()
        self._reports: dict[str, _Report] = {}
        self._rates: dict[str, float] = {}  # last measured decode rate per local head
        self._meters: dict[str, RateMeter] = {}  # windowed decode rate per local head
        self.decisions: deque[RouteDecision] = deque(maxlen=20)

    # ---- fed by the controller ----------------------------------------------------------------
    def publish(self, table: RouteTable) -> None:
        self._table = table
        served = {r.instance_id for routes in table.routes.values()
                  for r in (routes if isinstance(routes, tuple) else (routes,))}
        for book in (self._reports, self._meters, self._rates):
            for instance_id in [i for i in book if i not in served]:
                del book[instance_id]
        self.serving.forget(served)
        self.outgoing.forget(served)

    def take_reports(self, loads: Iterable[ReplicaLoad], received_at: float | None = None) -> None:
        """Peers' measured loads of their heads (from their `/cluster/load`)."""
        now = time.monotonic() if received_at is None else received_at
        for load in loads:
            self._reports[load.instance_id] = _Report(load, now - load.age_s)

    def take_demand(self) -> set[str]:
        """Models requests wait for that no instance serves yet (the controller places them)."""
        demand, self._demand = self._demand, set()
        self._demanded.clear()
        return demand

    async def demand_arrived(self) -> None:
        await self._demanded.wait()

    # ---- loads --------------------------------------------------------------------------------
    def local_load(self, route: HeadRoute) -> ReplicaLoad | None:
        """This node's head of `route`, measured now (None when it does not run here)."""
        if route.local_key is None:
            return None
        runner = self.pool.serving(route.local_key)
        stats = dict(runner.last_stats) if runner is not None else {}
        rate = stats.get("decode_tokens_per_second", 0.0)
        if "decode_seconds_total" in stats and "generated_tokens_total" in stats:
            # Over the last window of decode time: the last interval alone is a burst's tail.
            meter = self._meters.setdefault(route.instance_id, RateMeter())
            rate = meter.feed(stats["generated_tokens_total"], stats["decode_seconds_total"])
        if rate > 0:
            self._rates[route.instance_id] = rate
        # An idle runner reports a rate of 0; its last measured one says how fast it will go.
        stats["decode_tokens_per_second"] = self._rates.get(route.instance_id, 0.0)
        max_batch = runner.config.max_batch if runner is not None else 0
        return measured_load(route.instance_id, self._table.node_id, stats, max_batch,
                             self.serving, ready=runner is not None)

    def busy_within(self, window_s: float) -> bool:
        """Whether this node sent or ran a request within the last `window_s` seconds."""
        return self.serving.busy_within(window_s) or self.outgoing.busy_within(window_s)

    def local_loads(self) -> list[ReplicaLoad]:
        """Loads of every head this node runs (what `/cluster/load` answers)."""
        return [load for routes in self._table.routes.values()
                for r in (routes if isinstance(routes, tuple) else (routes,))
                if (load := self.local_load(r)) is not None]

    def all_loads(self) -> dict[str, ReplicaLoad]:
        """instance id -> load, of every replica measured here or reported fresh enough."""
        now = time.monotonic()
        loads = {i: r.load for i, r in self._reports.items()
                 if now - r.measured_at <= self.REPORT_STALE_S}
        loads.update({load.instance_id: load for load in self.local_loads()})
        return loads

    def load_of(self, route: HeadRoute) -> ReplicaLoad | None:
        """A replica's load: measured here, or its node's last report (fresh enough)."""
        if route.local_key is not None:
            return self.local_load(route)
        report = self._reports.get(route.instance_id)
        if report is None or time.monotonic() - report.measured_at > self.REPORT_STALE_S:
            return None
        return report.load

    def candidate(self, route: HeadRoute) -> Candidate:
        load = self.load_of(route)
        if route.local_key is not None or load is None:
            requests, tokens = (0, 0) if route.local_key is not None else \
                self.outgoing.since(route.instance_id, 0.0)
            return Candidate(route.instance_id, route.local_key is not None, load,
                             unreported_tokens=tokens, unreported_requests=requests)
        report = self._reports[route.instance_id]
        requests, tokens = self.outgoing.since(route.instance_id, report.measured_at)
        return Candidate(route.instance_id, False, load, unreported_tokens=tokens,
                         unreported_requests=requests)

    # ---- asked by the engine ------------------------------------------------------------------
    async def route(self, model: str, request: GenerationRequest | None = None, *,
                    exclude: frozenset[str] = frozenset()) -> Destination:
        """Where a request for `model` goes: the replica that answers soonest (see `balance`);
        waits (bounded) while its instances are placed, their heads start, or a node of them is
        not heard from. `exclude`: replicas already tried. Raises ModelNotFound when no node
        has the model, TimeoutError when it does not come up in time."""
        name = canonical_name(model)
        deadline = time.monotonic() + self.wait_s
        demanded = False
        unlisted: RouteTable | None = None  # the table that listed no holder of the model
        recheck_by = 0.0
        while True:
            table = self._table
            replicas = table.replicas(name)
            usable = self._usable(replicas, exclude)
            if usable:
                return self._choose(name, usable, request)
            if not replicas and not demanded and name not in table.planned:
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

    def _usable(self, replicas: Iterable[HeadRoute], exclude: frozenset[str]
                ) -> list[tuple[HeadRoute, RunnerProcess | None]]:
        """Replicas a new request may go to now: reachable, every node heard from, not tried,
        not draining (a draining one still serves when it is the only one left)."""
        usable = []
        for route in replicas:
            if route.instance_id in exclude or self.lost(route) is not None:
                continue
            if route.local_key is not None:
                runner = self.pool.serving(route.local_key)
                if runner is not None:
                    usable.append((route, runner))
            elif route.remote is not None:
                usable.append((route, None))
        fresh = [u for u in usable if u[0].instance_id not in self._table.draining]
        return fresh or usable

    def _choose(self, model: str, usable: list[tuple[HeadRoute, RunnerProcess | None]],
                request: GenerationRequest | None) -> Destination:
        by_id = {route.instance_id: (route, runner) for route, runner in usable}
        tokens = request.prompt_tokens if request is not None else []
        holder = self.prefixes.holder(tokens, by_id) if tokens else None
        choice = choose_replica([self.candidate(r) for r, _ in usable], holder)
        route, runner = by_id[choice.instance_id]
        if request is not None:
            self.prefixes.record(tokens, choice.instance_id)
            self.decisions.append(RouteDecision(time.time(), model, choice.instance_id,
                                                choice.reason, choice.eta_s, len(usable)))
            if self.metrics is not None:
                self.metrics.replica_routed(model, choice.instance_id, choice.reason)
        return Destination(route, runner, choice)

    def alternatives(self, model: str, exclude: frozenset[str]) -> bool:
        """Whether `model` has a replica not in `exclude` whose nodes are all heard from."""
        return any(r.instance_id not in exclude and self.lost(r) is None
                   for r in self._table.replicas(canonical_name(model)))

    def lost(self, route: HeadRoute) -> str | None:
        """The name of a node of the route's instance that is not heard from, if any."""
        table = self._table
        for node in route.nodes:
            if node != table.node_id and node in table.down:
                return table.down[node]
        return None

    def _local_route(self, model: str, instance_id: str | None) -> HeadRoute | None:
        for route in self._table.replicas(canonical_name(model)):
            if route.local_key is not None and instance_id in (None, route.instance_id):
                return route
        return None

    async def local_head(self, model: str, instance_id: str | None = None
                         ) -> tuple[str, RunnerProcess] | None:
        """This node's head runner for `model` (a peer's request for it), the one of
        `instance_id` when given; while this node is the head of such an instance and the
        runner is (re)starting, wait for it (bounded). (instance id, runner), or None."""
        deadline = time.monotonic() + self.wait_s
        while True:
            route = self._local_route(model, instance_id)
            key = route.local_key if route is not None else None
            runner = self.pool.serving(key) if key is not None else None
            if route is not None and runner is not None:
                return route.instance_id, runner
            if key is None or time.monotonic() > deadline:
                return None
            await asyncio.sleep(self.POLL_S)

    def head_dir(self, model: str) -> Path | None:
        """The weights directory of this node's head runner for `model`, if it runs one."""
        route = self._local_route(model, None)
        if route is None or route.local_key is None:
            return None
        return self.pool.model_dir(route.local_key)
