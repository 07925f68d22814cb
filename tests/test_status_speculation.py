"""Speculative decoding in the cluster status: each head's drafted / accepted counts travel in
its measured load (`/cluster/load`), and `/cluster/status` sums them per model."""

from __future__ import annotations

import msgspec

from agent.cluster.assignment import Assignment
from agent.cluster.state import Placement, Stage
from agent.cluster.status import speculation_report
from agent.serving.balance import LoadBook, ReplicaLoad, measured_load


def solo(instance_id: str, model: str) -> Placement:
    return Placement(instance_id=instance_id, model=model, strategy="single",
                     stages=[Stage(nodes=["n"], layer_start=0, layer_stop=30)])


def test_a_heads_draft_counts_travel_in_its_load() -> None:
    stats = {"active": 1.0, "drafted_tokens_total": 40.0, "accepted_draft_tokens_total": 30.0,
             "draft_passes_total": 8.0}
    load = measured_load("m-0", "n", stats, 8, LoadBook())
    assert (load.drafted_tokens, load.accepted_draft_tokens, load.draft_passes) == (40, 30, 8)
    # A peer of an older version sends no such fields: they read as zero.
    old = msgspec.json.decode(b'{"instance_id": "m-1"}', type=ReplicaLoad)
    assert old.drafted_tokens == old.accepted_draft_tokens == old.draft_passes == 0


def test_status_sums_draft_counts_per_model() -> None:
    assignment = Assignment(placements=[solo("m-0", "m"), solo("m-1", "m"), solo("m-2", "m"),
                                        solo("q-0", "q")])
    loads = {"m-0": ReplicaLoad(instance_id="m-0", drafted_tokens=40, accepted_draft_tokens=30,
                                draft_passes=8),
             "m-1": ReplicaLoad(instance_id="m-1", drafted_tokens=60, accepted_draft_tokens=20,
                                draft_passes=2)}  # m-2: no load known
    report = speculation_report(assignment, loads)
    assert report["m"] == {"drafted_tokens": 100, "accepted_tokens": 50, "draft_passes": 10,
                           "acceptance_rate": 0.5, "accepted_per_pass": 5.0}
    assert report["q"] == {"drafted_tokens": 0, "accepted_tokens": 0, "draft_passes": 0,
                           "acceptance_rate": 0.0, "accepted_per_pass": 0.0}
