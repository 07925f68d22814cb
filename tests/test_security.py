"""Security of a real agent: API keys, who may call the admin endpoints, and the cluster secret.

- API keys (`--api-key`): `Authorization: Bearer` and `x-api-key` are accepted by every API; a
  missing or wrong key is a 401 in the API's own format.
- Admin endpoints (`POST /cluster/instances`, `DELETE /cluster/instances/{id}`,
  `POST /cluster/spec`) need an API key or the cluster secret; in open mode they answer
  loopback callers only: a caller in another network namespace, over a veth pair, gets 403.
- Cluster secret: a rogue agent of the same cluster name but another secret, on the same network
  (loopback discovery), never appears in the real agent's `GET /cluster`, and its signed calls
  to /cluster/assignment and /cluster/generate get 401; unsigned agent-to-agent calls fail too.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from live_agent import LiveAgent, start_agent
from netns import netns_lab
from tiny_models import make_tiny_model

from agent.cluster.auth import secret_from_key
from agent.cluster.peers import signed_headers
from agent.generation import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

KEY = "sk-flock-test-" + "k" * 24
USER = [{"role": "user", "content": "hi"}]
ADMIN_CALLS = [
    ("POST", "/cluster/instances", b'{"model": "no-such-model"}'),
    ("DELETE", "/cluster/instances/no-such-instance", b""),
    ("POST", "/cluster/spec", b"not [valid toml"),  # let in, it is a 400: nothing changes
]


def _generation(model: str) -> bytes:
    request = GenerationRequest(id=secrets.token_hex(8), model=model, prompt_tokens=[5, 6, 7],
                                sampling=SamplingParams(max_tokens=4))
    return msgspec.msgpack.encode(request)


# --- API keys -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAgent]:
    root = tmp_path_factory.mktemp("keyed")
    model = make_tiny_model(root / "tiny")
    agent = start_agent(root / "state", model=str(model),
                        args=["--no-discovery", "--api-key", KEY, "--api-key", "second-key"])
    try:
        yield agent
    finally:
        agent.stop()


def _api_requests(model: str) -> list[tuple[str, str, str, dict[str, Any] | None]]:
    """(api, method, path, body) of each API: a listing and a generation."""
    return [
        ("openai", "GET", "/v1/models", None),
        ("openai", "POST", "/v1/chat/completions",
         {"model": model, "messages": USER, "max_tokens": 2}),
        ("anthropic", "POST", "/v1/messages", {"model": model, "messages": USER, "max_tokens": 2}),
        ("anthropic", "POST", "/v1/messages/count_tokens", {"model": model, "messages": USER}),
        ("ollama", "GET", "/api/tags", None),
        ("ollama", "POST", "/api/chat", {"model": model, "messages": USER, "stream": False,
                                         "options": {"num_predict": 2}}),
    ]


def _assert_unauthorized(api: str, response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    if api == "openai":
        assert body["error"]["code"] == "invalid_api_key", body
        assert body["error"]["type"] == "invalid_request_error", body
        assert isinstance(body["error"]["message"], str)
    elif api == "anthropic":
        assert body["type"] == "error", body
        assert body["error"]["type"] == "authentication_error", body
    else:
        assert isinstance(body["error"], str), body
    assert KEY not in response.text  # the answer never echoes a key


def test_api_keys_are_accepted_as_bearer_and_x_api_key(keyed: LiveAgent) -> None:
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        for api, method, path, body in _api_requests(str(keyed.model)):
            for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY},
                            {"Authorization": "bearer second-key"},
                            {"x-api-key": "second-key"}):
                response = client.request(method, path, json=body, headers=headers)
                assert response.status_code == 200, (api, path, headers, response.text)


def test_missing_or_wrong_api_keys_get_401_in_each_apis_format(keyed: LiveAgent) -> None:
    wrong: list[dict[str, str]] = [
        {}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"},
        {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {KEY}x"}, {"x-api-key": KEY[:-1]},
        {"x-api-key": "ключ"},  # not ASCII
        {"Authorization": "Bearer " + "k" * 10_000},
    ]
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        for api, method, path, body in _api_requests(str(keyed.model)):
            for headers in wrong:
                encoded = {k: v.encode() for k, v in headers.items()}
                response = client.request(method, path, json=body, headers=encoded)
                _assert_unauthorized(api, response)
            # A stream is refused before it starts.
            if body is not None and path != "/v1/messages/count_tokens":
                response = client.request(method, path, json={**body, "stream": True})
                _assert_unauthorized(api, response)


def test_probes_stay_open_with_api_keys(keyed: LiveAgent) -> None:
    """Load balancers and service managers probe without keys."""
    assert httpx.get(f"{keyed.url}/healthz", timeout=30).status_code == 200
    assert httpx.get(f"{keyed.url}/readyz", timeout=30).status_code == 200


def test_admin_calls_need_an_api_key(keyed: LiveAgent) -> None:
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        for method, path, body in ADMIN_CALLS:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
                response = client.request(method, path, content=body, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
            for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
                response = client.request(method, path, content=body, headers=headers)
                # Let in: whatever the call itself answers, it is not an auth refusal.
                assert response.status_code not in (401, 403), (method, path, response.text)
                assert response.status_code < 500, (method, path, response.text)


def test_with_api_keys_cluster_calls_need_a_key_too(keyed: LiveAgent) -> None:
    """Without a secret, a keyed node's agent-to-agent endpoints and status are no way around
    its keys (POST /cluster/generate ran inference for anyone, c7dacaf closed it). The
    agent-to-agent endpoints want a signature with the secret derived from the first key; the
    status wants a key."""
    model = str(keyed.model)
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        generate = client.post("/cluster/generate", content=_generation(model))
        assignment = client.post("/cluster/assignment", content=b'{"placements": []}')
        status = client.get("/cluster")
        assert (generate.status_code, assignment.status_code, status.status_code) == \
            (401, 401, 401), (generate.content[:200], assignment.text, status.text)
        key = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/cluster", headers=key).status_code == 200
        # A key alone is not a member's signature.
        assert client.post("/cluster/generate", content=_generation(model),
                           headers=key).status_code == 401
        # Signed with the secret derived from the first key, the call is let in.
        body = _generation(model)
        signed = signed_headers(secret_from_key(KEY), "b" * 32, "POST", "/cluster/generate", body)
        keyed_generate = client.post("/cluster/generate", content=body, headers=signed)
        assert keyed_generate.status_code == 200, keyed_generate.content[:200]


# --- the cluster secret ---------------------------------------------------------------------


def _spec(path: Path, name: str, secret: str | None) -> Path:
    line = f'secret = "{secret}"\n' if secret else ""
    path.write_text(f'[cluster]\nname = "{name}"\n{line}')
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveAgent, str, str]]:
    """An agent of a cluster with a secret (a unique name, discovery on loopback), its model
    loaded: (agent, cluster name, secret)."""
    root = tmp_path_factory.mktemp("secured")
    model = make_tiny_model(root / "tiny")
    name, secret = f"sec-{secrets.token_hex(4)}", secrets.token_urlsafe(32)
    spec = _spec(root / "cluster.toml", name, secret)
    agent = start_agent(root / "state", model=str(model), args=["--cluster", str(spec)])
    try:
        yield agent, name, secret
    finally:
        agent.stop()


def _node_ids(agent: LiveAgent) -> set[str]:
    status = httpx.get(f"{agent.url}/cluster", timeout=30).json()
    return {node["node_id"] for node in status["nodes"]}


def _own_id(agent: LiveAgent) -> str:
    return str(httpx.get(f"{agent.url}/cluster", timeout=30).json()["node_id"])


def test_unsigned_agent_to_agent_calls_are_refused(secured: tuple[LiveAgent, str, str]) -> None:
    agent, _, _ = secured
    model = str(agent.model)
    with httpx.Client(base_url=agent.url, timeout=60) as client:
        for method, path, body, headers in [
            ("GET", "/cluster/profile", b"", {}),
            ("GET", "/cluster/assignment", b"", {}),
            ("POST", "/cluster/assignment", b'{"placements": []}', {}),
            ("POST", "/cluster/generate", _generation(model), {}),
            # A node id without a signature, or with a made-up one, is no better.
            ("POST", "/cluster/generate", _generation(model), {"X-Flock-Node": "a" * 32}),
            ("POST", "/cluster/assignment", b"{}", {"X-Flock-Node": "a" * 32,
                                                     "X-Flock-Time": f"{time.time():.3f}",
                                                     "X-Flock-Signature": "0" * 64}),
        ]:
            response = client.request(method, path, content=body, headers=headers)
            assert response.status_code == 401, (method, path, response.text)


def test_admin_calls_need_the_secret(secured: tuple[LiveAgent, str, str]) -> None:
    agent, _, secret = secured
    with httpx.Client(base_url=agent.url, timeout=60) as client:
        for method, path, body in ADMIN_CALLS:
            # Loopback is no key when the cluster has a secret.
            response = client.request(method, path, content=body)
            assert response.status_code == 401, (method, path, response.text)
            wrong = signed_headers("not-the-secret", "b" * 32, method, path, body)
            response = client.request(method, path, content=body, headers=wrong)
            assert response.status_code == 401, (method, path, response.text)
            right = signed_headers(secret, "b" * 32, method, path, body)
            response = client.request(method, path, content=body, headers=right)
            assert response.status_code not in (401, 403), (method, path, response.text)
            assert response.status_code < 500, (method, path, response.text)
            # The same signed request again is a replay.
            replay = client.request(method, path, content=body, headers=right)
            assert replay.status_code == 401, (method, path, replay.text)


def test_rogue_agents_with_a_wrong_secret_or_none_stay_out(
        secured: tuple[LiveAgent, str, str], tmp_path: Path) -> None:
    """Two rogues of the cluster's name, one with a wrong secret and one with none, watched
    together (one watch and one friend serve both: the claim is about each rogue alone)."""
    agent, name, secret = secured
    real_id = _own_id(agent)
    rogue_secrets = {"wrong-secret": secrets.token_urlsafe(32), "no-secret": None}
    rogues = {label: start_agent(tmp_path / label, model=None, args=[
        "--cluster", str(_spec(tmp_path / f"{label}.toml", name, rogue_secret))])
        for label, rogue_secret in rogue_secrets.items()}
    # A friend with the right secret, started beside them: discovery works here, so the rogues'
    # absence means something.
    friend = start_agent(tmp_path / "friend", model=None,
                         args=["--cluster", str(_spec(tmp_path / "friend.toml", name, secret))])
    try:
        rogue_ids = {label: _own_id(rogue) for label, rogue in rogues.items()}
        friend_id = _own_id(friend)
        started, friend_seen = time.monotonic(), False
        # Watch for 8 s at least (8 beacons of each), until the friend is in (30 s at most).
        while time.monotonic() - started < (8 if friend_seen else 30):
            seen = _node_ids(agent)
            for label, rogue in rogues.items():
                assert rogue_ids[label] not in seen, f"the {label} rogue agent joined the cluster"
                assert real_id not in _node_ids(rogue), f"the {label} rogue agent sees the cluster"
            friend_seen = friend_seen or friend_id in seen
            time.sleep(0.5)
        assert friend_seen, "a member with the right secret was never discovered"
        assert not set(rogue_ids.values()) & _node_ids(agent)

        # The rogues' signed calls (each with its own secret) are refused.
        model = str(agent.model)
        with httpx.Client(base_url=agent.url, timeout=60) as client:
            for label, rogue_secret in rogue_secrets.items():
                rogue_id = rogue_ids[label]
                for path, body in [("/cluster/assignment", b'{"placements": []}'),
                                   ("/cluster/generate", _generation(model))]:
                    headers = signed_headers(rogue_secret, rogue_id, "POST", path, body)
                    response = client.post(path, content=body, headers=headers)
                    assert response.status_code == 401, (label, path, response.text)
                profile = client.get("/cluster/profile",
                                     headers=signed_headers(rogue_secret, rogue_id, "GET",
                                                            "/cluster/profile", b""))
                assert profile.status_code == 401, label
        # The real agent still serves its model, placed where it was.
        reply = httpx.post(f"{agent.url}/v1/chat/completions", timeout=60,
                           json={"model": model, "messages": USER, "max_tokens": 2})
        assert reply.status_code == 200, reply.text
    finally:
        for rogue in rogues.values():
            rogue.stop()
        friend.stop()


# --- open mode: loopback only ---------------------------------------------------------------

CLIENT = r"""
import json, sys, httpx
url, calls = sys.argv[1], json.loads(sys.argv[2])
out = []
for method, path, body in calls:
    try:
        r = httpx.request(method, url + path, content=body.encode(), timeout=20)
        out.append([r.status_code, r.text[:300]])
    except httpx.HTTPError as e:
        out.append([0, repr(e)])
