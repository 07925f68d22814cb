"""The peer table: who is in the cluster now, how they look, and how far away they are.

`PeerTable` is pure: sightings (from beacons or static probes) and `expire(now)` go in, events
and views come out, with time passed in by the caller, so failure detection is tested without
sockets or sleeps. `Membership` is the thin asyncio loop around it: it takes sightings from
discovery, runs expiry on a timer and fans events out to subscribers' queues.

Failure detection counts missed beacon intervals: a peer unheard for `suspect_after` intervals
is suspect (no new work goes to it, existing work stays), after `dead_after` it has left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.cluster.state import NodeProfile

log = logging.getLogger("flock.membership")

PeerStatus = Literal["alive", "suspect", "dead"]
EventKind = Literal["join", "change", "restart", "suspect", "recover", "leave"]
Via = Literal["self", "beacon", "static"]

RTT_SMOOTHING = 0.25  # EWMA weight of a new RTT sample (TCP's SRTT uses 1/8; links here are few)
# Fields a beacon may leave out when the profile is too big for one datagram.
DETAIL_FIELDS = ("models", "labels", "links")
# Changes that are not worth an event: the snapshot always carries the latest value anyway.
# Links change with every round-trip sample (placement reads them when it next runs).
_QUIET_FIELDS = frozenset({"memory_available_bytes", "links"})


def lenient_profile(data: dict[str, Any]) -> NodeProfile:
    """A NodeProfile from a peer's dict, ignoring fields a newer compatible version added."""
    known = NodeProfile.model_fields
    return NodeProfile.model_validate({k: v for k, v in data.items() if k in known})


