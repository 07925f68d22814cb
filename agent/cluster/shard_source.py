"""Where a node gets the weights of a stage it must run but does not hold: from a peer.

The store keeps complete models; a node assigned layers of a model it lacks fetches exactly
those tensors (agent/models/shards.py) from a node whose store has the model, and a node that
only relays requests fetches just the tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

import httpx

from agent.cluster.peers import base_url, signed_headers
from agent.cluster.state import NodeProfile
from agent.engine import ModelNotFound
from agent.models.arch import LayerRange
from agent.models.shards import (
    ShardError,
    StageSelector,
    complete,
    fetch_shard,
    fetch_small_files,
    shard_dir,
)
from agent.runtime.protocol import RunnerConfig

log = logging.getLogger("flock.shards")


def selector_for(config: RunnerConfig, num_layers: int) -> StageSelector:
    """The tensors a runner of this configuration loads (see runtime/runner.py `load`)."""
    head = config.role in ("solo", "head")
    start = config.layer_start if config.layer_start is not None else 0
    stop = config.layer_stop if config.layer_stop is not None else num_layers
    embeds = head or (config.role == "tp_follower" and start == 0)
    # A pipeline's last stage holds the head weights too: it projects part of the vocabulary
    # for decode steps (`runtime/vocab_split.py`).
    projects = head or (config.role == "follower" and stop == num_layers)
    return StageSelector(start, stop, embeds, projects)


class ShardSource:
    """Fetches from the peers `peers()` lists (live nodes other than this one), signed as this
    node (`node_id()` is read at each request: the node may rekey)."""

    def __init__(self, client: httpx.AsyncClient, models_dir: Path, *, secret: str | None,
                 node_id: Callable[[], str],
                 peers: Callable[[], list[NodeProfile]]) -> None:
        self.client = client
        self.models_dir = models_dir
        self.secret = secret
        self.node_id = node_id
        self.peers = peers
        self._locks: dict[Path, asyncio.Lock] = {}

    def holders(self, model: str) -> list[NodeProfile]:
        me = self.node_id()
        return [p for p in self.peers()
                if model in p.models and p.node_id != me and p.addresses]

    def _sign(self, method: str, path: str, body: bytes) -> dict[str, str]:
        return signed_headers(self.secret, self.node_id(), method, path, body)

    async def _from_holders(self, model: str, fetch: object) -> Path:
        errors = []
        for holder in self.holders(model):
            base = base_url(holder.addresses[0], holder.api_port)
            try:
                return await fetch(base)  # type: ignore[operator,no-any-return]
            except (ShardError, httpx.HTTPError, OSError) as exc:
                errors.append(f"{holder.name}: {exc}")
                log.warning("fetching %s from %s failed: %s", model, holder.name, exc)
        if errors:
            raise ShardError(f"could not fetch {model}: {'; '.join(errors)}")
        raise ModelNotFound(model)

    async def tokenizer(self, model: str) -> Path:
        target = self.models_dir / ".shards" / "tokenizers" / model.replace("/", "--")
        async with self._locks.setdefault(target, asyncio.Lock()):
            if (target / "config.json").exists():
                return target
            client = self.client
            return await self._from_holders(
                model, lambda base: fetch_small_files(client, base, model, target, self._sign))

    async def shard(self, model: str, config: RunnerConfig) -> Path:
        small = await self.tokenizer(model)
        layers = int(json.loads((small / "config.json").read_text())["num_hidden_layers"])
        selector = selector_for(config, layers)
        target = shard_dir(self.models_dir, model,
                           LayerRange(selector.layer_start, selector.layer_stop),
                           embeds=selector.embeds, projects=selector.projects)
        async with self._locks.setdefault(target, asyncio.Lock()):
            if complete(target):
                return target
            client = self.client
            log.info("fetching layers %d-%d of %s from a peer", selector.layer_start,
                     selector.layer_stop - 1, model)
            return await self._from_holders(
                model, lambda base: fetch_shard(client, base, model, selector, target,
                                                self._sign))
