"""The cluster control plane of one agent: who is here, what should run where, and making it so.

One loop, thin around decisions made elsewhere:
- discovery + membership keep the peer table (agent/cluster/discovery.py, membership.py);
- the leader (lowest compatible node id, `leader.elect`) turns the accepted spec plus API and
  on-demand requests into an assignment (`assignment.next_assignment`) and pushes it to every
  node; a node that starts leading continues from what the cluster runs (`continue_from`);
- every node hands its share of the assignment to its runner pool (`convergence`);
- the routing decisions go to the node's router as a `RouteTable` (`routes`), and the router's
  demand (requests for a model nobody serves) comes back as on-demand placements.
The controller decides; the engine's pool and router carry the decisions out.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent import __version__, sysinfo
from agent.cluster.assignment import ASSIGNMENT_PATH, Assignment, continue_from, next_assignment
from agent.cluster.auth import auth_mode, effective_secret
from agent.cluster.autoscale import ScaleMemory, scale_assignment
from agent.cluster.catalogue import ModelCatalogue
from agent.cluster.compute_probe import ComputeSpeed, measure_speed
from agent.cluster.convergence import MemberConvergence
from agent.cluster.discovery import Discovery, DiscoveryConfig, StaticPeers
from agent.cluster.identity import load_or_create
from agent.cluster.leader import elect
from agent.cluster.link_probe import LinkMeter
from agent.cluster.load_reports import LoadReports
from agent.cluster.membership import Membership, PeerTable
from agent.cluster.peers import PeerClient, PeerError, base_url
from agent.cluster.reconcile import DesiredInstance
from agent.cluster.remote_head import RemoteHeads
from agent.cluster.routes import lost_node, route_table
from agent.cluster.shard_source import ShardSource
from agent.cluster.spec_watch import SpecFileWatch
from agent.cluster.state import NodeProfile, Placement
from agent.cluster.status import ClusterMetrics, status_report
from agent.engine import ModelInfo, ModelNotFound, canonical_name
from agent.models.store import ModelStore
from agent.runtime.kernels import describe_kernels
from agent.runtime.protocol import RunnerConfig
from agent.sampled import Sampled
from agent.serving.pool import RunnerPool
from agent.serving.router import Router
from agent.settings import NodeSettings
from agent.spec import ClusterSpec, VersionedSpec, draft_errors, parse_spec, spec_hash

log = logging.getLogger("flock.cluster")

PUSH_EVERY_S = 5.0
# How stale this node's own store listing and free memory may be in its profile.
LOCAL_FACTS_MAX_AGE_S = 1.0


@dataclass(frozen=True)
class LocalFacts:
    models: tuple[str, ...]  # what the store holds
    memory_available_bytes: int


class ClusterController:
    def __init__(self, settings: NodeSettings, *, store: ModelStore, pool: RunnerPool,
                 router: Router, spec: ClusterSpec | None = None, metrics: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.router = router
        self.identity = load_or_create(settings.state_dir)
        # Keys-only mode (API keys, no secret) signs with a secret derived from the first key,
        # so every node of such a cluster lists the same first key; no key is sent to peers.
        self.secret = effective_secret(settings, spec)
        self.auth_mode = auth_mode(settings, spec)
        self.cluster_name = spec.cluster.name if spec else settings.cluster_name
        # The secret never travels: assignments carry the spec without it.
        self.assignment = Assignment(spec=VersionedSpec.first(spec)) if spec else Assignment()
        self.speed = ComputeSpeed("", 0.0, 0.0, "")  # measured in start()
        self._kernels = describe_kernels(settings)  # looks for the built file; loads nothing
        self._addresses: list[str] = []
        # This node's own facts that cost I/O to read (the store's manifests; vm_stat on
        # macOS): every view of the cluster includes this node's profile (see agent/sampled.py).
        self.local_facts = Sampled(self._read_local_facts, LOCAL_FACTS_MAX_AGE_S)
        self.client = PeerClient(node_id=self.node_id, secret=self.secret,
                                 timeout_s=settings.peer_timeout_s)
        self.link_meter = LinkMeter(self.client)
        self.stream_client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None),
                                               trust_env=False)
        self.table = PeerTable(self.profile(), interval_s=settings.discovery_interval_s,
                               suspect_after=settings.suspect_after_missed,
                               dead_after=settings.dead_after_missed)
        self.membership = Membership(self.table, fetch_profile=self._fetch_profile)
        self.discovery: Discovery | None = None
        self.catalogue = ModelCatalogue(store, self.client)
        self.shards = ShardSource(self.stream_client, settings.models_dir, secret=self.secret,
                                  node_id=lambda: self.node_id,
                                  peers=lambda: list(self.nodes().values()))
        self.convergence = MemberConvergence(pool, store, self.shards)
        self.remote_heads = RemoteHeads(self.stream_client, self.secret, lambda: self.node_id)
        self.spec_watch = SpecFileWatch(spec, self._deploy_spec_text)
        self.pool = pool
        self._metrics = ClusterMetrics(metrics) if metrics is not None else None
        self.router.metrics = metrics
        self.loads = LoadReports(self.client, router, self.peers)
        self._scale_memory = ScaleMemory()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._last_push = 0.0
        self._started = time.monotonic()
        self._take_over = True  # learn the cluster's assignment before leading (see _loop)
        self.publish_routes()

    # ---- identity and profile -------------------------------------------------------------
    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def _read_local_facts(self) -> LocalFacts:
        return LocalFacts(models=tuple(sorted(m.name for m in self.store.list())),
                          memory_available_bytes=sysinfo.available_memory_bytes())

    def profile(self) -> NodeProfile:
        s = self.settings
        spec = self.assignment.spec
        facts = self.local_facts.get()
        return NodeProfile(
            node_id=self.node_id,
            name=s.node_name or platform.node() or self.node_id[:8],
            version=__version__,
            addresses=list(self._addresses) or [self._fallback_address()],
            api_port=s.port,
            backend=sysinfo.backend_name(),  # type: ignore[arg-type]
            memory_total_bytes=sysinfo.total_memory_bytes(),
            memory_available_bytes=facts.memory_available_bytes,
            memory_cap_bytes=s.memory_cap_bytes,
            compute_gflops=self.speed.matmul_gflops,
            decode_gflops=self.speed.matvec_gflops,
            probe_key=self.speed.key,
            links=self.link_meter.links(self.table.rtts_ms()) if hasattr(self, "table") else {},
            blas=self.speed.blas,
            kernels=self._kernels,
            spec_generation=spec.generation if spec else 0,
            spec_hash=spec.hash if spec else "",
            models=list(facts.models),
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

    def peers(self) -> list[NodeProfile]:
        """The other nodes we believe alive, with an address to reach them at."""
        return [p for p in self.nodes().values() if p.node_id != self.node_id and p.addresses]

    @property
    def leader(self) -> str | None:
        return elect(list(self.nodes().values()), version=__version__)

    @property
    def is_leader(self) -> bool:
        return self.leader == self.node_id

    def _leader_url(self) -> str | None:
        leader = self.nodes().get(self.leader or "")
        return base_url(leader.addresses[0], leader.api_port) if leader is not None else None

    # ---- models other nodes hold (the engine's PeerModels) -------------------------------
    def remote_info(self, model: str) -> ModelInfo | None:
        return self.catalogue.remote_info(model)

    def remote_models(self) -> list[ModelInfo]:
        return self.catalogue.remote_models()

    async def fetch_tokenizer(self, model: str) -> Path:
        return await self.shards.tokenizer(model)

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        if self.auth_mode == "keys":
            log.info("keys-only mode: members sign with a cluster secret derived from the first "
                     "API key; every node of this cluster must list the same first key")
        self.speed = await measure_speed(s)
        if s.discovery_enabled:
            config = DiscoveryConfig(
                cluster=self.cluster_name, secret=self.secret,
                interfaces=tuple(s.discovery_interfaces), group=s.discovery_group,
                port=s.discovery_port, interval_s=s.discovery_interval_s,
                multicast=s.discovery_multicast, broadcast=s.discovery_broadcast,
                window_s=s.auth_window_s)
            self.discovery = Discovery(config, self.identity, profile=self.profile,
                                       on_sighting=self.membership.on_sighting,
                                       on_incompatible=self.membership.on_incompatible,
                                       on_rekey=self._on_rekey)
            await self.discovery.start()
            self._addresses = [a.address for a in self.discovery.addresses]
            self.membership.set_self(self.profile())
        self._started = time.monotonic()
        self.membership.add_callback(self._on_membership)
        self._tasks.append(asyncio.create_task(self.membership.run(self._stop)))
        self._tasks.append(asyncio.create_task(self.loads.run(self._stop)))
        static = self._static_targets()
        if static:
            peers = StaticPeers(static, self.client, self.cluster_name,
                                self.membership.on_sighting, lambda: self.node_id,
                                default_port=s.port, interval_s=s.discovery_interval_s)
            self._tasks.append(asyncio.create_task(peers.run(self._stop)))
        self.publish_routes()
        self._tasks.append(asyncio.create_task(self._loop()))

    def _static_targets(self) -> list[str]:
        spec = self.spec_watch.local_spec
        return [n.address for n in spec.nodes if n.address] if spec is not None else []

    def _on_membership(self, event: Any) -> None:
        if event.kind in ("join", "restart"):
            self.link_meter.peer_seen(event.profile, int(event.at * 1000))
            # A node (re)appeared: after a partition heals it may hold another leader's
            # assignment, so the leader reconciles the assignments before it leads again.
            self._take_over = True
        self.publish_routes()  # a node not heard from: requests stop going to its instances
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
        if self.discovery:
            await self.discovery.stop()
        await self.client.aclose()
        await self.stream_client.aclose()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.catalogue.refresh(self.peers())
                await self._place_demand()
                settled = time.monotonic() - self._started >= self._settle_s()
                if self.is_leader and settled:
                    if self._take_over:
                        self._take_over = False
                        await self.adopt_cluster_assignment()
                    await self._lead()
                elif not self.is_leader:
                    self._take_over = True  # when leadership comes back here, learn first
                profiles = self.nodes()
                await self.convergence.converge(self.assignment, profiles, self.node_id)
                await self.convergence.stop_stuck_heads(self.assignment, self.lost_node)
                self.publish_routes()
                if self._metrics is not None:
                    self._metrics.publish(self.node_id, self.profile().name,
                                          self.membership.views(), self.assignment,
                                          self.router)
            except Exception:
                log.exception("cluster loop step failed")
            self._wake.clear()
            await self._idle(1.0)

    async def _idle(self, timeout: float) -> None:
        """Until something changed (a peer, an assignment, a request's demand) or `timeout`."""
        waits = [asyncio.ensure_future(self._wake.wait()),
                 asyncio.ensure_future(self.router.demand_arrived())]
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()

    # ---- decisions handed to the router -----------------------------------------------------
    def lost_node(self, placement: Placement) -> str | None:
        """The name of a node of `placement` that is not heard from, if any."""
        return lost_node(placement, self.node_id, self.table.status, self.nodes())

    def publish_routes(self) -> None:
        self.router.publish(route_table(self.assignment, self.node_id, self.nodes(),
                                        self.table.status, self.remote_heads))

    async def _place_demand(self) -> None:
        """Requests wait for models no instance serves: place them (the router checked that a
        node holds each, and that the spec does not already ask for it)."""
        for model in sorted(self.router.take_demand()):
            try:
                await self.request_instance(model, owner="auto")
            except PeerError as exc:
                log.warning("could not place %s on demand: %s", model, exc)

    # ---- the leader -------------------------------------------------------------------------
    async def fetch_assignment(self, peer: NodeProfile) -> Assignment | None:
        try:
            response = await self.client.request(
                "GET", base_url(peer.addresses[0], peer.api_port) + ASSIGNMENT_PATH)
            if response.status_code != 200:
                return None
            return Assignment.model_validate_json(response.content)
        except (PeerError, ValueError) as exc:
            log.debug("could not read %s's assignment: %s", peer.name, exc)
            return None

    async def adopt_cluster_assignment(self) -> None:
        """Continue from the assignment the cluster holds (see `assignment.continue_from`)."""
        fetched = await asyncio.gather(*(self.fetch_assignment(p) for p in self.peers()))
        self.assignment = continue_from(self.assignment, list(fetched))

    def requested_dtype(self, model: str) -> str:
        """What `model`'s runners should load: its cluster.toml entry's `dtype`, else this
        (the leader's) node's `dtype` setting; "auto" is resolved with the shape."""
        spec = self.assignment.spec
        entry = next((m for m in spec.spec.models if canonical_name(m.model) == model),
                     None) if spec else None
        return (entry.dtype if entry and entry.dtype else None) or self.settings.dtype

    async def _lead(self) -> None:
        scaled = scale_assignment(self.assignment, self.router.all_loads(), self._scale_memory,
                                  metrics=self.router.metrics)
        if scaled is not None:
            self.assignment, self._last_push = scaled, 0.0  # pushed at once
        current = self.assignment
        nodes = list(self.nodes().values())
        shapes = {m: s for m in current.desired_models()
                  if (s := self.catalogue.shape(m, self.requested_dtype(m), nodes)) is not None}
        changed = next_assignment(current, shapes, list(self.nodes().values()), self.node_id)
        if changed is not None:
            self.assignment = changed
        if changed is not None or time.monotonic() - self._last_push > PUSH_EVERY_S:
            await self._push()

    async def _push(self) -> None:
        self._last_push = time.monotonic()
        body = self.assignment.model_dump(mode="json")

        async def send(peer: NodeProfile) -> None:
            try:
                await self.client.request("POST", base_url(peer.addresses[0], peer.api_port)
                                          + ASSIGNMENT_PATH, json_body=body)
            except PeerError as exc:
                log.debug("push to %s failed: %s", peer.name, exc)

        await asyncio.gather(*(send(p) for p in self.peers()))

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
        self.publish_routes()
        self._wake.set()
        return True

    # ---- requests for placements ------------------------------------------------------------
    async def request_instance(self, model: str, *, strategy: str = "auto",
                               nodes: list[str] | None = None, owner: str = "api",
                               replicas: int = 1) -> str:
        """Ask for `replicas` instances of `model` (leader records them; others forward to the
        leader); the first one's id."""
        model = canonical_name(model)
        key = "".join(c if c.isalnum() else "-" for c in model.lower()).strip("-") or "model"
        entry = DesiredInstance(key=f"{owner}-{key}", model=model, strategy=strategy,  # type: ignore[arg-type]
                                nodes=nodes, owner=owner, replicas=replicas)  # type: ignore[arg-type]
        if self.is_leader:
            others = [r for r in self.assignment.requested if r.key != entry.key]
            same = [r for r in self.assignment.requested if r.key == entry.key]
            if not same or (same[0].replicas != replicas and owner == "api"):
                # Asking again with another count changes how many replicas run.
                self.assignment = self.assignment.model_copy(
                    update={"requested": [*others, entry]})
            self._wake.set()
            return f"{entry.key}-0"
        url = self._leader_url()
        if url is None:
            raise PeerError("no leader is reachable")
        response = await self.client.request(
            "POST", url + "/cluster/instances",
            json_body={"model": model, "strategy": strategy, "nodes": nodes, "owner": owner,
                       # Only when asked for: a leader before replicas refuses the field.
                       **({"replicas": replicas} if replicas != 1 else {})})
        if response.status_code >= 400:
            raise PeerError(response.text)
        return str(response.json()["instance_id"])

    async def remove_instance(self, instance_id: str) -> str | None:
        """None when removed; otherwise why not ("not_found", "spec", or the leader's answer)."""
        if not self.is_leader:
            url = self._leader_url()
            if url is None:
                return "no leader is reachable"
            response = await self.client.request("DELETE",
                                                 url + f"/cluster/instances/{instance_id}")
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
        # A draft whose tokenizer differs from its model's is refused here when this node holds
        # both (elsewhere, the head's node refuses it before starting the runner).
        refused = draft_errors(spec, self._stored_dir)
        if refused:
            return [str(e) for e in refused]
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

    def _stored_dir(self, name: str) -> Path | None:
        try:
            return self.store.resolve(canonical_name(name))
        except (ModelNotFound, OSError, ValueError):
            return None

    async def send_spec_to_leader(self, text: str) -> None:
        """Forward a cluster.toml to the leader; raises PeerError when it cannot be reached."""
        url = self._leader_url()
        if url is None:
            return
        await self.client.request("POST", url + "/cluster/spec", content=text.encode())

    # ---- spec file watch --------------------------------------------------------------------
    async def watch_spec_file(self, path: Path) -> None:
        """Editing cluster.toml is a deploy: a valid edit is proposed, an invalid one reported."""
        await self.spec_watch.watch(path, self._stop)

    def reload_spec_file(self, path: Path) -> None:
        self.spec_watch.reload(path)

    def _deploy_spec_text(self, text: str) -> None:
        if self.is_leader:
            self.propose_spec(text)
            return

        async def send() -> None:
            try:
                await self.send_spec_to_leader(text)
            except PeerError as exc:
                log.warning("could not send the new spec to the leader: %s", exc)

        self._tasks.append(asyncio.create_task(send()))

    # ---- what this node runs, and status ------------------------------------------------------
    def base_config(self, model: str) -> RunnerConfig:
        """The configuration a runner of `model` starts from here (before its role and links)."""
        return self.convergence.base_config(self.assignment, model)

    def status(self) -> dict[str, Any]:
        return status_report(
            node_id=self.node_id, cluster=self.cluster_name, leader=self.leader,
            assignment=self.assignment, local_spec=self.spec_watch.local_spec,
            spec_errors=self.spec_watch.errors, nodes=self.nodes(),
            views=self.membership.views(), incompatible=self.membership.incompatible(),
            runners=self.pool.states(), router=self.router)
