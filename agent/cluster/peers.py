"""Agent-to-agent HTTP: a client that signs every request and checks every answer, and the
server-side checks the admin API applies to what peers send it.

A request's signature covers its method, target (path and query), sender node id, timestamp and
body, so it cannot be replayed against another endpoint or re-attributed; a response's signature
covers its body and the request's signature, so an answer cannot be replayed to another question.
A node with API keys and no secret (keys-only mode) signs with the secret derived from its first
key (`agent.cluster.auth.effective_secret`), so no API key is ever sent to a peer: a host that
does not hold the key cannot sign, and learns nothing from us. Without any secret (open mode:
no secret, no keys) nothing is signed and everything is accepted: the admin API's rule that
open-mode admin calls come from loopback only is what protects a node then.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, field_validator

from agent.cluster.auth import (
    HEADER_NODE,
    HEADER_SIGNATURE,
    HEADER_TIME,
    REPLAY_WINDOW_S,
    ReplayGuard,
    format_timestamp,
    sign,
    verify,
)
from agent.cluster.membership import lenient_profile
from agent.cluster.state import NodeProfile

PROFILE_PATH = "/cluster/profile"
SPEC_PATH = "/cluster/spec"


class ProfileReply(BaseModel):
    """The body of GET /cluster/profile: who answers, and which process of it."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # newer peers may add fields

    cluster: str
    boot_nonce: int
    profile: NodeProfile

    @field_validator("profile", mode="before")
    @classmethod
    def _lenient(cls, value: Any) -> Any:
        return lenient_profile(value) if isinstance(value, dict) else value


class PeerError(Exception):
    """A peer could not be reached, refused us, or answered something we cannot trust."""


class PeerAuthError(PeerError):
    """Authentication failed in either direction (wrong secret, clock skew, forged answer)."""


@dataclass(frozen=True)
class PeerResponse:
    """A peer's answer, read in full (under the client's size limit) and authenticated."""

    status_code: int
    headers: httpx.Headers
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


def base_url(address: str, port: int) -> str:
    """http://address:port, with IPv6 literals bracketed."""
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    return f"http://{host}:{port}"


def request_context(method: str, target: str, node_id: str) -> str:
    return f"request {method.upper()} {target} {node_id}"


def response_context(request_signature: str) -> str:
    return f"response {request_signature}"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Server frameworks hand over case-insensitive mappings; plain dicts from tests may not be.
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def signed_headers(
    secret: str | None, node_id: str, method: str, target: str, body: bytes,
    now: float | None = None,
) -> dict[str, str]:
    """Headers for one agent-to-agent request; `target` is the path plus '?query' if any.

    With a secret (configured, or derived from the first API key) the request is signed; in open
    mode it only names the sender. No API key is ever among them.
    """
    ts = time.time() if now is None else now
    headers = {HEADER_NODE: node_id, HEADER_TIME: format_timestamp(ts)}
    if secret:
        headers[HEADER_SIGNATURE] = sign(
            secret, body, ts, context=request_context(method, target, node_id)
        )
    return headers


def verify_request(
    headers: Mapping[str, str],
    body: bytes,
    secret: str | None,
    *,
    method: str,
    target: str,
    now: float | None = None,
    window_s: float = REPLAY_WINDOW_S,
    replay_guard: ReplayGuard | None = None,
) -> str | None:
    """Server side: None when the request may proceed, else the reason to answer 401.

    `target` must be the raw path plus '?query' exactly as received. With no secret every
    request passes (open mode). Pass one `replay_guard` per server to refuse a captured request
    sent again within the window.
    """
    if not secret:
        return None
    node_id = _header(headers, HEADER_NODE)
    if not node_id:
        return f"missing {HEADER_NODE} header"
    signature = _header(headers, HEADER_SIGNATURE)
    wall = time.time() if now is None else now
    error = verify(
        secret, body, _header(headers, HEADER_TIME), signature, now=wall, window_s=window_s,
        context=request_context(method, target, node_id),
    )
    if error:
        return error
    if replay_guard is not None and not replay_guard.first_use(signature or "", wall):
        return "replayed request"
    return None


