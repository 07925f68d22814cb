"""Member convergence: from the assignment to the runners this node must run, handed to the pool.

Every node computes from the same assignment which ranks of which instances are its own
(`wiring.runner_configs`), with the runner settings the pool derives from NodeSettings and the
per-model settings of cluster.toml; the pool starts, restarts and stops runners to match. A
rank whose weights this node's store lacks gets them from a peer (`ShardSource`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import msgspec

from agent.cluster.assignment import Assignment
from agent.cluster.shard_source import ShardSource
from agent.cluster.state import NodeProfile, Placement
from agent.cluster.wiring import WiringError, runner_configs
from agent.engine import ModelNotFound, canonical_name
from agent.models.store import ModelStore
from agent.runtime.protocol import RunnerConfig
from agent.serving.pool import RunnerPlan, RunnerPool

log = logging.getLogger("flock.cluster")

STUCK_AFTER_S = 2.0  # a head with requests and no step for this long, and a node lost: stop it

# The name of a node of a placement that is not heard from, if any.
LostNode = Callable[[Placement], str | None]


class MemberConvergence:
    def __init__(self, pool: RunnerPool, store: ModelStore, shards: ShardSource) -> None:
        self.pool = pool
        self.store = store
        self.shards = shards
        pool.tokenizer_dir = self.tokenizer_dir

    def base_config(self, assignment: Assignment, model: str) -> RunnerConfig:
        """A runner of `model`: the pool's settings with cluster.toml's per-model ones."""
        spec = assignment.spec
        entry = next((m for m in spec.spec.models if canonical_name(m.model) == model),
                     None) if spec else None
        config = self.pool.base_config(context_length=entry.context_length if entry else None,
                                       kv_bits=entry.kv_bits if entry else None)
        if entry is not None and entry.prompt_lookup is not None:
            config = msgspec.structs.replace(config, prompt_lookup=entry.prompt_lookup)
        # A draft model: the spec entry's, else the node's `draft` for its default model.
        settings = self.pool.settings
        draft = entry.draft if entry is not None else None
        if draft is None and settings.draft and settings.model \
                and canonical_name(settings.model) == model:
            draft = settings.draft
        if draft is not None:
            config = msgspec.structs.replace(config, draft_name=canonical_name(draft))
        return config

    def wanted(self, assignment: Assignment, profiles: dict[str, NodeProfile],
               node_id: str) -> dict[str, RunnerPlan]:
        """"instance/rank" -> the runner this node runs for that rank."""
        configs: dict[str, tuple[str, RunnerConfig]] = {}
        for placement in assignment.placements:
            slot = assignment.slots.get(placement.instance_id)
            if slot is None or node_id not in [*placement.nodes(), placement.draft_node]:
                continue
            try:
                ranks = runner_configs(placement, slot, profiles,
                                       self.base_config(assignment, placement.model))
            except WiringError as exc:
                log.warning("cannot wire %s: %s", placement.instance_id, exc)
                continue
            for (node, rank), config in ranks.items():
                if node == node_id:
                    # A draft runner's model is the draft (`wiring.with_draft_runner`).
                    configs[f"{placement.instance_id}/{rank}"] = (config.model_name, config)
        return {key: RunnerPlan(model, config, local_ranks=len(configs))
                for key, (model, config) in configs.items()}

    async def converge(self, assignment: Assignment, profiles: dict[str, NodeProfile],
                       node_id: str) -> None:
        await self.pool.apply(self.wanted(assignment, profiles, node_id), self.locate)

    async def stop_stuck_heads(self, assignment: Assignment,
                               lost_node: LostNode) -> None:
        """Fail the requests of a head whose instance lost a node, now rather than at its link
        deadline: a head with requests in flight that has not stepped for STUCK_AFTER_S while a
        node of its placement is not heard from is stopped; its requests end with an error, and
        the pool restarts it (or convergence moves it, once the node is gone)."""
        placements = {p.instance_id: p for p in assignment.placements}
        for key in self.pool.stalled(STUCK_AFTER_S):
            placement = placements.get(key.rsplit("/", 1)[0])
            lost = lost_node(placement) if placement is not None else None
            if lost is None:
                continue
            log.warning("runner %s has not stepped for %.1fs and node %s is not heard from: "
                        "stopping it so that its %d requests fail now", key,
                        self.pool.stalled_for(key), lost, self.pool.in_flight(key))
            await self.pool.kill(key)

    async def tokenizer_dir(self, model: str) -> Path:
        """`model`'s tokenizer files: the store's copy, or fetched from a holder."""
        try:
            return self.store.resolve(model)
        except ModelNotFound:
            return await self.shards.tokenizer(model)

    async def locate(self, model: str, config: RunnerConfig) -> Path:
        """The weights of a rank: the store's copy, or the rank's shard from a peer."""
        try:
            return self.store.resolve(model)
        except ModelNotFound:
            return await self.shards.shard(model, config)
