"""Cluster endpoints: status, placements by API, spec deploys, and the agent-to-agent calls.

Who may call what depends on the node's mode:
- **Secret** (a cluster secret is set): agent-to-agent calls (`/cluster/profile`,
  `/cluster/assignment` GET and POST, `/cluster/generate`, the shard endpoints of
  `agent.api.shards`, a spec or placement a node forwards to the leader) are signed with it
  (`agent.cluster.peers`); admin calls (`POST/DELETE /cluster/instances`, `POST /cluster/spec`)
  need an API key or a member's signature.
- **Keys-only** (API keys, no secret): the node's secret is derived from its first API key
  (`agent.cluster.auth.effective_secret`), and everything above works as with a secret: agent-to-
  agent calls must be signed with it (an API key alone is refused there, and nodes never send
  one to each other), admin calls need an API key or a member's signature. Every node of such a
  cluster must list the same first key.
- **Open** (no secret, no keys): agent-to-agent calls are accepted from anyone (zero-config
  clustering needs them public), admin calls from loopback or from a member calling from its own
  address only.
`GET /cluster` (status) answers whoever may use the node's APIs: with API keys, a key holder.
A refused call gets 401 (403: open mode, admin call not from loopback) as
`{"error": {"message", "type"}}`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.response import Stream

from agent.api.guards import admin_error, key_error, peer_error
from agent.cluster.assignment import Assignment
from agent.cluster.controller import ClusterController
from agent.cluster.peers import PeerError, ProfileReply, response_headers
from agent.engine import canonical_name
from agent.generation import GenerationRequest
from agent.runtime.protocol import frame
from agent.serving.engine import NodeEngine


def _controller(request: Request[Any, Any, Any]) -> ClusterController:
    return request.app.state["cluster"]  # type: ignore[no-any-return]


def _engine(request: Request[Any, Any, Any]) -> NodeEngine:
    return request.app.state["engine"]  # type: ignore[no-any-return]


def _error_body(status: int, message: str) -> dict[str, Any]:
    kind = {401: "authentication_error", 403: "permission_error"}.get(status, "cluster_error")
    return {"error": {"message": message, "type": kind}}


def _error(status: int, message: str) -> Response[dict[str, Any]]:
    return Response(_error_body(status, message), status_code=status)


def _answer(request: Request[Any, Any, Any], content: dict[str, Any],
            status: int = 200) -> Response[Any]:
    """An admin call's JSON answer, signed when the request was (a member forwarding it to the
    leader checks every answer, errors included)."""
    cluster = _controller(request)
    body = msgspec.json.encode(content)
    return Response(body, status_code=status, media_type="application/json",
                    headers=response_headers(cluster.secret, cluster.node_id, body,
                                             dict(request.headers)))


def _admin_refusal(request: Request[Any, Any, Any], status: int, message: str) -> Response[Any]:
    return _answer(request, _error_body(status, message), status)


class InstanceRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    strategy: str = "auto"
    nodes: list[str] | None = None
    owner: str = "api"
    replicas: int = 1


class ClusterApi(Controller):
    path = "/cluster"
    tags = ["Cluster"]

    @get("", summary="Nodes, links, placements and runner states")
    async def status(self, request: Request[Any, Any, Any]) -> Response[Any]:
        # Whoever may use this node's APIs: with API keys, a key holder.
        cluster = _controller(request)
        problem = key_error(request, cluster.settings.api_keys)
        if problem:
            return _error(401, problem)
        return Response(cluster.status())

    @get("/profile", summary="This node's profile (agent-to-agent)")
    async def profile(self, request: Request[Any, Any, Any]) -> Response[Any]:
        # Open to unknown callers in open mode: static peers probe it to join (with a secret,
        # configured or derived from the first API key, they probe signed).
        problem = await peer_error(request, b"")
        if problem:
            return _error(401, problem)
        cluster = _controller(request)
        reply = ProfileReply(cluster=cluster.cluster_name, boot_nonce=cluster.identity.boot_nonce,
                             profile=cluster.profile())
        body = reply.model_dump_json().encode()
        return Response(body, media_type="application/json",
                        headers=response_headers(cluster.secret, cluster.node_id, body,
                                                 dict(request.headers)))

    @get("/assignment", summary="The placements this node follows (agent-to-agent)")
    async def current_assignment(self, request: Request[Any, Any, Any]) -> Response[Any]:
        problem = await peer_error(request, b"")
        if problem:
            return _error(401, problem)
        cluster = _controller(request)
        body = cluster.assignment.model_dump_json().encode()
        return Response(body, media_type="application/json",
                        headers=response_headers(cluster.secret, cluster.node_id, body,
                                                 dict(request.headers)))

    @post("/assignment", summary="The leader's placements (agent-to-agent)", status_code=200)
    async def assignment(self, request: Request[Any, Any, Any]) -> Response[Any]:
        body = await request.body()
        problem = await peer_error(request, body)
        if problem:
            return _error(401, problem)
        cluster = _controller(request)
        try:
            assignment = Assignment.model_validate_json(body)
        except ValueError as exc:
            return _error(400, f"bad assignment: {exc}")
        taken = cluster.accept_assignment(assignment)
        answer = msgspec.json.encode({"accepted": taken})
        return Response(answer, media_type="application/json",
                        headers=response_headers(cluster.secret, cluster.node_id, answer,
                                                 dict(request.headers)))

    @post("/generate", summary="Run a request on this node's head runner (agent-to-agent)",
          status_code=200)
    async def generate(self, request: Request[Any, Any, Any]) -> Response[Any]:
        body = await request.body()
        problem = await peer_error(request, body)
        if problem:
            return _error(401, problem)
        try:
            generation = msgspec.msgpack.decode(body, type=GenerationRequest)
        except msgspec.DecodeError as exc:
            return _error(400, f"bad request: {exc}")
        # Tracked like the node's own requests: a shutdown ends it with an error event.
        stream = _engine(request).generate_on(generation, request.query_params.get("instance"))

        async def events() -> AsyncIterator[bytes]:
            try:
                async for event in stream:
                    yield frame(event)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        return Stream(events(), media_type="application/x-flock-events")

    @get("/load", summary="Measured loads of this node's head runners (agent-to-agent)")
    async def load(self, request: Request[Any, Any, Any]) -> Response[Any]:
        problem = await peer_error(request, b"")
        if problem:
            return _error(401, problem)
        cluster = _controller(request)
        body = msgspec.json.encode(cluster.router.local_loads())
        return Response(body, media_type="application/json",
                        headers=response_headers(cluster.secret, cluster.node_id, body,
                                                 dict(request.headers)))

    @post("/spec", summary="Deploy a cluster.toml (TOML body)", status_code=200)
    async def spec(self, request: Request[Any, Any, Any]) -> Response[Any]:
        body = await request.body()
        problem = await admin_error(request, body)
        if problem:
            return _admin_refusal(request, 403 if "loopback" in problem else 401, problem)
        cluster = _controller(request)
        text = body.decode("utf-8", "replace")
        if not cluster.is_leader:
            try:
                await cluster.send_spec_to_leader(text)
            except PeerError as exc:
                return _admin_refusal(request, 503, f"could not reach the leader: {exc}")
        errors = cluster.propose_spec(text) if cluster.is_leader else _validate(text)
        if errors:
            return _answer(request, {"accepted": False, "errors": errors}, 400)
        return _answer(request, {"accepted": True, "leader": cluster.leader})

    @post("/instances", summary="Place an instance of a model", status_code=201)
    async def place(self, request: Request[Any, Any, Any]) -> Response[Any]:
        body = await request.body()
        problem = await admin_error(request, body)
        if problem:
            return _admin_refusal(request, 403 if "loopback" in problem else 401, problem)
        try:
            wanted = msgspec.json.decode(body, type=InstanceRequest)
        except msgspec.DecodeError as exc:
            return _admin_refusal(request, 400, f"bad request: {exc}")
        if not 1 <= wanted.replicas <= 64:
            return _admin_refusal(request, 400, "replicas must be 1 to 64")
        if wanted.strategy not in ("auto", "pipeline", "tensor", "hybrid"):
            return _admin_refusal(request, 400, f"unknown strategy {wanted.strategy!r}")
        cluster = _controller(request)
        if not any(canonical_name(wanted.model) in n.models for n in cluster.nodes().values()):
            return _admin_refusal(request, 404, f"model '{wanted.model}' is in no node's store")
        try:
            instance_id = await cluster.request_instance(
                wanted.model, strategy=wanted.strategy, nodes=wanted.nodes,
                owner=wanted.owner if wanted.owner in ("api", "auto") else "api",
                replicas=wanted.replicas)
        except PeerError as exc:
            return _admin_refusal(request, 503, str(exc))
        return _answer(request, {"instance_id": instance_id}, 201)

    @delete("/instances/{instance_id:str}", summary="Remove an API-placed instance",
            status_code=200)
    async def remove(self, request: Request[Any, Any, Any], instance_id: str) -> Response[Any]:
        problem = await admin_error(request, b"")
        if problem:
            return _admin_refusal(request, 403 if "loopback" in problem else 401, problem)
        cluster = _controller(request)
        try:
            why = await cluster.remove_instance(instance_id)
        except PeerError as exc:
            return _admin_refusal(request, 503, str(exc))
        if why == "not_found":
            return _admin_refusal(request, 404, f"no instance {instance_id}")
        if why == "spec":
            return _admin_refusal(request, 409, f"{instance_id} is owned by cluster.toml; "
                                                "edit the spec instead")
        if why is not None:
            return _admin_refusal(request, 502, why)
        return _answer(request, {"removed": instance_id})


def _validate(text: str) -> list[str]:
    from agent.spec import parse_spec

    spec, errors = parse_spec(text)
    return [] if spec is not None else [str(e) for e in errors]