print(json.dumps(out))
"""


def _calls_from(lab: Any, host: Any, url: str,
                calls: list[tuple[str, str, bytes]]) -> list[tuple[int, str]]:
    payload = json.dumps([[m, p, b.decode()] for m, p, b in calls])
    done = lab.run(host, [sys.executable, "-c", CLIENT, url, payload], timeout=120)
    assert done.returncode == 0, done.stderr
    return [tuple(item) for item in json.loads(done.stdout)]


@pytest.mark.netns
def test_open_mode_admin_calls_answer_loopback_only(tmp_path: Path) -> None:
    """The agent in one namespace (bound to all addresses, no secret, no keys); its own
    loopback is let in, a caller across the veth pair gets 403, on every admin endpoint."""
    with netns_lab(2) as lab:
        server, outsider = lab.hosts
        port = 52415
        state = tmp_path / "state"
        state.mkdir()
        log = (tmp_path / "agent.log").open("wb")
        lab.popen(server, [sys.executable, "-m", "agent", "run", "--host", "0.0.0.0",
                           "--port", str(port), "--state-dir", str(state),
                           "--models-dir", str(state / "models"), "--no-discovery"],
                  stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "FLOCK_MODEL": ""},
                  cwd=Path(__file__).resolve().parents[1])
        wait = r"""
