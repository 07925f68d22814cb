"""Which replica answers a request soonest: replica loads, the books they are measured from, and
the pure choice between replicas.

A head's load is measured where it runs: its runner's stats (running and queued sequences, KV
room, decode rate) and the requests the head's node is streaming through it (their prompt
tokens still to prefill and decode tokens still to come). Every node reports its heads' loads
(`/cluster/load`); a router adds what it sent itself since a report was made, so a burst of
requests from one node spreads at once instead of waiting for the next report.

`choose_replica` is a pure function of those loads: the replica with the soonest expected
answer wins; the replica that already holds the conversation's prefix in its cache wins when it
is not much busier (`PREFIX_SLACK`, `PREFIX_SLACK_S`). `PrefixIndex` remembers where
conversations went.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

# How many decode tokens a request is expected to still produce, at most: a request's
# max_tokens is a limit, not a forecast (most answers stop long before it).
DECODE_HORIZON_TOKENS = 256
# A remote replica's answer pays a network hop; local wins a tie.
REMOTE_HOP_S = 0.005
# The prefix holder wins while its expected wait is at most this much above the best one's.
PREFIX_SLACK = 1.25
PREFIX_SLACK_S = 0.25
# Throughput assumed for a replica that has not decoded yet (tokens/s); any measured one wins.
UNMEASURED_RATE = 50.0
# Measured decode rates this close (larger / smaller) are one speed: they were measured at
# different batch sizes and moments, so their difference is noise, and trusting it would send
# a burst unevenly to equal replicas (a 1.2x gap split 16 requests 9/7).
RATE_TOLERANCE = 1.25
# A head's decode rate is its tokens over its last this many seconds of decode-step time, not
# over the last stats interval (which, after a burst, is its tail: few rows, a low rate).
RATE_WINDOW_S = 10.0
# KV room below this fraction of capacity: a new request may wait for room.
KV_LOW_FRACTION = 0.05
PREFIX_BLOCK = 32  # prompt tokens per prefix-index block
# A known prefix counts when it is at least this share of the prompt: a conversation going on
# (its earlier turns), not a system prompt every request starts with (every replica holds it).
PREFIX_MIN_SHARE = 0.5
PREFIX_ENTRIES = 4096  # prefix-index blocks remembered (oldest forgotten first)


class ReplicaLoad(msgspec.Struct, frozen=True, kw_only=True):
    """One head's load, as measured on its node (and sent to peers in `/cluster/load`)."""

    instance_id: str
    node_id: str = ""
    ready: bool = True
    running: int = 0  # sequences decoding (runner stats)
    queued: int = 0  # sequences waiting for a batch slot or KV room (runner stats)
    max_batch: int = 0
    in_flight: int = 0  # requests the head's node is streaming through it
    outstanding_tokens: int = 0  # their prompt tokens to prefill + decode tokens to come
    decode_tps: float = 0.0  # aggregate decode tokens/s when it last decoded (runner stats)
    kv_free_bytes: float = 0.0
    kv_capacity_bytes: float = 0.0
    queue_wait_s: float = 0.0  # how long its oldest waiting request has waited for a slot
    idle_s: float = 0.0  # since a request last started on it (or since it came up)
    requests_total: int = 0  # requests started on it since it came up
    # Speculative decoding on it since its runner started (runner stats): tokens drafted, the
    # drafted tokens verification kept, and verification passes that carried a draft.
    drafted_tokens: int = 0
    accepted_draft_tokens: int = 0
    draft_passes: int = 0
    age_s: float = 0.0  # how old the measurement was when it was sent


@dataclass(frozen=True)
class Candidate:
    """A replica a request may go to."""

    instance_id: str
    local: bool  # its head runs on this node
    load: ReplicaLoad | None  # None: no report yet
    unreported_tokens: int = 0  # what this node sent it since the report was measured
    unreported_requests: int = 0


@dataclass(frozen=True)
class Choice:
    instance_id: str
    reason: str  # "only", "soonest", "prefix"
    eta_s: float


def request_tokens(prompt_tokens: int, max_tokens: int) -> int:
    """The work one request adds to a replica, in tokens (see DECODE_HORIZON_TOKENS)."""
    return prompt_tokens + min(max_tokens, DECODE_HORIZON_TOKENS)


def comparable_rate(rate: float, rates: Sequence[float],
                    tolerance: float = RATE_TOLERANCE) -> float:
    """`rate` as routing compares it: the mean of the measured `rates` (every replica's, its
    own among them) within `tolerance` of it, so replicas measured at nearly the same speed
    count as equally fast; a clearly faster one stays faster."""
    near = [r for r in rates if r > 0 and max(r, rate) <= tolerance * min(r, rate)]
    return sum(near) / len(near) if rate > 0 and near else rate


