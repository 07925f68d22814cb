"""Where a draft model runs (pure): the head's node when it has room, else a spare node; the
leader's plan records it, and wiring gives the draft node a draft runner the head asks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec

from agent.cluster.draft_placement import choose_draft_node, draft_bytes
from agent.cluster.reconcile import DesiredInstance, DesiredState, ObservedState, plan
from agent.cluster.state import Placement, Stage
from agent.cluster.wiring import runner_configs
from agent.runtime.protocol import RunnerConfig
from agent.serving.pool import RunnerPlan, RunnerPool, _Entry
from agent.settings import NodeSettings
from agent.spec import ClusterSpec
from tests.test_placement import SMOLLM2, node

MiB = 1 << 20
DRAFT = SMOLLM2.model_copy(update={"name": "tiny", "num_layers": 2})
NEED = draft_bytes(DRAFT, kv_headroom_tokens=4096)


def single(on: str = "n0") -> Placement:
    return Placement(instance_id="m-0", model="m", strategy="single",
                     stages=[Stage(layer_start=0, layer_stop=30, nodes=[on])])


def pipeline(*on: str) -> Placement:
    return Placement(instance_id="m-0", model="m", strategy="pipeline",
                     stages=[Stage(layer_start=i, layer_stop=i + 1, nodes=[n])
                             for i, n in enumerate(on)])


def test_the_draft_counts_its_weights_and_kv() -> None:
    weights = DRAFT.embedding_bytes + 2 * DRAFT.layer_bytes
    assert weights + 2 * 4096 * DRAFT.kv_bytes_per_token_per_layer <= NEED
    assert draft_bytes(DRAFT, kv_headroom_tokens=8192) > NEED


def test_the_head_drafts_itself_when_its_node_has_room() -> None:
    nodes = [node(0, 2 * NEED), node(1, 10 * NEED)]
    assert choose_draft_node(single(), NEED, nodes) is None
    assert choose_draft_node(single(), None, nodes) is None  # draft's shape unknown


def test_a_short_head_drafts_on_a_spare_node_first() -> None:
    # n0 (head) has room for its stage only; n1 is a stage with the most room; n2 is spare.
    nodes = [node(0, NEED // 2), node(1, 10 * NEED), node(2, 2 * NEED)]
    assert choose_draft_node(pipeline("n0", "n1"), NEED, nodes) == "n2"
    # No spare with room: the stage node with the most room.
    nodes = [node(0, NEED // 2), node(1, 10 * NEED), node(2, NEED // 2)]
    assert choose_draft_node(pipeline("n0", "n1"), NEED, nodes) == "n1"
    # Its own runners' memory counts: n1's stage leaves it too little.
    assert choose_draft_node(pipeline("n0", "n1"), NEED, nodes, {"n1": 9 * NEED + 1}) is None


def test_a_pin_wins_and_a_kept_placement_keeps_its_draft() -> None:
    nodes = [node(0, 10 * NEED), node(1, NEED // 2)]
    assert choose_draft_node(single(), NEED, nodes, pinned="node1") == "n1"
    assert choose_draft_node(single(), NEED, nodes, pinned="n0") is None
    assert choose_draft_node(single(), NEED, nodes, pinned="gone") is None
    short = [node(0, 0), node(1, 10 * NEED)]
    assert choose_draft_node(single(), NEED, short, kept=True, previous=None) is None
    assert choose_draft_node(single(), NEED, [*short, node(2, 0)], kept=True,
                             previous="n2") == "n2"
    assert choose_draft_node(single(), NEED, short, kept=True, previous="n2") == "n1"


def test_the_leader_records_the_draft_node_and_keeps_it() -> None:
    shapes = {"smollm2": SMOLLM2.model_copy(update={"name": "smollm2"}), "tiny": DRAFT}
    entry = DesiredInstance(key="smollm2", model="smollm2", draft="tiny", draft_node="node1")
    desired = DesiredState(instances=[entry], shapes=shapes)
    observed = ObservedState(nodes=[node(0, 2000 * MiB), node(1, 2000 * MiB)])
    placed = [a.placement for a in plan(desired, observed) if a.kind == "place"]
    assert [(p.head_node, p.draft_node) for p in placed] == [("n0", "n1")]
    after = observed.model_copy(update={"placements": placed})
    assert not [a for a in plan(desired, after) if a.kind == "place"]
    # No pin and room on the head: the head runner drafts.
    free = DesiredState(instances=[entry.model_copy(update={"draft_node": None})], shapes=shapes)
    assert [a.placement.draft_node for a in plan(free, observed) if a.kind == "place"] == [None]


def test_the_spec_field_reaches_the_desired_state() -> None:
    from agent.cluster.reconcile import desired_from_spec

    spec = ClusterSpec.model_validate(
        {"models": [{"model": "smollm2", "draft": "tiny", "draft_node": "node1"}]})
    (entry,) = desired_from_spec(spec, {}).instances
    assert (entry.draft, entry.draft_node) == ("tiny", "node1")
    assert "draft" not in entry.model_dump()  # never sent


def test_wiring_starts_a_draft_runner_the_head_asks() -> None:
    profiles = {n.node_id: n.model_copy(update={"addresses": [f"10.0.0.{i}"]})
                for i, n in enumerate([node(0, 1), node(1, 1)])}
    base = RunnerConfig(model_name="", model_dir="", draft_name="tiny")
    configs = runner_configs(single().model_copy(update={"draft_node": "n1"}), 3, profiles, base)
    head, drafter = configs[("n0", 0)], configs[("n1", 1)]
    assert drafter.role == "draft" and drafter.model_name == "tiny"
    assert drafter.draft_name == "m"  # its node checks the draft against m's tokenizer
    assert head.draft_remote == drafter.listen == f"10.0.0.1:{52500 + 4 * 3 + 2}"
    # Drafting in the head, or no draft at all: no draft runner.
    assert set(runner_configs(single(), 3, profiles, base)) == {("n0", 0)}
    plain = RunnerConfig(model_name="", model_dir="")
    assert set(runner_configs(single().model_copy(update={"draft_node": "n1"}), 3, profiles,
                              plain)) == {("n0", 0)}


def test_a_refused_remote_draft_is_said_once_and_not_waited_for(smollm2_dir: Path,
                                                                tmp_path: Path) -> None:
    """Both ends check the draft against the target's tokenizer: the draft node does not start
    its draft runner (not a restart loop), the head starts without `draft_remote`."""
    from tests.draft_models import make_smollm2_draft, with_swapped_tokens

    swapped = with_swapped_tokens(make_smollm2_draft(smollm2_dir, tmp_path / "d"),
                                  tmp_path / "swapped")
    pool = RunnerPool(NodeSettings(state_dir=tmp_path / "state"))
    dirs = {"target": smollm2_dir, "swapped": swapped}

    async def tokenizer_dir(model: str) -> Path:
        return dirs[model]

    async def locate(model: str, config: RunnerConfig) -> Path:
        return dirs[model]

    pool.tokenizer_dir = tokenizer_dir

    async def main() -> None:
        drafter = RunnerConfig(model_name="swapped", model_dir="", role="draft",
                               draft_name="target", listen="127.0.0.1:1")
        entry = _Entry("m-0/1", RunnerPlan("swapped", drafter), locate)
        assert await pool._draft_refused(entry, drafter, swapped)
        assert entry.refused and entry.detail.startswith("draft model refused: ")
        head = RunnerConfig(model_name="target", model_dir="", draft_name="swapped",
                            draft_remote="127.0.0.1:1")
        entry = _Entry("m-0/0", RunnerPlan("target", head), locate)
        checked = await pool._with_draft(entry, head, smollm2_dir)
        assert checked.draft_remote is None and checked.draft_name is None
        assert entry.draft_refusal
        good = make_smollm2_draft(smollm2_dir, tmp_path / "d")
        dirs["good"] = good
        head = msgspec.structs.replace(head, draft_name="good")
        assert (await pool._with_draft(entry, head, smollm2_dir)) == head

    asyncio.run(main())


def test_a_draft_node_needs_a_draft_and_its_slot_is_free_there() -> None:
    import pytest

    from agent.cluster.wiring import free_slot

    with pytest.raises(ValueError, match="draft_node"):
        ClusterSpec.model_validate({"models": [{"model": "m", "draft_node": "b"}]})
    drafting = single().model_copy(update={"draft_node": "n1"})
    assert free_slot(single(), {"n1": {0}}) == 0
    assert free_slot(drafting, {"n1": {0}}) == 1
