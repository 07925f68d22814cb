"""Routing between replicas (pure): the soonest answer wins, the prefix holder wins when not much
later, measured books count what is in flight, and the route table lists every replica."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.cluster.assignment import Assignment
from agent.cluster.routes import route_table
from agent.cluster.state import Placement, Stage
from agent.serving.balance import (
    Candidate,
    LoadBook,
    PrefixIndex,
    RateMeter,
    ReplicaLoad,
    choose_replica,
    expected_wait_s,
    measured_load,
)
from tests.test_placement import node


def load(instance_id: str, **fields: object) -> ReplicaLoad:
    defaults: dict[str, object] = {"decode_tps": 100.0, "max_batch": 8}
    return ReplicaLoad(instance_id=instance_id, **{**defaults, **fields})  # type: ignore[arg-type]


def cand(instance_id: str, local: bool = False, **fields: object) -> Candidate:
    return Candidate(instance_id, local, load(instance_id, **fields))


def test_the_replica_with_less_work_ahead_wins() -> None:
    choice = choose_replica([cand("a", outstanding_tokens=900), cand("b", outstanding_tokens=100)])
    assert (choice.instance_id, choice.reason) == ("b", "soonest")


def test_a_faster_replica_wins_with_the_same_work() -> None:
    choice = choose_replica([cand("a", outstanding_tokens=500, decode_tps=50.0),
                             cand("b", outstanding_tokens=500, decode_tps=200.0)])
    assert choice.instance_id == "b"


def test_what_this_node_sent_since_the_report_counts() -> None:
    a = Candidate("a", False, load("a", outstanding_tokens=100), unreported_tokens=2000,
                  unreported_requests=4)
    assert choose_replica([a, cand("b", outstanding_tokens=300)]).instance_id == "b"


def test_a_full_batch_or_kv_waits_longer() -> None:
    free = cand("a", outstanding_tokens=400, running=4)
    full = cand("b", outstanding_tokens=400, running=8, queued=2)
    assert expected_wait_s(full) > expected_wait_s(free)
    tight = cand("c", outstanding_tokens=400, kv_free_bytes=1.0, kv_capacity_bytes=100.0)
    assert expected_wait_s(tight) > expected_wait_s(free)


def test_the_prefix_holder_wins_when_not_much_busier_only() -> None:
    near = [cand("a", outstanding_tokens=120), cand("b", outstanding_tokens=100)]
    assert choose_replica(near, prefix_holder="a").reason == "prefix"
    assert choose_replica(near, prefix_holder="a").instance_id == "a"
    far = [cand("a", outstanding_tokens=5000), cand("b", outstanding_tokens=100)]
    assert choose_replica(far, prefix_holder="a").instance_id == "b"


def test_ties_go_to_the_local_replica_then_the_lower_id() -> None:
    assert choose_replica([cand("a"), cand("b", local=True)]).instance_id == "b"
    assert choose_replica([cand("b"), cand("a")]).instance_id == "a"
    assert choose_replica([cand("only")]).reason == "only"


def test_an_unmeasured_replica_is_judged_at_the_others_rate() -> None:
    fresh = Candidate("new", False, None)
    busy = cand("old", outstanding_tokens=1000, decode_tps=100.0)
    assert choose_replica([fresh, busy]).instance_id == "new"


@given(st.lists(st.integers(0, 10_000), min_size=2, max_size=6))
def test_equal_replicas_choose_the_least_outstanding(works: list[int]) -> None:
    candidates = [cand(f"r{i}", outstanding_tokens=w) for i, w in enumerate(works)]
    chosen = choose_replica(candidates)
    assert works[int(chosen.instance_id[1:])] == min(works)
    assert choose_replica(list(reversed(candidates))) == chosen  # order never matters


def test_requests_spread_evenly_over_equal_replicas() -> None:
    """A burst from one node: each request's own ticket makes the next go elsewhere."""
    book = LoadBook()
    counts = {"a": 0, "b": 0}
    for _ in range(16):
        candidates = [Candidate(i, False, load(i), *reversed(book.since(i, 0.0)))
                      for i in counts]
        choice = choose_replica(candidates)
        book.open(choice.instance_id, prompt_tokens=40, max_tokens=64)
        counts[choice.instance_id] += 1
    assert counts == {"a": 8, "b": 8}


def _burst(rates: dict[str, float], requests: int = 16) -> dict[str, int]:
    book = LoadBook()
    counts = dict.fromkeys(rates, 0)
    for _ in range(requests):
        candidates = [Candidate(i, False, load(i, decode_tps=r), *reversed(book.since(i, 0.0)))
                      for i, r in rates.items()]
        choice = choose_replica(candidates)
        book.open(choice.instance_id, prompt_tokens=40, max_tokens=64)
        counts[choice.instance_id] += 1
    return counts


def test_nearly_equal_measured_rates_split_a_burst_evenly() -> None:
    """Rates measured 1.2x apart (a burst's tail on one, a fuller batch on the other) are one
    speed: a burst splits 8/8, not 9/7; a replica twice as fast still takes more."""
    assert _burst({"a": 14.9, "b": 12.4}) == {"a": 8, "b": 8}
    fast = _burst({"a": 200.0, "b": 100.0})
    assert fast["a"] > fast["b"]