def expected_wait_s(candidate: Candidate, rates: Sequence[float] = ()) -> float:
    """How long a new request sent to `candidate` would wait for its answer: the work ahead of
    it at the replica's measured rate, longer when no batch slot or KV room is free.

    `rates` are the replicas' measured rates: the stand-in for one never measured, and what a
    measured one is compared with (`comparable_rate`)."""
    load = candidate.load or ReplicaLoad(instance_id=candidate.instance_id)
    measured = [r for r in rates if r > 0]
    rate = comparable_rate(load.decode_tps, measured) if load.decode_tps > 0 else (
        sorted(measured)[len(measured) // 2] if measured else UNMEASURED_RATE)
    work = load.outstanding_tokens + candidate.unreported_tokens
    wait = work / rate
    sequences = load.running + load.queued + candidate.unreported_requests
    if load.max_batch and sequences >= load.max_batch:
        wait *= 1.0 + (sequences - load.max_batch + 1) / load.max_batch  # waits for a slot
    if load.kv_capacity_bytes and load.kv_free_bytes < KV_LOW_FRACTION * load.kv_capacity_bytes:
        wait *= 2.0  # waits for KV room
    return wait + (0.0 if candidate.local else REMOTE_HOP_S)


def choose_replica(candidates: Sequence[Candidate], prefix_holder: str | None = None) -> Choice:
    """The replica that answers soonest; the prefix holder when it is not much later. Ties go to
    a local replica, then to the lower instance id, so the choice is deterministic."""
    if not candidates:
        raise ValueError("no replica to choose from")
    if len(candidates) == 1:
        only = candidates[0]
        return Choice(only.instance_id, "only", expected_wait_s(only))
    rates = [c.load.decode_tps for c in candidates if c.load is not None]
    waits = {c.instance_id: expected_wait_s(c, rates) for c in candidates}
    best = min(candidates, key=lambda c: (waits[c.instance_id], not c.local, c.instance_id))
    best_wait = waits[best.instance_id]
    if prefix_holder is not None and prefix_holder in waits and prefix_holder != best.instance_id:
        held = waits[prefix_holder]
        if held <= best_wait * PREFIX_SLACK + PREFIX_SLACK_S:
            return Choice(prefix_holder, "prefix", held)
    reason = "prefix" if best.instance_id == prefix_holder else "soonest"
    return Choice(best.instance_id, reason, best_wait)


class PrefixIndex:
    """Which replica each conversation's prompt went to, by hashes of its leading token blocks:
    the replica whose prefix cache most likely holds a new prompt's longest known prefix."""

    def __init__(self, block: int = PREFIX_BLOCK, entries: int = PREFIX_ENTRIES) -> None:
        self.block = block
        self.entries = entries
        self._where: OrderedDict[bytes, str] = OrderedDict()

    def _keys(self, tokens: Sequence[int]) -> list[bytes]:
        digest = hashlib.blake2b(digest_size=16)
        keys = []
        for end in range(self.block, len(tokens) + 1, self.block):
            digest.update(msgspec.msgpack.encode(list(tokens[end - self.block:end])))
            keys.append(digest.copy().digest())
        return keys

    def holder(self, tokens: Sequence[int], among: Iterable[str],
               min_share: float = PREFIX_MIN_SHARE) -> str | None:
        """The replica (of `among`) that got the longest known prefix of `tokens`, when that
        prefix is at least `min_share` of them."""
        allowed = set(among)
        keys = self._keys(tokens)
        for n in range(len(keys), 0, -1):
            if n * self.block < min_share * len(tokens):
                return None
            where = self._where.get(keys[n - 1])
            if where is not None and where in allowed:
                return where
        return None

    def record(self, tokens: Sequence[int], instance_id: str) -> None:
        for key in self._keys(tokens):
            self._where[key] = instance_id
            self._where.move_to_end(key)
        while len(self._where) > self.entries:
            self._where.popitem(last=False)

    def forget(self, instance_id: str) -> None:
        for key in [k for k, v in self._where.items() if v == instance_id]:
            del self._where[key]


@dataclass
class Ticket:
    """One request on its way through a replica, as a book counts it."""

    instance_id: str
    prompt_tokens: int
    max_tokens: int
    started_at: float = field(default_factory=time.monotonic)
    generated: int = 0
    first_token_at: float | None = None

    def outstanding(self) -> int:
        prompt = self.prompt_tokens if self.first_token_at is None else 0
        return prompt + max(0, min(self.max_tokens, DECODE_HORIZON_TOKENS) - self.generated)

    def tokens(self, n: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.generated += n


class LoadBook:
    """Requests in flight by replica: those this node sent to each replica (its outgoing side)
    or runs on its own head runners (the serving side), with when each replica last got one."""

    def __init__(self) -> None:
        self._open: dict[str, dict[int, Ticket]] = {}
        self._last_start: dict[str, float] = {}
        self._started: dict[str, int] = {}
        self._first_seen: dict[str, float] = {}

    def open(self, instance_id: str, prompt_tokens: int, max_tokens: int) -> Ticket:
        ticket = Ticket(instance_id, prompt_tokens, max_tokens)
        self._open.setdefault(instance_id, {})[id(ticket)] = ticket
        self._last_start[instance_id] = ticket.started_at
        self._started[instance_id] = self._started.get(instance_id, 0) + 1
        return ticket

    def close(self, ticket: Ticket) -> None:
        self._open.get(ticket.instance_id, {}).pop(id(ticket), None)

    def tickets(self, instance_id: str) -> list[Ticket]:
        return list(self._open.get(instance_id, {}).values())

    def since(self, instance_id: str, after: float) -> tuple[int, int]:
        """(requests, outstanding tokens) of open tickets to `instance_id` started after `after`."""
        recent = [t for t in self.tickets(instance_id) if t.started_at > after]
        return len(recent), sum(t.outstanding() for t in recent)

    def idle_s(self, instance_id: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self._open.get(instance_id):
            return 0.0
        first = self._first_seen.setdefault(instance_id, now)
        return now - self._last_start.get(instance_id, first)

    def started(self, instance_id: str) -> int:
        return self._started.get(instance_id, 0)

    def busy_within(self, window_s: float, now: float | None = None) -> bool:
        """Whether a request is open, or one started within the last `window_s` seconds."""
        now = time.monotonic() if now is None else now
        return any(self._open.values()) or any(
            now - started < window_s for started in self._last_start.values())

    def oldest_waiting_s(self, instance_id: str, now: float | None = None) -> float:
        """Age of the oldest open request that has no first token yet (0 when none)."""
        now = time.monotonic() if now is None else now
        waiting = [now - t.started_at for t in self.tickets(instance_id)
                   if t.first_token_at is None]
        return max(waiting, default=0.0)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the books of replicas no longer served (their tickets are gone with them)."""
        kept = set(keep)
        for book in (self._last_start, self._started, self._first_seen):
            for instance_id in [i for i in book if i not in kept and not self._open.get(i)]:
                del book[instance_id]


class RateMeter:
    """A head's decode rate over its last `window_s` seconds of decode-step time, from its
    runner's cumulative totals (generated tokens, decode seconds). An idle head keeps the rate
    of its last window; a runner that restarted (totals going back) starts over."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._marks: deque[tuple[float, float]] = deque([(0.0, 0.0)])  # (seconds, tokens)

    def feed(self, tokens_total: float, seconds_total: float) -> float:
        last_seconds, last_tokens = self._marks[-1]
        if seconds_total < last_seconds or tokens_total < last_tokens:
            self._marks = deque([(0.0, 0.0)])
        if seconds_total > self._marks[-1][0]:
            self._marks.append((seconds_total, tokens_total))
        # Keep one mark at or before the window's start.
        while len(self._marks) > 2 and self._marks[1][0] <= seconds_total - self.window_s:
            self._marks.popleft()
        (old_seconds, old_tokens), (new_seconds, new_tokens) = self._marks[0], self._marks[-1]
        if new_seconds <= old_seconds:
            return 0.0
        return (new_tokens - old_tokens) / (new_seconds - old_seconds)


def measured_load(instance_id: str, node_id: str, stats: Mapping[str, float], max_batch: int,
                  serving: LoadBook, *, ready: bool = True,
                  now: float | None = None) -> ReplicaLoad:
    """A local head's load: its runner's last stats and the requests this node runs on it."""
    tickets = serving.tickets(instance_id)
    queued = int(stats.get("queued", 0.0))
    capacity = float(stats.get("kv_capacity_bytes", 0.0))
    reserved = float(stats.get("kv_reserved_bytes", stats.get("kv_used_bytes", 0.0)))
    return ReplicaLoad(
        instance_id=instance_id, node_id=node_id, ready=ready,
        running=int(stats.get("active", 0.0)), queued=queued, max_batch=max_batch,
        in_flight=len(tickets), outstanding_tokens=sum(t.outstanding() for t in tickets),
        decode_tps=float(stats.get("decode_tokens_per_second", 0.0)),
        kv_free_bytes=max(0.0, capacity - reserved), kv_capacity_bytes=capacity,
        # Only requests the runner says are queued wait for a slot; the rest are prefilling.
        queue_wait_s=serving.oldest_waiting_s(instance_id, now) if queued else 0.0,
        idle_s=serving.idle_s(instance_id, now), requests_total=serving.started(instance_id),
        drafted_tokens=int(stats.get("drafted_tokens_total", 0.0)),
        accepted_draft_tokens=int(stats.get("accepted_draft_tokens_total", 0.0)),
        draft_passes=int(stats.get("draft_passes_total", 0.0)))
