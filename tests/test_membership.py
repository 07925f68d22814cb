"""The peer table: joins, changes, restarts, failure detection, RTTs, and the event fan-out."""

from __future__ import annotations

import asyncio

import pytest

from agent.cluster.membership import (
    IncompatibleSighting,
    Membership,
    MembershipEvent,
    PeerTable,
    Sighting,
    detail_digest,
    lenient_profile,
)
from agent.cluster.state import NodeProfile

SELF = "0" * 32
A = "a" * 32
B = "b" * 32


def node(node_id: str, name: str = "", **extra: object) -> NodeProfile:
    fields: dict[str, object] = dict(
        node_id=node_id, name=name or node_id[:4], version="0.1.0", addresses=["10.0.0.1"],
        api_port=52415, memory_total_bytes=16 << 30, memory_available_bytes=8 << 30,
    )
    fields.update(extra)
    return NodeProfile.model_validate(fields)


def table(**kw: object) -> PeerTable:
    return PeerTable(node(SELF, "me"), interval_s=1.0, suspect_after=3, dead_after=8,
                     forget_after_s=60, **kw)  # type: ignore[arg-type]


def kinds(events: list[MembershipEvent]) -> list[tuple[str, str]]:
    return [(e.kind, e.node_id) for e in events]


def test_first_sighting_is_a_join_and_repeats_are_quiet() -> None:
    t = table()
    assert kinds(t.observe(node(A), 0.0, boot_nonce=1)) == [("join", A)]
    assert t.observe(node(A), 1.0, boot_nonce=1) == []
    assert [p.node_id for p in t.snapshot()] == [SELF, A]


def test_own_profile_is_never_a_peer() -> None:
    t = table()
    assert t.observe(node(SELF), 0.0) == []
    assert [v.via for v in t.views(0.0)] == ["self"]


def test_missed_intervals_make_a_peer_suspect_then_dead() -> None:
    t = table()
    t.observe(node(A), 0.0, boot_nonce=1)
    assert t.expire(3.0) == []  # exactly 3 intervals: not yet
    assert kinds(t.expire(3.1)) == [("suspect", A)]
    assert t.expire(5.0) == []  # suspect is reported once
    assert [p.node_id for p in t.snapshot()] == [SELF, A]
    assert [p.node_id for p in t.snapshot(include_suspect=False)] == [SELF]
    assert kinds(t.expire(8.1)) == [("leave", A)]
    assert t.status(A) == "dead"
    assert [p.node_id for p in t.snapshot()] == [SELF]
    assert t.expire(9.0) == []


def test_suspect_peer_heard_again_recovers() -> None:
    t = table()
    t.observe(node(A), 0.0, boot_nonce=1)
    t.expire(4.0)
    assert kinds(t.observe(node(A), 4.5, boot_nonce=1)) == [("recover", A)]
    assert t.status(A) == "alive"


def test_dead_peer_heard_again_joins_again() -> None:
    t = table()
    t.observe(node(A), 0.0, boot_nonce=1)
    t.expire(10.0)
    assert kinds(t.observe(node(A), 11.0, boot_nonce=1)) == [("join", A)]


def test_dead_peers_are_forgotten_after_a_while() -> None:
    t = table()
    t.observe(node(A), 0.0, boot_nonce=1)
    t.expire(9.0)
    assert t.status(A) == "dead"
    t.expire(8.0 + 60.0 + 0.5)
    assert t.status(A) is None
    assert [v.profile.node_id for v in t.views(70.0)] == [SELF]


def test_new_boot_nonce_is_a_restart() -> None:
    t = table()
    t.observe(node(A), 0.0, boot_nonce=1, rtt_s=0.002)
    assert kinds(t.observe(node(A), 1.0, boot_nonce=2)) == [("restart", A)]
    assert t.rtts_ms() == {}  # the old process's RTT says nothing about the new one


def test_profile_changes_are_events_but_memory_drift_is_not() -> None:
    t = table()
    t.observe(node(A), 0.0, boot_nonce=1)
    assert t.observe(node(A, memory_available_bytes=7 << 30), 1.0, boot_nonce=1) == []
    assert t.snapshot()[1].memory_available_bytes == 7 << 30  # yet the snapshot is current
    events = t.observe(node(A, models=["smollm2-135m"]), 2.0, boot_nonce=1)
    assert kinds(events) == [("change", A)]
    assert events[0].profile.models == ["smollm2-135m"]


def test_rtt_is_smoothed_and_reported_in_ms() -> None:
    t = table()
    t.observe(node(A), 0.0, boot_nonce=1, rtt_s=0.004)
    assert t.rtts_ms() == {A: pytest.approx(4.0)}
    t.observe(node(A), 1.0, boot_nonce=1, rtt_s=0.008)
    assert t.rtts_ms()[A] == pytest.approx(5.0)  # 4 + 0.25 * (8 - 4)
    t.observe_rtt(A, 0.001)
    assert t.rtts_ms()[A] == pytest.approx(4.0)
    view = next(v for v in t.views(1.5) if v.profile.node_id == A)
    assert view.rtt_ms == pytest.approx(4.0) and view.last_seen_age_s == pytest.approx(0.5)


