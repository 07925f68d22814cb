"""The cluster control plane of one agent: who is here, what should run where, and making it so.

Loops, all thin around pure decisions:
- discovery + membership keep the peer table (agent/cluster/discovery.py, membership.py);
- the leader (lowest compatible node id, `leader.elect`) turns the accepted spec plus API and
  on-demand requests into placements (`reconcile.plan`), gives each new instance a port slot,
  and pushes the resulting *assignment* to every node;
- every node converges its own runners on the assignment (`wiring.runner_configs`);
- requests for a model go to the node holding its head (`route`), placing it first on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
from pydantic import BaseModel, ConfigDict, Field

from agent import __version__, sysinfo
from agent.cluster.auth import auth_mode, effective_secret
from agent.cluster.discovery import Discovery, DiscoveryConfig, StaticPeers
from agent.cluster.identity import load_or_create
from agent.cluster.leader import compatible, elect
from agent.cluster.membership import Membership, PeerTable
from agent.cluster.peers import (
    PeerClient,
    PeerError,
    base_url,
    signed_headers,
)
from agent.cluster.reconcile import (
    DesiredInstance,
    ObservedState,
    Place,
    Problem,
    Remove,
    desired_from_spec,
    plan_with_problems,
)
from agent.cluster.shape import model_shape
from agent.cluster.state import ModelShape, NodeProfile, Placement
from agent.cluster.wiring import WiringError, free_slot, runner_configs
from agent.engine import ModelInfo, ModelNotFound
from agent.generation import Failed, Finished, GenerationEvent, GenerationRequest
from agent.local_engine import LocalEngine, RemoteStream, canonical_name
from agent.runtime.protocol import FrameBuffer, RunnerConfig
from agent.settings import NodeSettings
from agent.spec import ClusterSpec, VersionedSpec, parse_spec, spec_hash

log = logging.getLogger("flock.cluster")

ASSIGNMENT_PATH = "/cluster/assignment"
GENERATE_PATH = "/cluster/generate"
PUSH_EVERY_S = 5.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER_S = 60.0  # a runner that served this long before dying restarts after the 1st delay
WATCH_S = 0.5  # a remote stream idle this long checks that its instance's nodes are alive
STUCK_AFTER_S = 2.0  # a head with requests and no step for this long, and a node lost: stop it
_event_decoder = msgspec.msgpack.Decoder(GenerationEvent)


COMPUTE_PROBE = r"""
import time, mlx.core as mx
a = mx.random.normal((512, 576)); b = mx.random.normal((576, 1536)); mx.eval(a, b)
mx.eval(a @ b)
n, start = 0, time.perf_counter()
while time.perf_counter() - start < 0.3:
    mx.eval(a @ b); n += 1
print(2 * 512 * 576 * 1536 * n / (time.perf_counter() - start) / 1e9)
"""


async def measure_compute(settings: NodeSettings) -> tuple[str, float]:
    """(BLAS in use, matmul GFLOP/s) as a runner of this node sees them: a short probe in a
    runner's environment, so speed-aware placement compares what runners will really do."""
    import sys

    from agent.runtime.blas import describe_blas
    from agent.runtime.environment import runner_environment

    blas = await asyncio.to_thread(describe_blas, settings)
    env, _ = runner_environment(settings)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", COMPUTE_PROBE, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(process.communicate(), 30)
        return blas, round(float(out.decode().strip() or 0.0), 1)
    except (TimeoutError, ValueError, OSError) as exc:
        log.warning("compute probe failed: %s", exc)
        return blas, 0.0


class Assignment(BaseModel):
    """The leader's decision, as every node receives it."""

    model_config = ConfigDict(frozen=True)

    generation: int = 0
    leader: str = ""
    placements: list[Placement] = Field(default_factory=list)
    slots: dict[str, int] = Field(default_factory=dict)
    requested: list[DesiredInstance] = Field(default_factory=list)
    spec: VersionedSpec | None = None
    problems: list[Problem] = Field(default_factory=list)


class Member:
    """One runner this node runs for a placed instance."""

    def __init__(self, key: str, model: str, config: RunnerConfig) -> None:
        self.key = key
        self.model = model
        self.config = config
        self.task: asyncio.Task[None] | None = None
        self.failures = 0
        self.state = "starting"
        self.detail = ""
        self.ready_at = 0.0
        self.stats_seen: object = None  # the runner's last stats message, to see it step
        self.stats_at = 0.0


