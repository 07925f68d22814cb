"""Cluster secret: tags, signatures, replay, and the signed agent-to-agent HTTP client against a
real server (a small threaded one on loopback that applies the server-side checks)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.cluster.auth import (
    HEADER_NODE,
    HEADER_SIGNATURE,
    HEADER_TIME,
    KEY_SECRET_LABEL,
    ReplayGuard,
    auth_mode,
    cluster_tag,
    effective_secret,
    generate_secret,
    secret_from_key,
    sign,
    verify,
)
from agent.cluster.peers import (
    PROFILE_PATH,
    SPEC_PATH,
    PeerAuthError,
    PeerClient,
    PeerError,
    ProfileReply,
    base_url,
    response_headers,
    signed_headers,
    verify_request,
)
from agent.cluster.state import NodeProfile
from agent.settings import NodeSettings
from agent.spec import ClusterSpec

SECRET = "correct horse battery staple"


def profile(node_id: str = "b" * 32, name: str = "peer", **extra: object) -> NodeProfile:
    return NodeProfile(node_id=node_id, name=name, version="0.1.0", addresses=["127.0.0.1"],
                       api_port=52415, memory_total_bytes=8 << 30,
                       memory_available_bytes=4 << 30, **extra)  # type: ignore[arg-type]


# -- tags and signatures ---------------------------------------------------------------------


def test_tags_separate_clusters_by_secret_and_name() -> None:
    tags = {
        cluster_tag(None, "flock"), cluster_tag(None, "lab"),
        cluster_tag("s1", "flock"), cluster_tag("s2", "flock"), cluster_tag("s1", "lab"),
    }
    assert len(tags) == 5
    assert cluster_tag("s1", "flock") == cluster_tag("s1", "flock")
    assert cluster_tag(None, "flock") == cluster_tag("", "flock")  # empty secret = open mode
    assert all(len(t) == 16 for t in tags)


def test_tag_is_not_the_signing_key() -> None:
    # Knowing the tag (it is on the wire) must not let anyone sign.
    tag = cluster_tag(SECRET, "flock")
    assert tag not in sign(SECRET, b"", 0.0)


def test_signature_roundtrip() -> None:
    now = 1_700_000_000.0
    sig = sign(SECRET, b"body", now, context="ctx")
    assert verify(SECRET, b"body", now, sig, now=now + 1, context="ctx") is None
    assert verify(SECRET, b"body", f"{now:.3f}", sig.upper(), now=now, context="ctx") is None


@pytest.mark.parametrize(
    ("secret", "body", "context", "reason"),
    [
        ("wrong secret", b"body", "ctx", "bad signature"),
        (SECRET, b"bodY", "ctx", "bad signature"),
        (SECRET, b"body", "other endpoint", "bad signature"),
    ],
)
def test_tampered_or_foreign_signatures_are_rejected(
    secret: str, body: bytes, context: str, reason: str
) -> None:
    now = 1_700_000_000.0
    sig = sign(SECRET, b"body", now, context="ctx")
    assert verify(secret, body, now, sig, now=now, context=context) == reason


def test_stale_and_future_timestamps_are_rejected() -> None:
    now = 1_700_000_000.0
    old = sign(SECRET, b"x", now - 31)
    future = sign(SECRET, b"x", now + 31)
    assert "window" in (verify(SECRET, b"x", now - 31, old, now=now) or "")
    assert "window" in (verify(SECRET, b"x", now + 31, future, now=now) or "")
    assert verify(SECRET, b"x", now - 31, old, now=now, window_s=60) is None


@pytest.mark.parametrize("ts", [None, "", "soon", "nan", "inf"])
def test_malformed_timestamps_are_rejected(ts: str | None) -> None:
    assert verify(SECRET, b"x", ts, "00" * 32, now=0.0) == "missing or malformed timestamp"


def test_missing_signature_is_rejected() -> None:
    assert verify(SECRET, b"x", 0.0, None, now=0.0) == "missing signature"


def test_replay_guard_counts_each_signature_once_and_forgets_old_ones() -> None:
    guard = ReplayGuard(window_s=30, max_entries=3)
    assert guard.first_use("a", 0.0)
    assert not guard.first_use("a", 1.0)
    assert guard.first_use("b", 1.0) and guard.first_use("c", 1.0)
    assert guard.first_use("d", 2.0)  # full: the oldest goes
    assert len(guard) == 3
    assert guard.first_use("b", 100.0)  # long past the window: forgotten (the clock check refuses)


def test_generated_secrets_are_long_and_distinct() -> None:
    a, b = generate_secret(), generate_secret()
    assert a != b and len(a) >= 40


# -- server-side verification ----------------------------------------------------------------


def test_verify_request_accepts_a_signed_request_once() -> None:
    body = b'{"generation": 3}'
    headers = signed_headers(SECRET, "a" * 32, "POST", SPEC_PATH, body, now=1000.0)
    guard = ReplayGuard()
    ok = verify_request(headers, body, SECRET, method="POST", target=SPEC_PATH, now=1001.0,
                        replay_guard=guard)
    assert ok is None
    again = verify_request(headers, body, SECRET, method="POST", target=SPEC_PATH, now=1002.0,
                           replay_guard=guard)
    assert again == "replayed request"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda h: {**h, HEADER_NODE: "c" * 32}, "bad signature"),  # re-attributed
        (lambda h: {k: v for k, v in h.items() if k != HEADER_NODE}, "missing X-Flock-Node"),
        (lambda h: {k: v for k, v in h.items() if k != HEADER_SIGNATURE}, "missing signature"),
        (lambda h: {**h, HEADER_TIME: "1001.000"}, "bad signature"),  # time moved
    ],
)
def test_verify_request_rejects_altered_headers(
    change: Callable[[dict[str, str]], dict[str, str]], expected: str
) -> None:
    headers = signed_headers(SECRET, "a" * 32, "GET", PROFILE_PATH, b"", now=1000.0)
    error = verify_request(change(headers), b"", SECRET, method="GET", target=PROFILE_PATH,
                           now=1000.0)
    assert error is not None and expected in error


def test_verify_request_binds_method_and_target() -> None:
    headers = signed_headers(SECRET, "a" * 32, "GET", PROFILE_PATH, b"", now=1000.0)
    assert verify_request(headers, b"", SECRET, method="DELETE", target=PROFILE_PATH,
                          now=1000.0) == "bad signature"
    assert verify_request(headers, b"", SECRET, method="GET", target=PROFILE_PATH + "?x=1",
                          now=1000.0) == "bad signature"


def test_verify_request_headers_are_case_insensitive() -> None:
    headers = signed_headers(SECRET, "a" * 32, "GET", PROFILE_PATH, b"", now=1000.0)
    lowered = {k.lower(): v for k, v in headers.items()}
    assert verify_request(lowered, b"", SECRET, method="get", target=PROFILE_PATH,
                          now=1000.0) is None


def test_open_mode_accepts_everything_and_signs_nothing() -> None:
    headers = signed_headers(None, "a" * 32, "GET", PROFILE_PATH, b"")
    assert HEADER_SIGNATURE not in headers and headers[HEADER_NODE] == "a" * 32
    assert verify_request({}, b"", None, method="GET", target=PROFILE_PATH) is None


def test_effective_secret_configured_then_derived_from_the_first_key_then_none(
        tmp_path: Path) -> None:
    def settings(**kw: object) -> NodeSettings:
        return NodeSettings(state_dir=tmp_path, models_dir=tmp_path, **kw)  # type: ignore[arg-type]

    spec = ClusterSpec.model_validate({"cluster": {"name": "c", "secret": "from-spec"}})
    # A configured secret wins over keys (settings first, then the spec's inline secret).
    assert effective_secret(settings(cluster_secret="s", api_keys=["k"]), spec) == "s"
    assert effective_secret(settings(api_keys=["k"]), spec) == "from-spec"
    assert auth_mode(settings(api_keys=["k"]), spec) == "secret"
    # Keys only: HMAC-SHA256 keyed by the first key over a fixed label; the other keys and
    # their order after the first do not matter, the first one does.
    derived = hmac.new(b"k", KEY_SECRET_LABEL, hashlib.sha256).hexdigest()
    assert secret_from_key("k") == derived
    assert effective_secret(settings(api_keys=["k", "j"])) == derived
    assert effective_secret(settings(api_keys=["k", "x", "y"])) == derived
    assert effective_secret(settings(api_keys=["j", "k"])) != derived
    assert auth_mode(settings(api_keys=["k"])) == "keys"
    # The derived secret is not the key, and its tag differs from the open-mode tag.
    assert derived != "k" and cluster_tag(derived, "c") != cluster_tag(None, "c")
    assert effective_secret(settings()) is None and auth_mode(settings()) == "open"


def test_base_url_brackets_ipv6() -> None:
    assert base_url("10.0.0.1", 80) == "http://10.0.0.1:80"
    assert base_url("fe80::1", 80) == "http://[fe80::1]:80"


# -- a real peer over HTTP ---------------------------------------------------------------------


@dataclass
class PeerServer:
    """A minimal agent endpoint on 127.0.0.1: GET /cluster/profile and POST /cluster/spec,
    with the server-side checks flock's admin API applies (verify_request, signed answers)."""

    secret: str | None
    cluster: str = "test"
    profile: NodeProfile = field(default_factory=profile)
    boot_nonce: int = 12345
    sign_answers: bool = True
    received: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    guard: ReplayGuard = field(default_factory=ReplayGuard)
    port: int = 0

    @property
    def url(self) -> str:
        return base_url("127.0.0.1", self.port)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if server.sign_answers:
                    for k, v in response_headers(server.secret, server.profile.node_id, body,
                                                 dict(self.headers)).items():
                        self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                error = verify_request(dict(self.headers), body, server.secret, method=method,
                                       target=self.path, replay_guard=server.guard)
                if error:
                    server.errors.append(error)
                    self._answer(401, json.dumps({"error": error}).encode())
                    return
                if method == "GET" and self.path == PROFILE_PATH:
                    reply = ProfileReply(cluster=server.cluster, boot_nonce=server.boot_nonce,
                                         profile=server.profile)
                    self._answer(200, reply.model_dump_json().encode())
                elif method == "POST" and self.path == SPEC_PATH:
                    server.received.append(body)
                    self._answer(200, b'{"accepted": true}')
                else:
                    self._answer(404, b'{"error": "not found"}')

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

        return Handler