def test_partial_beacon_keeps_known_details_and_flags_new_ones() -> None:
    t = table()
    full = node(A, models=["m1"], labels={"rack": "1"})
    t.observe(full, 0.0, boot_nonce=1)
    partial = node(A, memory_available_bytes=1 << 30)  # models and labels left out
    t.observe(partial, 1.0, boot_nonce=1, partial=True, detail_digest=detail_digest(full))
    view = t.views(1.0)[1]
    assert view.profile.models == ["m1"] and view.profile.labels == {"rack": "1"}
    assert view.profile.memory_available_bytes == 1 << 30
    assert not view.needs_detail

    newer = node(A, models=["m1", "m2"], labels={"rack": "1"})
    t.observe(partial, 2.0, boot_nonce=1, partial=True, detail_digest=detail_digest(newer))
    assert t.views(2.0)[1].needs_detail
    assert kinds(t.supply_detail(newer, 2.1)) == [("change", A)]
    assert not t.views(2.1)[1].needs_detail


def test_incompatible_nodes_are_listed_not_admitted() -> None:
    t = table()
    seen = IncompatibleSighting(B, "9.0.0", 1, ["10.0.0.9"], "10.0.0.9")
    assert t.record_incompatible(seen, 0.0)
    assert not t.record_incompatible(seen, 1.0)  # reported once
    assert [i.node_id for i in t.incompatible(1.0)] == [B]
    assert [p.node_id for p in t.snapshot()] == [SELF]
    t.expire(20.0)
    assert t.incompatible(20.0) == []


def test_rekeyed_self_replaces_the_old_id() -> None:
    t = table()
    t.set_self(node("c" * 32, "me"))
    assert [p.node_id for p in t.snapshot()] == ["c" * 32]


def test_detector_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        PeerTable(node(SELF), suspect_after=5, dead_after=5)
    with pytest.raises(ValueError):
        PeerTable(node(SELF), interval_s=0)


def test_lenient_profile_drops_unknown_fields() -> None:
    data = {**node(A).model_dump(mode="json"), "from_the_future": 1}
    assert lenient_profile(data) == node(A)


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_membership_fans_events_out_and_expires_on_its_own() -> None:
    async def main() -> None:
        clock = ManualClock()
        m = Membership(PeerTable(node(SELF), interval_s=0.05, suspect_after=2, dead_after=4),
                       clock=clock)
        q1, q2 = m.subscribe(), m.subscribe()
        called: list[str] = []
        m.add_callback(lambda e: called.append(e.kind))
        m.add_callback(lambda e: 1 / 0)  # a broken subscriber hurts nobody
        stop = asyncio.Event()
        runner = asyncio.create_task(m.run(stop))
        m.on_sighting(Sighting(node(A), boot_nonce=1, source="10.0.0.1", rtt_s=0.001))
        assert (await asyncio.wait_for(q1.get(), 2)).kind == "join"
        clock.now = 0.15  # past suspect_after * interval: the loop notices without a sighting
        assert (await asyncio.wait_for(q1.get(), 2)).kind == "suspect"
        clock.now = 0.3  # past dead_after * interval
        assert (await asyncio.wait_for(q1.get(), 2)).kind == "leave"
        got = ["join", "suspect", "leave"]
        assert [q2.get_nowait().kind for _ in range(q2.qsize())] == got
        assert called == got
        stop.set()
        await asyncio.wait_for(runner, 2)

    asyncio.run(main())


def test_full_subscriber_queue_drops_its_oldest_event() -> None:
    async def main() -> None:
        m = Membership(PeerTable(node(SELF)), clock=ManualClock())
        q = m.subscribe(maxsize=2)
        for i in range(4):
            m.on_sighting(Sighting(node(f"{i}" * 32), boot_nonce=1, source="x"))
        assert [q.get_nowait().node_id for _ in range(2)] == ["2" * 32, "3" * 32]

    asyncio.run(main())


def test_partial_sighting_fetches_the_full_profile() -> None:
    async def main() -> None:
        full = node(A, models=["m1", "m2"])
        fetched: list[str] = []

        async def fetch(view: object) -> NodeProfile:
            fetched.append(A)
            return full

        m = Membership(PeerTable(node(SELF)), clock=ManualClock(), fetch_profile=fetch)
        m.on_sighting(Sighting(node(A), boot_nonce=1, source="x", partial=True,
                               detail_digest=detail_digest(full)))
        for _ in range(50):
            if m.snapshot()[1].models:
                break
            await asyncio.sleep(0.01)
        assert m.snapshot()[1].models == ["m1", "m2"] and fetched == [A]

    asyncio.run(main())