class ClusterController:
    def __init__(self, settings: NodeSettings, engine: LocalEngine, *,
                 spec: ClusterSpec | None = None, metrics: Any = None) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self._rtt_peers: set[str] = set()  # peers flock_peer_rtt_seconds has a series for
        self.identity = load_or_create(settings.state_dir)
        self.local_spec = spec
        # Keys-only mode (API keys, no secret) signs with a secret derived from the first key,
        # so every node of such a cluster lists the same first key; no key is sent to peers.
        self.secret = effective_secret(settings, spec)
        self.auth_mode = auth_mode(settings, spec)
        self.cluster_name = spec.cluster.name if spec else settings.cluster_name
        self.client = PeerClient(node_id=self.node_id, secret=self.secret,
                                 timeout_s=settings.peer_timeout_s)
        self.stream_client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None),
                                               trust_env=False)
        self.table = PeerTable(self.profile(), interval_s=settings.discovery_interval_s,
                               suspect_after=settings.suspect_after_missed,
                               dead_after=settings.dead_after_missed)
        self.membership = Membership(self.table, fetch_profile=self._fetch_profile)
        self.discovery: Discovery | None = None
        self.assignment = Assignment()
        self.members: dict[str, Member] = {}
        self.shapes: dict[str, ModelShape] = {}
        # Models only other nodes hold: name -> (info, shape), from a holder.
        self.catalogue: dict[str, tuple[ModelInfo, ModelShape]] = {}
        self.spec_errors: list[str] = []
        self._addresses: list[str] = []
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._last_push = 0.0
        self._started = time.monotonic()
        self._take_over = True  # learn the cluster's assignment before leading (see _lead)
        if spec is not None:
            # The secret never travels: assignments carry the spec without it.
            self.assignment = Assignment(spec=VersionedSpec.first(spec))

    # ---- identity and profile -------------------------------------------------------------
    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def profile(self) -> NodeProfile:
        s = self.settings
        spec = self.assignment.spec if hasattr(self, "assignment") else None
        return NodeProfile(
            node_id=self.node_id,
            name=s.node_name or platform.node() or self.node_id[:8],
            version=__version__,
            addresses=list(getattr(self, "_addresses", [])) or [self._fallback_address()],
            api_port=s.port,
            backend=sysinfo.backend_name(),  # type: ignore[arg-type]
            memory_total_bytes=sysinfo.total_memory_bytes(),
            memory_available_bytes=sysinfo.available_memory_bytes(),
            memory_cap_bytes=s.memory_cap_bytes,
            compute_gflops=getattr(self, "compute_gflops", 0.0),
            blas=getattr(self, "blas", ""),
            spec_generation=spec.generation if spec else 0,
            spec_hash=spec.hash if spec else "",
            models=sorted(m.name for m in self.engine.store.list()),
            data_port=s.data_port_base,
        )

    def _fallback_address(self) -> str:
        host = self.settings.host
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    def nodes(self) -> dict[str, NodeProfile]:
        """Every node we believe alive (suspects included: they may be slow, not gone)."""
        profiles = {p.node_id: p for p in self.membership.snapshot(include_suspect=True)}
        profiles[self.node_id] = self.profile()
        return profiles

    @property
    def leader(self) -> str | None:
        return elect(list(self.nodes().values()), version=__version__)

    @property
    def is_leader(self) -> bool:
        return self.leader == self.node_id

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        if self.auth_mode == "keys":
            log.info("keys-only mode: members sign with a cluster secret derived from the first "
                     "API key; every node of this cluster must list the same first key")
        self.blas, self.compute_gflops = await measure_compute(s)
        if s.discovery_enabled:
            config = DiscoveryConfig(
                cluster=self.cluster_name, secret=self.secret,
                interfaces=tuple(s.discovery_interfaces), group=s.discovery_group,
                port=s.discovery_port, interval_s=s.discovery_interval_s,
                multicast=s.discovery_multicast, broadcast=s.discovery_broadcast,
                window_s=s.auth_window_s)
            self.discovery = Discovery(config, self.identity, profile=self._beacon_profile,
                                       on_sighting=self.membership.on_sighting,
                                       on_incompatible=self.membership.on_incompatible,
                                       on_rekey=self._on_rekey)
            await self.discovery.start()
            self._addresses = [a.address for a in self.discovery.addresses]
            self.membership.set_self(self.profile())
        self._started = time.monotonic()
        self.membership.add_callback(self._on_membership)
        self._tasks.append(asyncio.create_task(self.membership.run(self._stop)))
        static = self._static_targets()
        if static:
            peers = StaticPeers(static, self.client, self.cluster_name,
                                self.membership.on_sighting, lambda: self.node_id,
                                default_port=s.port, interval_s=s.discovery_interval_s)
            self._tasks.append(asyncio.create_task(peers.run(self._stop)))
        self._tasks.append(asyncio.create_task(self._loop()))

    def _static_targets(self) -> list[str]:
        spec = self.local_spec
        if spec is None:
            return []
        return [n.address for n in spec.nodes if n.address]

    def _beacon_profile(self) -> NodeProfile:
        return self.profile()

    def _on_membership(self, event: Any) -> None:
        if event.kind in ("join", "restart"):
            # A node (re)appeared: after a partition heals it may hold another leader's
            # assignment, so the leader reconciles the assignments before it leads again.
            self._take_over = True
        self._wake.set()

    def _settle_s(self) -> float:
        """How long a starting node listens before it may lead: long enough to hear every
        live peer's beacons, so the first placement does not see a one-node cluster."""
        s = self.settings
        if not s.discovery_enabled and not self._static_targets():
            return 0.0
        return max(2, s.suspect_after_missed) * s.discovery_interval_s

    def _on_rekey(self, identity: Any) -> None:
        self.identity = identity
        self.client.node_id = identity.node_id
        self.membership.set_self(self.profile())

    async def _fetch_profile(self, node_id: str) -> NodeProfile | None:
        for view in self.membership.views():
            if view.profile.node_id == node_id and view.profile.addresses:
                reply, _ = await self.client.get_profile(
                    base_url(view.profile.addresses[0], view.profile.api_port))
                return reply.profile
        return None

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for member in self.members.values():
            if member.task:
                member.task.cancel()
        if self.discovery:
            await self.discovery.stop()
        await self.client.aclose()
        await self.stream_client.aclose()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self._refresh_catalogue()
                settled = time.monotonic() - self._started >= self._settle_s()
                if self.is_leader and settled:
                    if self._take_over:
                        self._take_over = False
                        await self._adopt_cluster_assignment()
                    await self._lead()
                elif not self.is_leader:
                    self._take_over = True  # when leadership comes back here, learn first
                await self._converge()
                self._publish_metrics()
            except Exception:
                log.exception("cluster loop step failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    def _publish_metrics(self) -> None:
        if self.metrics is None:
            return
        from agent.metrics import PlacementRow

        self.metrics.set_node_memory(sysinfo.total_memory_bytes(),
                                     sysinfo.available_memory_bytes())
        exported: set[str] = set()
        for view in self.membership.views():
            if view.profile.node_id == self.node_id:
                continue  # views() lists this node first, with a round trip of 0
            if view.status != "dead" and view.rtt_ms is not None:
                name = view.profile.name or view.profile.node_id
                self.metrics.set_peer_rtt(name, view.rtt_ms / 1000)
                exported.add(name)
        for name in self._rtt_peers - exported:  # dead or forgotten: no stale round trip
            self.metrics.forget_peer(name)
        self._rtt_peers = exported
        rows = []
        me = self.profile().name
        for placement in self.assignment.placements:
            rank = 0
            for stage in placement.stages:
                for node in stage.nodes:
                    if node == self.node_id:
                        rows.append(PlacementRow(placement.model, placement.instance_id, me,
                                                 rank, stage.layer_start, stage.layer_stop))
                    rank += 1
        self.metrics.set_placements(rows)

    # ---- the leader -----------------------------------------------------------------------
    def _shape(self, model: str) -> ModelShape | None:
        if model not in self.shapes:
            try:
                self.shapes[model] = model_shape(self.engine.store.resolve(model), model)
            except (ModelNotFound, OSError, ValueError, KeyError) as exc:
                remote = self.catalogue.get(model)
                if remote is None:
                    log.debug("no shape for %s: %s", model, exc)
                    return None
                self.shapes[model] = remote[1]
        return self.shapes[model]

    async def _refresh_catalogue(self) -> None:
        """Info and shape of models other nodes hold and this one does not (for placement,
        `/v1/models` and the APIs' context checks), asked once from a holder."""
        local = {m.name for m in self.engine.store.list()}
        for profile in self.nodes().values():
            if profile.node_id == self.node_id or not profile.addresses:
                continue
            for model in profile.models:
                if model in local or model in self.catalogue:
                    continue
                url = (base_url(profile.addresses[0], profile.api_port)
                       + f"/cluster/models/{quote(model, safe='')}/info")
                try:
                    response = await self.client.request("GET", url)
                    if response.status_code == 200:
                        data = response.json()
                        self.catalogue[model] = (
                            msgspec.convert(data["info"], ModelInfo),
                            ModelShape.model_validate(data["shape"]))
                except (PeerError, ValueError, KeyError, msgspec.ValidationError) as exc:
                    log.debug("no info for %s from %s: %s", model, profile.name, exc)

    def remote_info(self, model: str) -> ModelInfo | None:
        entry = self.catalogue.get(canonical_name(model))
        return entry[0] if entry else None

    async def _fetch_assignment(self, peer: NodeProfile) -> Assignment | None:
        try:
            response = await self.client.request(
                "GET", base_url(peer.addresses[0], peer.api_port) + ASSIGNMENT_PATH)
            if response.status_code != 200:
                return None
            return Assignment.model_validate_json(response.content)
        except (PeerError, ValueError) as exc:
            log.debug("could not read %s's assignment: %s", peer.name, exc)
            return None

    async def _adopt_cluster_assignment(self) -> None:
        """Start leading from what the cluster already runs, not from what this node holds.

        A node that just started (or restarted) as the leader holds no assignment, and after a
        partition heals each side holds its own leader's. The new leader reads every peer's
        assignment and continues from the one most nodes hold (then the newest), so instances
        that stayed healthy keep running; its generations continue above every one seen, so
        no node refuses them as stale. The newest spec wins; API requests are merged.
        """
        peers = [p for p in self.nodes().values() if p.node_id != self.node_id and p.addresses]
        fetched = await asyncio.gather(*(self._fetch_assignment(p) for p in peers))
        held = [a for a in [self.assignment, *fetched] if a is not None and a.generation > 0]
        if not held:
            return
        votes: dict[tuple[str, int], int] = {}
        for a in held:
            votes[(a.leader, a.generation)] = votes.get((a.leader, a.generation), 0) + 1
        leader, generation = max(votes, key=lambda k: (votes[k], k[1], k[0]))
        base = next(a for a in held if (a.leader, a.generation) == (leader, generation))
        spec = self.assignment.spec
        for a in held:
            if a.spec is not None and a.spec.newer_than(spec):
                spec = a.spec
        requested = list(base.requested)
        for a in held:
            requested += [r for r in a.requested if all(r.key != q.key for q in requested)]
        if base is not self.assignment:
            log.info("continuing from %s's assignment (generation %d, held by %d of %d nodes)",
                     leader[:8] or "?", generation, votes[(leader, generation)], len(held))
        self.assignment = base.model_copy(update={
            "generation": max(a.generation for a in held), "spec": spec,
            "requested": requested})

    async def _lead(self) -> None:
        current = self.assignment
        spec = current.spec.spec if current.spec else ClusterSpec.model_validate({})
        desired_models = {e.model for e in spec.models} | {r.model for r in current.requested}
        shapes = {m: s for m in desired_models if (s := self._shape(m)) is not None}
        desired = desired_from_spec(spec, shapes, current.requested)
        nodes = [n for n in self.nodes().values() if compatible(n.version, __version__)]
        observed = ObservedState(nodes=nodes, placements=current.placements,
                                 version=__version__)
        actions, problems = plan_with_problems(desired, observed)
        placements = {p.instance_id: p for p in current.placements}
        slots = dict(current.slots)
        moved: dict[str, int] = {}  # re-laid instances: the slot (ports) they leave
        for action in actions:
            if isinstance(action, Remove):
                placements.pop(action.instance_id, None)
                slots.pop(action.instance_id, None)
            elif isinstance(action, Place):
                new, old = action.placement, placements.get(action.placement.instance_id)
                placements[new.instance_id] = new
                relaid = old is None or old.model != new.model or old.stages != new.stages
                if relaid and new.instance_id in slots:
                    # New ports for a new layout: a runner of the old layout that has not been
                    # stopped yet (or restarted) must not take the new layout's connections.
                    moved[new.instance_id] = slots.pop(new.instance_id)
        taken: dict[str, set[int]] = {}
        for instance_id, slot in slots.items():
            for node in placements[instance_id].nodes():
                taken.setdefault(node, set()).add(slot)
        for instance_id, placement in sorted(placements.items()):
            if instance_id not in slots:
                avoid = {n: taken.get(n, set()) | {moved[instance_id]} for n in placement.nodes()
                         } if instance_id in moved else taken
                slots[instance_id] = free_slot(placement, avoid)
                for node in placement.nodes():
                    taken.setdefault(node, set()).add(slots[instance_id])
        changed = (list(placements.values()) != current.placements or slots != current.slots
                   or current.leader != self.node_id or problems != current.problems)
        if changed:
            self.assignment = current.model_copy(update={
                "generation": current.generation + 1, "leader": self.node_id,
                "placements": list(placements.values()), "slots": slots, "problems": problems})
            for problem in problems:
                log.warning("cannot serve %s: %s", problem.instance_id, problem.message)
        if changed or time.monotonic() - self._last_push > PUSH_EVERY_S:
            await self._push()

    async def _push(self) -> None:
        self._last_push = time.monotonic()
        body = self.assignment.model_dump(mode="json")
        peers = [p for p in self.nodes().values() if p.node_id != self.node_id and p.addresses]

        async def send(peer: NodeProfile) -> None:
            try:
                await self.client.request("POST", base_url(peer.addresses[0], peer.api_port)
                                          + ASSIGNMENT_PATH, json_body=body)
            except PeerError as exc:
                log.debug("push to %s failed: %s", peer.name, exc)

        await asyncio.gather(*(send(p) for p in peers))

    def accept_assignment(self, assignment: Assignment) -> bool:
        """A peer's assignment is taken when it comes from whom we consider the leader."""
        leader = self.leader
        current = self.assignment
        if assignment.leader != leader:
            return False
        if assignment.leader == current.leader and assignment.generation < current.generation:
            return False
        spec = assignment.spec
        if spec is None or (current.spec and current.spec.generation > spec.generation):
            spec = current.spec
        self.assignment = assignment.model_copy(update={"spec": spec})
        self._wake.set()
        return True

    # ---- requests for placements ------------------------------------------------------------
    async def request_instance(self, model: str, *, strategy: str = "auto",
                               nodes: list[str] | None = None, owner: str = "api") -> str:
        """Ask for an instance of `model` (leader records it; others forward to the leader)."""
        model = canonical_name(model)
        key = "".join(c if c.isalnum() else "-" for c in model.lower()).strip("-") or "model"
        entry = DesiredInstance(key=f"{owner}-{key}", model=model, strategy=strategy,  # type: ignore[arg-type]
                                nodes=nodes, owner=owner)  # type: ignore[arg-type]
        if self.is_leader:
            if not any(r.key == entry.key for r in self.assignment.requested):
                self.assignment = self.assignment.model_copy(
                    update={"requested": [*self.assignment.requested, entry]})
            self._wake.set()
            return f"{entry.key}-0"
        leader = self.nodes().get(self.leader or "")
        if leader is None:
            raise PeerError("no leader is reachable")
        response = await self.client.request(
            "POST", base_url(leader.addresses[0], leader.api_port) + "/cluster/instances",
            json_body={"model": model, "strategy": strategy, "nodes": nodes, "owner": owner})
        if response.status_code >= 400:
            raise PeerError(response.text)
        return str(response.json()["instance_id"])

    async def remove_instance(self, instance_id: str) -> str | None:
        """None when removed; otherwise why not ("not_found", "spec", or the leader's answer)."""
        if not self.is_leader:
            leader = self.nodes().get(self.leader or "")
            if leader is None:
                return "no leader is reachable"
            response = await self.client.request(
                "DELETE", base_url(leader.addresses[0], leader.api_port)
                + f"/cluster/instances/{instance_id}")
            return {200: None, 404: "not_found", 409: "spec"}.get(response.status_code,
                                                                 response.text)
        placement = next((p for p in self.assignment.placements
                          if p.instance_id == instance_id), None)
        requested = [r for r in self.assignment.requested
                     if instance_id not in r.instance_ids()]
        if placement is None and len(requested) == len(self.assignment.requested):
            return "not_found"
        if placement is not None and placement.owner == "spec":
            return "spec"
        self.assignment = self.assignment.model_copy(update={"requested": requested})
        self._wake.set()
        return None

    def propose_spec(self, text: str) -> list[str]:
        """A new cluster.toml (from a file edit or `flock apply`): errors, or [] when taken."""
        spec, errors = parse_spec(text)
        if spec is None:
            return [str(e) for e in errors]
        digest = spec_hash(spec)
        current = self.assignment.spec
        if current is not None and current.hash == digest:
            return []
        generation = (current.generation if current else 0) + 1
        self.assignment = self.assignment.model_copy(update={
            "spec": VersionedSpec(generation=generation, hash=digest,
                                  spec=spec.without_secret())})
        self._wake.set()
        return []

    # ---- every node: converge local runners --------------------------------------------------
    def _base_config(self, model: str = "") -> RunnerConfig:
        s = self.settings
        spec = self.assignment.spec
        entry = next((m for m in spec.spec.models if canonical_name(m.model) == model),
                     None) if spec else None
        return RunnerConfig(model_name="", model_dir="", max_batch=s.max_batch,
                            context_length=entry.context_length if entry else None,
                            kv_bits=entry.kv_bits if entry else None,
                            max_queue=s.max_queue, prefill_chunk=s.prefill_chunk,
                            prefill_gap_steps=s.prefill_gap_steps,
                            memory_cap_bytes=s.memory_cap_bytes, compile_step=s.compile_step,
                            kv_budget_bytes=s.kv_budget_bytes,
                            prefix_cache_bytes=s.prefix_cache_bytes,
                            fuse_projections=s.fuse_projections,
                            link_timeout_s=max(5.0, s.peer_timeout_s * 2))

    def wanted_members(self) -> dict[str, tuple[str, RunnerConfig]]:
        profiles = self.nodes()
        wanted: dict[str, tuple[str, RunnerConfig]] = {}
        for placement in self.assignment.placements:
            slot = self.assignment.slots.get(placement.instance_id)
            if slot is None or self.node_id not in placement.nodes():
                continue
            try:
                configs = runner_configs(placement, slot, profiles,
                                         self._base_config(placement.model))
            except WiringError as exc:
                log.warning("cannot wire %s: %s", placement.instance_id, exc)
                continue
            for (node, rank), config in configs.items():
                if node == self.node_id:
                    wanted[f"{placement.instance_id}/{rank}"] = (placement.model, config)
        return wanted

    async def _converge(self) -> None:
        wanted = self.wanted_members()
        for key in list(self.members):
            member = self.members[key]
            if key not in wanted or wanted[key][1] != member.config:
                await self._stop_member(key)
        for key, (model, config) in wanted.items():
            member = self.members.get(key)
            if member is None:
                member = self.members[key] = Member(key, model, config)
            if member.task is None or member.task.done():
                runner = self.engine.members.get(key)
                if runner is None or not runner.alive:
                    if member.state == "ready":
                        self._member_died(member, runner)
                    member.task = asyncio.create_task(self._run_member(member, len(wanted)))
        await self._stop_stuck_heads()

    async def _stop_stuck_heads(self) -> None:
        """Fail the requests of a head whose instance lost a node, now rather than at its link
        deadline: a head (pipeline head, tensor rank 0) with requests in flight that has not
        stepped for STUCK_AFTER_S (runners report stats after steps, about every second) while
        a node of its placement is not heard from is stopped; its requests end with an error,
        and the runner restarts (or moves, once the node is gone) like any dead runner."""
        now = time.monotonic()
        placements = {p.instance_id: p for p in self.assignment.placements}
        for key, member in list(self.members.items()):
            runner = self.engine.members.get(key)
            if runner is None or not runner.alive or member.state != "ready":
                continue
            if member.config.role != "head" and not member.config.tp_peers:
                continue
            if runner.last_stats is not member.stats_seen:
                member.stats_seen, member.stats_at = runner.last_stats, now
                continue
            if runner.in_flight == 0 or now - member.stats_at < STUCK_AFTER_S:
                continue
            placement = placements.get(key.rsplit("/", 1)[0])
            lost = self._lost_node(placement) if placement is not None else None
            if lost is None:
                continue
            log.warning("runner %s has not stepped for %.1fs and node %s is not heard from: "
                        "stopping it so that its %d requests fail now", key,
                        now - member.stats_at, lost, runner.in_flight)
            await runner.stop(grace=0)

    def _member_died(self, member: Member, runner: Any) -> None:
        """A runner that was serving exited: count it, and restart it with backoff."""
        code = getattr(getattr(runner, "_process", None), "returncode", None)
        stable = time.monotonic() - member.ready_at > STABLE_AFTER_S
        member.failures = 1 if stable else member.failures + 1
        member.state, member.detail = "failed", f"runner exited (code {code})"
        log.warning("runner %s exited with code %s; restarting", member.key, code)

    async def _run_member(self, member: Member, local_ranks: int) -> None:
        if member.failures:
            delay = RESTART_BACKOFF_S[min(member.failures - 1, len(RESTART_BACKOFF_S) - 1)]
            await asyncio.sleep(delay)
            if self.metrics is not None:
                self.metrics.runner_restarted(member.model, member.key)
        member.state = "starting"
        started = time.monotonic()
        try:
            await self.engine.stop_member(member.key)
            await self.engine.start_member(member.key, member.model, member.config,
                                           ranks_on_this_machine=local_ranks)
            member.state, member.detail = "ready", ""
            member.ready_at = time.monotonic()
            log.info("runner %s (%s, layers %s-%s) ready in %.1fs", member.key, member.config.role,
                     member.config.layer_start, member.config.layer_stop,
                     member.ready_at - started)
        except Exception as exc:
            member.failures += 1
            member.state, member.detail = "failed", str(exc)
            log.warning("runner %s failed to start: %s", member.key, exc)
            self._wake.set()

    async def _stop_member(self, key: str) -> None:
        member = self.members.pop(key, None)
        if member and member.task and not member.task.done():
            member.task.cancel()
        await self.engine.stop_member(key)

    # ---- routing (LocalEngine's Router) -----------------------------------------------------
    def _placement_for(self, model: str) -> Placement | None:
        found = [p for p in self.assignment.placements if p.model == model]
        local = [p for p in found if p.head_node == self.node_id]
        return (local or found or [None])[0]

    def _spec_wants(self, model: str) -> bool:
        """The spec already asks for this model: wait for its placement, add no other."""
        spec = self.assignment.spec
        return spec is not None and any(canonical_name(m.model) == model
                                        for m in spec.spec.models)

    async def route(self, model: str) -> RemoteStream | None:
        name = canonical_name(model)
        deadline = time.monotonic() + self.settings.placement_wait_s
        requested = False
        while True:
            placement = self._placement_for(name)
            if placement is not None and self._lost_node(placement) is not None:
                pass  # a member is suspect or gone: wait for it or for the re-placement
            elif placement is not None:
                head = placement.head_node
                if head == self.node_id:
                    instance = self.engine.instances.get(name)
                    if instance is not None and instance.runner.ready is not None \
                            and instance.runner.alive:
                        return None
                else:
                    profile = self.nodes().get(head)
                    if profile is not None and profile.addresses:
                        return self._remote(profile, placement)
            elif not requested and not self._spec_wants(name):
                holders = [p for p in self.nodes().values() if name in p.models]
                if not holders and not Path(name).is_dir():  # a local path serves here
                    raise ModelNotFound(name)
                await self.request_instance(name, owner="auto")
                requested = True
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not come up within "
                                   f"{self.settings.placement_wait_s:.0f}s")
            self._wake.set()
            await asyncio.sleep(0.2)

    def _lost_node(self, placement: Placement) -> str | None:
        """The name of a node of `placement` that is not heard from (suspect, gone), if any."""
        for node in placement.nodes():
            if node != self.node_id and self.table.status(node) != "alive":
                profile = self.nodes().get(node)
                return profile.name if profile is not None else node[:8]
        return None

    def _remote(self, profile: NodeProfile, placement: Placement) -> RemoteStream:
        url = base_url(profile.addresses[0], profile.api_port) + GENERATE_PATH

        async def pump(request: GenerationRequest,
                       out: asyncio.Queue[GenerationEvent | Exception | None]) -> None:
            body = msgspec.msgpack.encode(request)
            headers = signed_headers(self.secret, self.node_id, "POST", GENERATE_PATH, body)
            try:
                async with self.stream_client.stream("POST", url, content=body,
                                                     headers=headers) as response:
                    if response.status_code != 200:
                        await response.aread()
                        out.put_nowait(Failed(id=request.id, code="internal",
                                              message=f"node {profile.name} refused: "
                                                      f"{response.status_code} "
                                                      f"{response.text[:200]}"))
                        return
                    frames = FrameBuffer()
                    async for chunk in response.aiter_bytes():
                        for frame_body in frames.feed(chunk):
                            out.put_nowait(_event_decoder.decode(frame_body))
            except httpx.HTTPError as exc:
                out.put_nowait(exc)
            finally:
                out.put_nowait(None)

        async def stream(request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
            # The response is read by a task; while it is quiet, the stream checks that every
            # node of the instance is still heard from. A cut link sends no FIN: without this
            # check the request would hang until the head's own stage deadline (or forever,
            # when the head itself is cut off).
            events: asyncio.Queue[GenerationEvent | Exception | None] = asyncio.Queue()
            reader = asyncio.create_task(pump(request, events))
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(events.get(), WATCH_S)
                    except TimeoutError:
                        lost = self._lost_node(placement)
                        if lost is not None:
                            yield Failed(id=request.id, code="internal",
                                         message=f"lost node {lost} serving the model "
                                                 "(not heard from)")
                            return
                        continue
                    if item is None:
                        yield Failed(id=request.id, code="internal",
                                     message=f"node {profile.name} ended the stream early")
                        return
                    if isinstance(item, Exception):
                        yield Failed(id=request.id, code="internal",
                                     message=f"lost node {profile.name} serving the model: "
                                             f"{item}")
                        return
                    yield item
                    if isinstance(item, Finished | Failed):
                        return
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

        return stream

    # ---- status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        spec = self.assignment.spec
        local_hash = spec_hash(self.local_spec) if self.local_spec else None
        views = {v.profile.node_id: v for v in self.membership.views()}
        nodes = []
        for node_id, profile in sorted(self.nodes().items()):
            view = views.get(node_id)
            nodes.append({
                **profile.model_dump(mode="json"),
                "status": "self" if node_id == self.node_id else
                (view.status if view is not None else "unknown"),
                "rtt_ms": view.rtt_ms if view is not None else None,
                "leader": node_id == self.leader,
            })
        return {
            "node_id": self.node_id,
            "cluster": self.cluster_name,
            "leader": self.leader,
            "assignment_generation": self.assignment.generation,
            "spec": {
                "generation": spec.generation if spec else 0,
                "hash": spec.hash if spec else None,
                "local_file": None if local_hash is None else
                ("in sync" if spec and spec.hash == local_hash else "differs"),
                "errors": self.spec_errors,
            },
            "nodes": nodes,
            "incompatible": [v.__dict__ if hasattr(v, "__dict__") else str(v)
                             for v in self.membership.incompatible()],
            "placements": [{**p.model_dump(mode="json"), "head": p.head_node,
                            "slot": self.assignment.slots.get(p.instance_id)}
                           for p in self.assignment.placements],
            "runners": [{"key": m.key, "model": m.model, "role": m.config.role,
                         "layers": [m.config.layer_start, m.config.layer_stop],
                         "state": m.state if self._alive(m.key) or m.state != "ready"
                         else "failed", "detail": m.detail}
                        for m in self.members.values()],
            "problems": [p.model_dump(mode="json") for p in self.assignment.problems],
        }

    def _alive(self, key: str) -> bool:
        runner = self.engine.members.get(key)
        return runner is not None and runner.alive

    # ---- spec file watch --------------------------------------------------------------------
    async def watch_spec_file(self, path: Path) -> None:
        """Editing cluster.toml is a deploy: a valid edit is proposed, an invalid one reported."""
        last = None
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                stat = path.stat()
                mark = (stat.st_mtime_ns, stat.st_size)
                if mark != last:
                    last = mark
                    self.reload_spec_file(path)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)

    def reload_spec_file(self, path: Path) -> None:
        text = path.read_text()
        spec, errors = parse_spec(text)
        if spec is None:
            self.spec_errors = [str(e) for e in errors]
            log.error("%s is invalid; nothing changes: %s", path, "; ".join(self.spec_errors))
            return
        self.spec_errors = []
        self.local_spec = spec
        if self.is_leader:
            self.propose_spec(text)
        else:
            task = asyncio.create_task(self._send_spec_to_leader(text))
            self._tasks.append(task)

    async def _send_spec_to_leader(self, text: str) -> None:
        leader = self.nodes().get(self.leader or "")
        if leader is None:
            return
        try:
            await self.client.request("POST", base_url(leader.addresses[0], leader.api_port)
                                      + "/cluster/spec", content=text.encode())
        except PeerError as exc:
            log.warning("could not send the new spec to the leader: %s", exc)