@contextmanager
def peer_server(server: PeerServer) -> Iterator[PeerServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), server.handler())
    server.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_signed_client_reads_profile_and_posts_spec() -> None:
    async def main(server: PeerServer) -> None:
        async with PeerClient(node_id="a" * 32, secret=SECRET, timeout_s=5) as client:
            reply, rtt = await client.get_profile(server.url)
            assert reply.profile == server.profile and reply.boot_nonce == 12345
            assert 0 < rtt < 5
            answer = await client.post_spec(server.url, {"generation": 4, "models": []})
            assert answer.status_code == 200 and answer.json() == {"accepted": True}

    with peer_server(PeerServer(SECRET)) as server:
        asyncio.run(main(server))
        assert json.loads(server.received[0]) == {"generation": 4, "models": []}
        assert server.errors == []


def test_client_with_the_wrong_secret_is_refused() -> None:
    async def main(server: PeerServer) -> None:
        async with PeerClient(node_id="a" * 32, secret="wrong", timeout_s=5) as client:
            with pytest.raises(PeerAuthError, match="401"):
                await client.get_profile(server.url)

    with peer_server(PeerServer(SECRET)) as server:
        asyncio.run(main(server))
        assert server.errors == ["bad signature"]


def test_client_without_a_secret_is_refused_by_a_secured_peer() -> None:
    async def main(server: PeerServer) -> None:
        async with PeerClient(node_id="a" * 32, secret=None, timeout_s=5) as client:
            with pytest.raises(PeerAuthError):
                await client.post_spec(server.url, {"generation": 1})

    with peer_server(PeerServer(SECRET)) as server:
        asyncio.run(main(server))
        assert server.received == []