def detail_digest(profile: NodeProfile) -> str:
    """A short hash of the fields a partial beacon omits, to tell whether ours are still current."""
    detail = profile.model_dump(mode="json", include=set(DETAIL_FIELDS))
    return hashlib.sha256(json.dumps(detail, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Sighting:
    """One piece of evidence that a node is alive: a beacon received or a static probe answered."""

    profile: NodeProfile
    boot_nonce: int
    source: str  # the address it came from
    via: Via = "beacon"
    rtt_s: float | None = None
    partial: bool = False  # profile without DETAIL_FIELDS (the beacon would not fit)
    detail_digest: str = ""


@dataclass(frozen=True)
class IncompatibleSighting:
    """A node of our cluster (authenticated) whose version cannot share instances with ours."""

    node_id: str
    version: str
    proto: int
    addresses: list[str]
    source: str


@dataclass(frozen=True)
class MembershipEvent:
    kind: EventKind
    node_id: str
    profile: NodeProfile
    at: float  # the table's clock (monotonic seconds)


@dataclass(frozen=True)
class PeerView:
    """A peer as /cluster shows it."""

    profile: NodeProfile
    status: PeerStatus
    via: Via
    boot_nonce: int
    last_seen_age_s: float
    rtt_ms: float | None
    needs_detail: bool  # a partial beacon announced details we do not have yet


@dataclass(frozen=True)
class IncompatibleView:
    node_id: str
    version: str
    proto: int
    addresses: list[str]
    last_seen_age_s: float


@dataclass
class _Peer:
    profile: NodeProfile
    boot_nonce: int
    via: Via
    first_seen: float
    last_seen: float
    status: PeerStatus = "alive"
    rtt_s: float | None = None
    detail_digest: str = ""
    needs_detail: bool = False


@dataclass
class _Incompatible:
    sighting: IncompatibleSighting
    last_seen: float


def _changed(old: NodeProfile, new: NodeProfile) -> bool:
    a = old.model_dump(exclude=set(_QUIET_FIELDS))
    b = new.model_dump(exclude=set(_QUIET_FIELDS))
    return a != b


@dataclass
class PeerTable:
    """Peers by node id, with failure detection driven by the caller's clock."""

    self_profile: NodeProfile
    interval_s: float = 1.0
    suspect_after: int = 3  # missed intervals before a peer is suspect
    dead_after: int = 8  # missed intervals before it has left
    forget_after_s: float = 300.0  # how long a dead peer stays visible in status
    _peers: dict[str, _Peer] = field(default_factory=dict)
    _incompatible: dict[str, _Incompatible] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.suspect_after < self.dead_after:
            raise ValueError("need 0 < suspect_after < dead_after (missed intervals)")
        if self.interval_s <= 0:
            raise ValueError("interval_s must be positive")

    @property
    def self_id(self) -> str:
        return self.self_profile.node_id

    def set_self(self, profile: NodeProfile) -> None:
        """Our own latest profile (it is part of every snapshot); a re-keyed id drops the old."""
        self._peers.pop(profile.node_id, None)
        self.self_profile = profile

    def observe(
        self,
        profile: NodeProfile,
        now: float,
        *,
        boot_nonce: int = 0,
        rtt_s: float | None = None,
        via: Via = "beacon",
        source: str = "",
        partial: bool = False,
        detail_digest: str = "",
    ) -> list[MembershipEvent]:
        """Record that `profile`'s node was heard at `now`; returns the events this causes."""
        del source  # part of the sighting for logs; the table keys on node ids
        node_id = profile.node_id
        if node_id == self.self_id:
            return []
        peer = self._peers.get(node_id)
        if peer is None or peer.status == "dead":
            peer = _Peer(profile, boot_nonce, via, first_seen=now, last_seen=now)
            self._apply_detail(peer, profile, partial, detail_digest, previous=None)
            self._peers[node_id] = peer
            self._sample_rtt(peer, rtt_s)
            return [MembershipEvent("join", node_id, peer.profile, now)]

        events: list[MembershipEvent] = []
        # Nonce 0 means "not said"; any other change of nonce is a new process on that node.
        restarted = bool(boot_nonce and peer.boot_nonce and boot_nonce != peer.boot_nonce)
        if boot_nonce and not peer.boot_nonce:
            peer.boot_nonce = boot_nonce
        old = peer.profile
        self._apply_detail(peer, profile, partial, detail_digest, previous=old)
        peer.last_seen = max(peer.last_seen, now)
        peer.via = via
        if restarted:
            # A new process on the same node: its runners are gone, whatever the profile says.
            peer.boot_nonce = boot_nonce
            peer.rtt_s = None
            peer.first_seen = now
            events.append(MembershipEvent("restart", node_id, peer.profile, now))
        if peer.status == "suspect":
            events.append(MembershipEvent("recover", node_id, peer.profile, now))
        peer.status = "alive"
        if not restarted and _changed(old, peer.profile):
            events.append(MembershipEvent("change", node_id, peer.profile, now))
        self._sample_rtt(peer, rtt_s)
        return events

    def _apply_detail(
        self,
        peer: _Peer,
        profile: NodeProfile,
        partial: bool,
        digest: str,
        previous: NodeProfile | None,
    ) -> None:
        if not partial:
            peer.profile = profile
            peer.detail_digest = digest or detail_digest(profile)
            peer.needs_detail = False
            return
        # A partial beacon: keep the details we have; ask for new ones if they are out of date.
        if previous is not None:
            kept = {name: getattr(previous, name) for name in DETAIL_FIELDS}
            peer.profile = profile.model_copy(update=kept)
        else:
            peer.profile = profile
        peer.needs_detail = digest != peer.detail_digest or previous is None

    def supply_detail(self, profile: NodeProfile, now: float) -> list[MembershipEvent]:
        """A full profile fetched over HTTP after a partial beacon; it counts as a sighting."""
        peer = self._peers.get(profile.node_id)
        if peer is None:
            return []
        old = peer.profile
        peer.profile = profile
        peer.detail_digest = detail_digest(profile)
        peer.needs_detail = False
        peer.last_seen = max(peer.last_seen, now)
        if _changed(old, profile):
            return [MembershipEvent("change", profile.node_id, profile, now)]
        return []

    @staticmethod
    def _sample_rtt(peer: _Peer, rtt_s: float | None) -> None:
        if rtt_s is None or rtt_s < 0:
            return
        if peer.rtt_s is None:
            peer.rtt_s = rtt_s
        else:
            peer.rtt_s += RTT_SMOOTHING * (rtt_s - peer.rtt_s)

    def observe_rtt(self, node_id: str, rtt_s: float) -> None:
        """An RTT sample measured outside a sighting (an HTTP ping)."""
        peer = self._peers.get(node_id)
        if peer is not None:
            self._sample_rtt(peer, rtt_s)

    def record_incompatible(self, sighting: IncompatibleSighting, now: float) -> bool:
        """Remember a node we will not admit, for status; True the first time it is seen."""
        known = sighting.node_id in self._incompatible
        self._incompatible[sighting.node_id] = _Incompatible(sighting, now)
        return not known

    def expire(self, now: float) -> list[MembershipEvent]:
        """Advance failure detection to `now`: suspect, leave and forget peers that went quiet."""
        events: list[MembershipEvent] = []
        suspect_s = self.suspect_after * self.interval_s
        dead_s = self.dead_after * self.interval_s
        for node_id, peer in list(self._peers.items()):
            age = now - peer.last_seen
            if peer.status == "dead":
                if age > dead_s + self.forget_after_s:
                    del self._peers[node_id]
                continue
            if age > dead_s:
                peer.status = "dead"
                peer.rtt_s = None
                events.append(MembershipEvent("leave", node_id, peer.profile, now))
            elif age > suspect_s and peer.status == "alive":
                peer.status = "suspect"
                events.append(MembershipEvent("suspect", node_id, peer.profile, now))
        for node_id, entry in list(self._incompatible.items()):
            if now - entry.last_seen > dead_s:
                del self._incompatible[node_id]
        return events

    def status(self, node_id: str) -> PeerStatus | None:
        if node_id == self.self_id:
            return "alive"
        peer = self._peers.get(node_id)
        return peer.status if peer else None

    def snapshot(self, *, include_suspect: bool = True) -> list[NodeProfile]:
        """Profiles of the current members, ourselves included, sorted by node id.

        Suspect peers are still members (their instances keep running); placement of new work
        should pass include_suspect=False.
        """
        wanted = {"alive", "suspect"} if include_suspect else {"alive"}
        profiles = [self.self_profile]
        profiles += [p.profile for p in self._peers.values() if p.status in wanted]
        return sorted(profiles, key=lambda p: p.node_id)

    def views(self, now: float) -> list[PeerView]:
        """Every known peer (dead ones until forgotten), ourselves first, then by node id."""
        mine = PeerView(self.self_profile, "alive", "self", 0, 0.0, 0.0, False)
        rest = [
            PeerView(
                p.profile, p.status, p.via, p.boot_nonce, max(0.0, now - p.last_seen),
                None if p.rtt_s is None else p.rtt_s * 1000.0, p.needs_detail,
            )
            for p in sorted(self._peers.values(), key=lambda p: p.profile.node_id)
        ]
        return [mine, *rest]

    def rtts_ms(self) -> dict[str, float]:
        """Smoothed link RTT to each live peer that has a measurement, in milliseconds."""
        return {
            node_id: p.rtt_s * 1000.0
            for node_id, p in self._peers.items()
            if p.rtt_s is not None and p.status != "dead"
        }

    def incompatible(self, now: float) -> list[IncompatibleView]:
        return [
            IncompatibleView(e.sighting.node_id, e.sighting.version, e.sighting.proto,
                             list(e.sighting.addresses), max(0.0, now - e.last_seen))
            for e in sorted(self._incompatible.values(), key=lambda e: e.sighting.node_id)
        ]


FetchProfile = Callable[[PeerView], Awaitable[NodeProfile | None]]


class Membership:
    """The peer table's loop: sightings in, expiry on a timer, events out to subscribers.

    Events are hints for edge-triggered work (logs, dashboards, waking the reconcile loop);
    consumers that decide anything read `snapshot()`, so a dropped event (a full queue drops
    its oldest) costs latency, never correctness.
    """

    def __init__(
        self,
        table: PeerTable,
        *,
        clock: Callable[[], float] = time.monotonic,
        fetch_profile: FetchProfile | None = None,
    ) -> None:
        self.table = table
        self._clock = clock
        self._fetch_profile = fetch_profile
        self._subscribers: list[asyncio.Queue[MembershipEvent]] = []
        self._callbacks: list[Callable[[MembershipEvent], None]] = []
        self._fetching: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- inputs ---------------------------------------------------------------------------

    def on_sighting(self, s: Sighting) -> None:
        """Discovery's callback for every admitted beacon or answered probe."""
        events = self.table.observe(
            s.profile, self._clock(), boot_nonce=s.boot_nonce, rtt_s=s.rtt_s, via=s.via,
            source=s.source, partial=s.partial, detail_digest=s.detail_digest,
        )
        self._publish(events)
        if s.partial and self._fetch_profile is not None:
            self._maybe_fetch(s.profile.node_id)

    def on_incompatible(self, s: IncompatibleSighting) -> None:
        if self.table.record_incompatible(s, self._clock()):
            log.warning(
                "node %s at %s runs flock %s (protocol %d), incompatible with ours; it is shown "
                "in status but shares no instances", s.node_id, s.source, s.version, s.proto,
            )

    def set_self(self, profile: NodeProfile) -> None:
        self.table.set_self(profile)

    # -- outputs --------------------------------------------------------------------------

    def subscribe(self, maxsize: int = 256) -> asyncio.Queue[MembershipEvent]:
        queue: asyncio.Queue[MembershipEvent] = asyncio.Queue(maxsize)
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[MembershipEvent]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(queue)

    def add_callback(self, callback: Callable[[MembershipEvent], None]) -> None:
        """A synchronous callback per event (it must not block: it runs on the event loop)."""
        self._callbacks.append(callback)

    def snapshot(self, *, include_suspect: bool = True) -> list[NodeProfile]:
        return self.table.snapshot(include_suspect=include_suspect)

    def views(self) -> list[PeerView]:
        return self.table.views(self._clock())

    def rtts_ms(self) -> dict[str, float]:
        return self.table.rtts_ms()

    def incompatible(self) -> list[IncompatibleView]:
        return self.table.incompatible(self._clock())

    # -- loop -----------------------------------------------------------------------------

    def expire_now(self) -> list[MembershipEvent]:
        events = self.table.expire(self._clock())
        self._publish(events)
        return events

    async def run(self, stop: asyncio.Event) -> None:
        """Run failure detection until `stop` is set (checks four times per beacon interval)."""
        tick = self.table.interval_s / 4
        while not stop.is_set():
            self.expire_now()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
        for task in list(self._tasks):
            task.cancel()

    def _publish(self, events: Iterable[MembershipEvent]) -> None:
        for event in events:
            log.info("peer %s: %s (%s)", event.kind, event.node_id, event.profile.name)
            for queue in self._subscribers:
                if queue.full():
                    queue.get_nowait()  # drop the oldest: the snapshot stays the truth
                queue.put_nowait(event)
            for callback in self._callbacks:
                try:
                    callback(event)
                except Exception:  # a broken subscriber must not stop membership
                    log.exception("membership callback failed")

    def _maybe_fetch(self, node_id: str) -> None:
        view = next((v for v in self.views() if v.profile.node_id == node_id), None)
        if view is None or not view.needs_detail or node_id in self._fetching:
            return
        self._fetching.add(node_id)
        task = asyncio.get_running_loop().create_task(self._fetch(view))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, view: PeerView) -> None:
        assert self._fetch_profile is not None
        try:
            profile = await self._fetch_profile(view)
        except Exception as e:  # the next partial beacon tries again
            log.debug("fetching profile of %s failed: %s", view.profile.node_id, e)
            profile = None
        finally:
            self._fetching.discard(view.profile.node_id)
        if profile is not None and profile.node_id == view.profile.node_id:
            self._publish(self.table.supply_detail(profile, self._clock()))
