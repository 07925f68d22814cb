"""What the cluster knows of models: shapes for placement, and the info of models only peers hold.

A model in this node's store is described from its directory; one only other nodes hold is asked
once from a holder (`/cluster/models/{model}/info`), for placement, `/v1/models` and the APIs'
context checks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import msgspec

from agent.cluster.peers import PeerClient, PeerError, base_url
from agent.cluster.shape import SERVING_DTYPES, model_shape, resolved_shape, shape_for_dtype
from agent.cluster.state import ModelShape, NodeProfile
from agent.engine import ModelInfo, ModelNotFound, canonical_name
from agent.models.store import ModelStore

log = logging.getLogger("flock.cluster")


class ModelCatalogue:
    def __init__(self, store: ModelStore, client: PeerClient) -> None:
        self.store = store
        self.client = client
        self._shapes: dict[tuple[str, str], ModelShape] = {}
        # Models only other nodes hold: name -> (info, shape at each serving format).
        self._remote: dict[str, tuple[ModelInfo, dict[str, ModelShape]]] = {}

    def shape(self, model: str, dtype: str = "float32",
              nodes: list[NodeProfile] | None = None) -> ModelShape | None:
        """`model`'s placement shape at the format `dtype` resolves to on `nodes`."""
        return resolved_shape(dtype, nodes or [], lambda fmt: self._stored_shape(model, fmt))

    def _stored_shape(self, model: str, dtype: str) -> ModelShape | None:
        """The shape at one concrete format, read once (from the safetensors headers here, or
        as the holder sent it); "auto" is resolved by the caller, so the nodes' free memory,
        which moves all the time, never forces a read again."""
        key = (model, dtype)
        if key not in self._shapes:
            try:
                self._shapes[key] = model_shape(self.store.resolve(model), model, dtype=dtype)
            except (ModelNotFound, OSError, ValueError, KeyError) as exc:
                remote = self._remote.get(model)
                if remote is None or dtype not in remote[1]:
                    log.debug("no shape for %s: %s", model, exc)
                    return None
                self._shapes[key] = remote[1][dtype]
        return self._shapes[key]

    def remote_info(self, model: str) -> ModelInfo | None:
        entry = self._remote.get(canonical_name(model))
        return entry[0] if entry else None

    def remote_models(self) -> list[ModelInfo]:
        return [info for info, _ in self._remote.values()]

    @staticmethod
    def shapes_of(model_dir: Any, model: str) -> dict[str, ModelShape]:
        """The shape at every serving format, as a holder sends them to peers."""
        return {dtype: shape_for_dtype(model_dir, model, dtype, []) for dtype in SERVING_DTYPES}

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
                        shapes = {dtype: ModelShape.model_validate(shape)
                                  for dtype, shape in data["shapes"].items()}
                        self._remote[model] = (msgspec.convert(data["info"], ModelInfo), shapes)
                except (PeerError, ValueError, KeyError, msgspec.ValidationError) as exc:
                    log.debug("no info for %s from %s: %s", model, profile.name, exc)
