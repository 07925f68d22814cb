"""Who may call what: agent-to-agent signatures, API keys, the open mode's loopback rule and
the Origin check of admin calls. Shared by the cluster, shard and dashboard endpoints."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any
from urllib.parse import urlsplit

from litestar import Request

from agent.cluster.auth import HEADER_NODE, ReplayGuard
from agent.cluster.peers import verify_request

_replay_guard = ReplayGuard()


def _cluster(request: Request[Any, Any, Any]) -> Any:
    return request.app.state["cluster"]


def foreign_origin(request: Request[Any, Any, Any]) -> str | None:
    """Why an admin call must be refused for its Origin (another site's page sent it), else
    None. Requests without an Origin (command-line clients, SDKs, peers) pass: browsers always
    send one on cross-site POST and DELETE."""
    origin = request.headers.get("origin")
    if origin is None:
        return None
    host = request.headers.get("host", "")
    parts = urlsplit(origin)
    if origin != "null" and parts.scheme in ("http", "https") and parts.netloc == host:
        return None
    return (f"admin calls from another web page (Origin {origin}) are refused: use the dashboard "
            "this node serves at /ui, or a client on loopback without an Origin")


def _target(request: Request[Any, Any, Any]) -> str:
    query = request.scope.get("query_string", b"").decode()
    return request.url.path + (f"?{query}" if query else "")


async def peer_error(request: Request[Any, Any, Any], body: bytes) -> str | None:
    """None when the caller may make an agent-to-agent call, else why not (a 401).

    With a secret (configured, or derived from the first API key in keys-only mode) members
    sign; in open mode anyone is let in.
    """
    cluster = _cluster(request)
    return peer_signature_error(request, body, cluster.secret, cluster.auth_mode,
                                window_s=cluster.settings.auth_window_s,
                                replay_guard=_replay_guard)


def peer_signature_error(request: Request[Any, Any, Any], body: bytes, secret: str | None,
                         mode: str, *, window_s: float,
                         replay_guard: ReplayGuard) -> str | None:
    """None when an agent-to-agent request is signed by a holder of `secret` (or the node is in
    open mode), else why not; in keys-only mode the reason says how peers sign."""
    if not secret:
        return None
    problem = verify_request(dict(request.headers), body, secret, method=request.method,
                             target=_target(request), window_s=window_s, replay_guard=replay_guard)
    if problem and mode == "keys":
        return (f"{problem}: agent-to-agent calls must be signed with the cluster secret, which "
                "in keys-only mode is derived from the first API key (an API key alone is not "
                "accepted here)")
    return problem


def key_error(request: Request[Any, Any, Any], keys: list[str]) -> str | None:
    """None when the node has no API keys or the caller presents one of them, else why not."""
    if not keys or _key_ok(_bearer(request), keys):
        return None
    return ("this node requires an API key (no cluster secret is set): send it as "
            "'Authorization: Bearer <key>' or 'x-api-key: <key>'")


def is_loopback(request: Request[Any, Any, Any]) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key_ok(given: str | None, keys: list[str]) -> bool:
    """Constant-time: a key is not guessed byte by byte from response times."""
    return given is not None and any(hmac.compare_digest(given.encode(), k.encode())
                                     for k in keys)


def _bearer(request: Request[Any, Any, Any]) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


async def admin_error(request: Request[Any, Any, Any], body: bytes) -> str | None:
    # Another site's page in the user's browser must not place or remove anything.
    origin = foreign_origin(request)
    if origin:
        return origin
    cluster = _cluster(request)
    keys = cluster.settings.api_keys
    if keys and _key_ok(_bearer(request), keys):
        return None
    if cluster.secret:  # configured, or derived from the first API key (keys-only mode)
        if request.headers.get(HEADER_NODE):
            return await peer_error(request, body)
        return "admin calls need an API key or a cluster member's signature"
    if is_loopback(request) or _from_member(request):
        return None
    return "in open mode (no cluster secret), admin calls are accepted from loopback only"


def _from_member(request: Request[Any, Any, Any]) -> bool:
    """Open mode: a call forwarded by a cluster member, from that member's own address."""
    node = request.headers.get(HEADER_NODE)
    host = request.client.host if request.client else ""
    profile = _cluster(request).nodes().get(node or "")
    return profile is not None and host in profile.addresses