def response_headers(
    secret: str | None, node_id: str, body: bytes, request_headers: Mapping[str, str],
    now: float | None = None,
) -> dict[str, str]:
    """Server side: headers that let the calling peer trust this response's body."""
    ts = time.time() if now is None else now
    headers = {HEADER_NODE: node_id, HEADER_TIME: format_timestamp(ts)}
    request_signature = _header(request_headers, HEADER_SIGNATURE)
    if secret and request_signature:
        headers[HEADER_SIGNATURE] = sign(
            secret, body, ts, context=response_context(request_signature)
        )
    return headers


def verify_response(
    headers: Mapping[str, str], body: bytes, secret: str | None, request_signature: str,
    *, now: float | None = None, window_s: float = REPLAY_WINDOW_S,
) -> str | None:
    """Client side: None when the response was signed by a holder of the secret for our request."""
    if not secret:
        return None
    return verify(
        secret, body, _header(headers, HEADER_TIME), _header(headers, HEADER_SIGNATURE),
        now=time.time() if now is None else now, window_s=window_s,
        context=response_context(request_signature),
    )


class PeerClient:
    """httpx.AsyncClient for calls to other agents, signed with the node's effective secret
    (configured, or derived from its first API key) and checking every answer's signature."""

    def __init__(
        self,
        *,
        node_id: str,
        secret: str | None,
        timeout_s: float = 5.0,
        connect_timeout_s: float = 2.0,
        window_s: float = REPLAY_WINDOW_S,
        max_response_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.node_id = node_id  # reassign after a re-key
        self.secret = secret
        self.window_s = window_s
        self.max_response_bytes = max_response_bytes
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            # Peers are addressed by IP on the cluster's links: never through a proxy from env.
            trust_env=False,
            follow_redirects=False,
        )

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        timeout_s: float | None = None,
    ) -> PeerResponse:
        """Send one signed request; raises PeerAuthError when either side fails authentication
        and PeerError when the peer cannot be reached or answers 5xx. Other statuses return."""
        body = content if content is not None else b""
        extra: dict[str, str] = {}
        if json_body is not None:
            body = json.dumps(json_body, separators=(",", ":")).encode()
            extra["Content-Type"] = "application/json"
        target = httpx.URL(url).raw_path.decode("ascii")
        headers = signed_headers(self.secret, self.node_id, method, target, body)
        request = self._client.build_request(
            method, url, content=body or None, headers={**extra, **headers},
            timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
        )
        try:
            response = await self._client.send(request, stream=True)
            try:
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self.max_response_bytes:
                        raise PeerError(f"{url}: response larger than {self.max_response_bytes}")
            finally:
                await response.aclose()
        except httpx.HTTPError as e:
            raise PeerError(f"{method} {url}: {type(e).__name__}: {e}") from e
        answer = PeerResponse(response.status_code, response.headers, bytes(data))
        if answer.status_code in (401, 403):
            raise PeerAuthError(
                f"{method} {url}: refused by peer ({answer.status_code}): {answer.text[:200]}"
            )
        if self.secret:
            error = verify_response(
                answer.headers, answer.content, self.secret, headers[HEADER_SIGNATURE],
                window_s=self.window_s,
            )
            if error:
                raise PeerAuthError(f"{method} {url}: untrusted response: {error}")
        if answer.status_code >= 500:
            raise PeerError(f"{method} {url}: {answer.status_code} {answer.text[:200]}")
        return answer

    async def get_profile(self, base: str) -> tuple[ProfileReply, float]:
        """The peer's profile and the request's round-trip time in seconds."""
        start = time.perf_counter()
        response = await self.request("GET", base + PROFILE_PATH)
        rtt = time.perf_counter() - start
        if response.status_code != 200:
            raise PeerError(f"GET {base}{PROFILE_PATH}: {response.status_code}")
        try:
            return ProfileReply.model_validate_json(response.content), rtt
        except ValueError as e:
            raise PeerError(f"GET {base}{PROFILE_PATH}: bad profile: {e}") from e

    async def post_spec(self, base: str, spec: Mapping[str, Any] | bytes) -> PeerResponse:
        """Offer a cluster spec to a peer (the leader distributing the accepted one)."""
        if isinstance(spec, bytes):
            return await self.request("POST", base + SPEC_PATH, content=spec)
        return await self.request("POST", base + SPEC_PATH, json_body=dict(spec))
