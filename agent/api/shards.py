"""Serving model shards to peers: the small files and exactly the tensors a stage needs.

Agent-to-agent only: requests are signed with the node's cluster secret (configured, or in
keys-only mode derived from the first API key; an API key alone is refused); in open mode any
host on the cluster's networks may read the store's models, as it may use the APIs.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.response import Stream

from agent.api.guards import peer_signature_error
from agent.cluster.auth import ReplayGuard
from agent.cluster.catalogue import ModelCatalogue
from agent.cluster.peers import response_headers
from agent.engine import ModelNotFound
from agent.models.shards import (
    SMALL_FILES,
    ShardError,
    StageSelector,
    safetensors_stream,
    tensor_index,
)

_replay_guard = ReplayGuard()


class TensorRequest(msgspec.Struct, forbid_unknown_fields=True):
    layer_start: int
    layer_stop: int
    embeds: bool
    projects: bool


def _refused(request: Request[Any, Any, Any], body: bytes) -> Response[Any] | None:
    cluster = request.app.state["cluster"]
    problem = peer_signature_error(request, body, cluster.secret, cluster.auth_mode,
                                   window_s=cluster.settings.auth_window_s,
                                   replay_guard=_replay_guard)
    if problem:
        return Response({"error": {"message": problem, "type": "authentication_error"}},
                        status_code=401)
    return None


class ShardApi(Controller):
    path = "/cluster/models"
    tags = ["Cluster"]

    @get("/{model:str}/files/{name:str}", summary="A model's config or tokenizer file (peers)")
    async def file(self, request: Request[Any, Any, Any], model: str,
                   name: str) -> Response[Any]:
        refused = _refused(request, b"")
        if refused is not None:
            return refused
        if name not in SMALL_FILES:
            return Response({"error": {"message": f"{name} is not served"}}, status_code=404)
        try:
            path = request.app.state["engine"].model_dir(model) / name
        except ModelNotFound:
            return Response({"error": {"message": f"no model {model}"}}, status_code=404)
        if not path.is_file():
            return Response({"error": {"message": f"{model} has no {name}"}}, status_code=404)
        return Response(path.read_bytes(), media_type="application/octet-stream")

    @get("/{model:str}/info", summary="A model's info and placement shape (peers)")
    async def info(self, request: Request[Any, Any, Any], model: str) -> Response[Any]:
        refused = _refused(request, b"")
        if refused is not None:
            return refused
        try:
            model_dir, info = request.app.state["engine"].stored_model(model)
        except ModelNotFound:
            return Response({"error": {"message": f"no model {model}"}}, status_code=404)
        # A model nothing can run keeps its info (its refusal travels with it), and no shapes.
        shapes = {} if info.refusal else ModelCatalogue.shapes_of(model_dir, model)
        body = msgspec.json.encode({"info": info, "shapes": {
            dtype: shape.model_dump(mode="json") for dtype, shape in shapes.items()}})
        cluster = request.app.state["cluster"]
        return Response(body, media_type="application/json",
                        headers=response_headers(cluster.secret, cluster.node_id, body,
                                                 dict(request.headers)))

    @post("/{model:str}/tensors", summary="Some tensors of a model, as safetensors (peers)",
          status_code=200)
    async def tensors(self, request: Request[Any, Any, Any], model: str) -> Response[Any]:
        body = await request.body()
        refused = _refused(request, body)
        if refused is not None:
            return refused
        try:
            wanted = msgspec.json.decode(body, type=TensorRequest)
            model_dir = request.app.state["engine"].model_dir(model)
            selector = StageSelector(wanted.layer_start, wanted.layer_stop, wanted.embeds,
                                     wanted.projects)
            stream = safetensors_stream(tensor_index(model_dir), selector.names(model_dir))
            first = next(stream)  # fails here, before the 200, on unknown tensors
        except ModelNotFound:
            return Response({"error": {"message": f"no model {model}"}}, status_code=404)
        except (msgspec.DecodeError, ShardError, ValueError) as exc:
            return Response({"error": {"message": str(exc)}}, status_code=400)

        def chunks() -> Any:
            yield first
            yield from stream

        return Stream(chunks(), media_type="application/octet-stream")
