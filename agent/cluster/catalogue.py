"""What the cluster knows of models: shapes for placement, and the info of models only peers hold.

A model in this node's store is described from its directory; one only other nodes hold is asked
once from a holder (`/cluster/models/{model}/info`), for placement, `/v1/models` and the APIs'
context checks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from urllib.parse import quote

import msgspec

from agent.cluster.peers import PeerClient, PeerError, base_url
from agent.cluster.shape import model_shape
from agent.cluster.state import ModelShape, NodeProfile
from agent.engine import ModelInfo, ModelNotFound, canonical_name
from agent.models.store import ModelStore

log = logging.getLogger("flock.cluster")


class ModelCatalogue:
    def __init__(self, store: ModelStore, client: PeerClient) -> None:
        self.store = store
        self.client = client
        self._shapes: dict[str, ModelShape] = {}
        # Models only other nodes hold: name -> (info, shape), from a holder.
        self._remote: dict[str, tuple[ModelInfo, ModelShape]] = {}

    def shape(self, model: str) -> ModelShape | None:
        if model not in self._shapes:
            try:
                self._shapes[model] = model_shape(self.store.resolve(model), model)
            except (ModelNotFound, OSError, ValueError, KeyError) as exc:
                remote = self._remote.get(model)
                if remote is None:
                    log.debug("no shape for %s: %s", model, exc)
                    return None
                self._shapes[model] = remote[1]
        return self._shapes[model]

    def remote_info(self, model: str) -> ModelInfo | None:
        entry = self._remote.get(canonical_name(model))
        return entry[0] if entry else None

    def remote_models(self) -> list[ModelInfo]:
        return [info for info, _ in self._remote.values()]

    async def refresh(self, peers: Iterable[NodeProfile]) -> None:
        """Ask a holder once for each model peers hold and this node does not."""
        local = {m.name for m in self.store.list()}
        for profile in peers:
            if not profile.addresses:
                continue
            for model in profile.models:
                if model in local or model in self._remote:
                    continue
                url = (base_url(profile.addresses[0], profile.api_port)
                       + f"/cluster/models/{quote(model, safe='')}/info")
                try:
                    response = await self.client.request("GET", url)
                    if response.status_code == 200:
                        data = response.json()
                        self._remote[model] = (msgspec.convert(data["info"], ModelInfo),
                                               ModelShape.model_validate(data["shape"]))
                except (PeerError, ValueError, KeyError, msgspec.ValidationError) as exc:
                    log.debug("no info for %s from %s: %s", model, profile.name, exc)