def test_a_rate_meter_measures_its_last_window_of_decode_time() -> None:
    meter = RateMeter(window_s=10.0)
    assert meter.feed(0.0, 0.0) == 0.0
    assert meter.feed(400.0, 10.0) == 40.0  # a full batch: 40 tokens/s of decode time
    # A burst's tail (2 s at 10 tokens/s) barely moves it; a tail-only measure would say 10.
    assert meter.feed(420.0, 12.0) == 35.0
    assert meter.feed(420.0, 12.0) == 35.0  # idle: the totals stand still, so does the rate
    assert meter.feed(1400.0, 32.0) == 49.0  # the window moved on: (1400 - 420) / (32 - 12)
    assert meter.feed(5.0, 1.0) == 5.0  # the runner restarted: counted from zero again


def test_the_prefix_index_finds_the_longest_known_prefix() -> None:
    index = PrefixIndex(block=4)
    conversation = list(range(20))
    index.record(conversation[:12], "a")
    index.record(conversation[:4] + [99] * 8, "b")
    assert index.holder([*conversation, 7, 7, 7, 7], ["a", "b"]) == "a"
    assert index.holder(conversation, ["b"], min_share=0.0) == "b"  # a shorter prefix is on b
    assert index.holder(conversation, ["b"]) is None  # 4 of 20 tokens: not this conversation
    assert index.holder([5, 5, 5, 5], ["a", "b"]) is None
    index.forget("a")
    assert index.holder(conversation, ["a", "b"], min_share=0.0) == "b"


def test_a_book_measures_work_waits_and_idleness() -> None:
    book = LoadBook()
    ticket = book.open("a", prompt_tokens=100, max_tokens=10)
    assert ticket.outstanding() == 110
    assert book.oldest_waiting_s("a", now=ticket.started_at + 3) == 3
    ticket.tokens(4)
    assert ticket.outstanding() == 6  # the prompt is done once a token came
    assert book.idle_s("a") == 0.0
    book.close(ticket)
    assert book.idle_s("a", now=ticket.started_at + 7) == 7
    stats = {"active": 2.0, "queued": 1.0, "kv_capacity_bytes": 100.0, "kv_reserved_bytes": 30.0,
             "decode_tokens_per_second": 42.0}
    book.open("a", prompt_tokens=5, max_tokens=5)
    measured = measured_load("a", "n", stats, 8, book)
    assert (measured.running, measured.queued, measured.in_flight) == (2, 1, 1)
    assert measured.kv_free_bytes == 70.0 and measured.decode_tps == 42.0
    assert measured.requests_total == 2


def _solo(instance_id: str, model: str, node_id: str) -> Placement:
    return Placement(instance_id=instance_id, model=model, strategy="single",
                     stages=[Stage(nodes=[node_id], layer_start=0, layer_stop=30)])


class _NoRemote:
    def stream_to(self, profile: object, instance_id: str | None = None) -> object:
        return lambda request: None


def test_the_route_table_lists_every_replica_and_which_drain() -> None:
    me, peer = node(0, 1 << 30), node(1, 1 << 30)
    assignment = Assignment(placements=[
        _solo("m-0", "m", me.node_id), _solo("m-1", "m", me.node_id),
        _solo("m-2", "m", peer.node_id)], draining=["m-2"])
    table = route_table(assignment, me.node_id, {me.node_id: me, peer.node_id: peer},
                        lambda n: "alive", _NoRemote())  # type: ignore[arg-type]
    replicas = table.replicas("m")
    assert [r.instance_id for r in replicas] == ["m-0", "m-1", "m-2"]
    assert [r.local_key for r in replicas] == ["m-0/0", "m-1/0", None]
    assert replicas[2].remote is not None and replicas[2].node_id == peer.node_id
    assert table.draining == frozenset({"m-2"})


def test_a_book_is_busy_while_a_request_is_open_and_for_a_window_after() -> None:
    book = LoadBook()
    assert not book.busy_within(10.0)
    ticket = book.open("a", prompt_tokens=5, max_tokens=5)
    assert book.busy_within(10.0, now=ticket.started_at + 60)  # still open
    book.close(ticket)
    assert book.busy_within(10.0, now=ticket.started_at + 9)
    assert not book.busy_within(10.0, now=ticket.started_at + 11)


def test_a_load_shows_work_when_running_queued_streaming_or_recently_asked() -> None:
    from agent.cluster.load_reports import load_busy

    assert not load_busy(load("a"))
    assert not load_busy(load("a", idle_s=3.0))  # never served: idle since it came up
    assert load_busy(load("a", running=1))
    assert load_busy(load("a", queued=1))
    assert load_busy(load("a", in_flight=1))
    assert load_busy(load("a", requests_total=4, idle_s=3.0))
    assert not load_busy(load("a", requests_total=4, idle_s=30.0))


def test_loads_are_polled_fast_while_this_node_routes_requests_and_slowly_when_idle(
    tmp_path: object,
) -> None:
    from pathlib import Path

    from agent.cluster.load_reports import LoadReports
    from agent.cluster.peers import PeerClient
    from agent.serving.pool import RunnerPool
    from agent.serving.router import Router
    from agent.settings import NodeSettings

    settings = NodeSettings(state_dir=Path(str(tmp_path)) / "state", discovery_enabled=False)
    router = Router(RunnerPool(settings), wait_s=1.0)
    reports = LoadReports(PeerClient(node_id="n0", secret=None, timeout_s=1.0), router,
                          lambda: [], interval_s=0.5, idle_interval_s=2.0)
    assert reports.next_interval_s() == 2.0
    ticket = router.outgoing.open("m-1", prompt_tokens=10, max_tokens=10)
    assert reports.next_interval_s() == 0.5
    router.outgoing.close(ticket)
    assert reports.next_interval_s() == 0.5  # within the busy window after it