def test_unsigned_answer_from_a_peer_is_not_trusted() -> None:
    # A rogue server that answers 200 without the secret must not feed us a profile.
    async def main(server: PeerServer) -> None:
        async with PeerClient(node_id="a" * 32, secret=SECRET, timeout_s=5) as client:
            with pytest.raises(PeerAuthError, match="untrusted response"):
                await client.get_profile(server.url)

    with peer_server(PeerServer(None, sign_answers=False)) as server:
        asyncio.run(main(server))


def test_open_mode_client_and_server_talk() -> None:
    async def main(server: PeerServer) -> None:
        async with PeerClient(node_id="a" * 32, secret=None, timeout_s=5) as client:
            reply, _ = await client.get_profile(server.url)
            assert reply.cluster == "test"

    with peer_server(PeerServer(None)) as server:
        asyncio.run(main(server))


def test_unreachable_peer_raises_peer_error_within_the_timeout() -> None:
    async def main() -> None:
        async with PeerClient(node_id="a" * 32, secret=None, timeout_s=1,
                              connect_timeout_s=1) as client:
            with pytest.raises(PeerError):
                # Port 9 (discard) on loopback: nothing listens, the connection is refused.
                await client.get_profile(base_url("127.0.0.1", 9))

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 3


def test_profile_reply_ignores_fields_from_newer_peers() -> None:
    data = {"cluster": "c", "boot_nonce": 1, "future": True,
            "profile": {**profile().model_dump(mode="json"), "gpu_count": 8}}
    reply = ProfileReply.model_validate(data)
    assert reply.profile.node_id == "b" * 32