import sys, time, httpx
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        if httpx.get(sys.argv[1] + "/readyz", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.3)
sys.exit(1)
"""
        ready = lab.run(server, [sys.executable, "-c", wait, f"http://127.0.0.1:{port}"],
                        timeout=150)
        assert ready.returncode == 0, (tmp_path / "agent.log").read_text()[-3000:]

        local = _calls_from(lab, server, f"http://127.0.0.1:{port}", ADMIN_CALLS)
        for (method, path, _), (status, text) in zip(ADMIN_CALLS, local, strict=True):
            assert status not in (0, 401, 403) and status < 500, (method, path, status, text)

        for url in (f"http://{server.address}:{port}",):
            remote = _calls_from(lab, outsider, url, ADMIN_CALLS)
            for (method, path, _), (status, text) in zip(ADMIN_CALLS, remote, strict=True):
                assert status == 403, (method, path, status, text)
                assert "loopback" in text
            # The public APIs stay open to the network in open mode.
            public = _calls_from(lab, outsider, url, [("GET", "/v1/models", b""),
                                                      ("GET", "/healthz", b"")])
            assert [status for status, _ in public] == [200, 200], public
        # Even the server's own LAN address is not loopback.
        own = _calls_from(lab, server, f"http://{server.address}:{port}", ADMIN_CALLS[:1])
        assert own[0][0] == 403, own
        log.close()
