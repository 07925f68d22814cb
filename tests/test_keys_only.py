"""Keys-only mode (API keys, no cluster secret) with real agents on loopback.

The nodes share one first key and no secret: each derives its cluster secret from that key
(`agent.cluster.auth.effective_secret`) and signs beacons, agent-to-agent calls, answers and
shard transfers with it, as a node with a configured secret does. They still cluster and serve a
pipeline whose second stage fetches its tensors from the node holding the model. A key alone
does not open the agent-to-agent endpoints (they want a member's signature); admin calls and
`GET /cluster` take a key. A caller without a valid key or signature gets 401 in the cluster
API's error format, even one that names a member in `X-Flock-Node` and calls from that member's
address (loopback here). A beacon forged without the key, however attractive (our tag, the
lowest node id, so it would lead), admits nobody and draws no request (so no key) from the
nodes; an agent whose first key differs never joins, even if it lists the right key second.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from agent import __version__
from agent.cluster.auth import HEADER_NODE, cluster_tag, secret_from_key
from agent.cluster.discovery import PROTO, Beacon, encode_beacon
from agent.cluster.peers import signed_headers
from agent.cluster.state import NodeProfile
from agent.generation import GenerationRequest, SamplingParams
from agent.models.store import ModelStore
from tests.live_agent import seed_probe_cache
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

KEY = "sk-flock-keys-only-" + "q" * 20
OTHER_KEY = "second-key"
THIRD_KEY = "sk-flock-another-cluster-" + "z" * 16
TENSORS = b'{"layer_start": 0, "layer_stop": 1, "embeds": false, "projects": false}'


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclass
class Lab:
    """The running nodes and what a newcomer needs to stand beside them."""

    nodes: list[Node]
    root: Path
    spec: Path
    cluster: str
    discovery_port: int
    env: dict[str, str]
    extra: list[Node] = field(default_factory=list)


def _start(lab: Lab, name: str, keys: list[str], models: Path) -> Node:
    port = _free_port()
    state = lab.root / name
    state.mkdir()
    seed_probe_cache(state)
    log = state / "agent.log"
    args = [arg for key in keys for arg in ("--api-key", key)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--host", "127.0.0.1",
             "--port", str(port), "--node-name", name, "--cluster", str(lab.spec),
             "--model", "", "--state-dir", str(state), "--models-dir", str(models),
             "--data-port", str(_free_port()), "--blas-threads", "1", *args],
            stdout=out, stderr=subprocess.STDOUT, env=lab.env,
            cwd=Path(__file__).resolve().parents[1])
    return Node(name, f"http://127.0.0.1:{port}", process, log)


def _stop(node: Node) -> None:
    node.process.send_signal(signal.SIGTERM)
    try:
        node.process.wait(30)
    except subprocess.TimeoutExpired:
        node.process.kill()
        node.process.wait(10)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """holder (has the model) and fetcher (has none), a 2-stage pipeline over them, both with
    the same API keys and no secret; yielded once the pipeline answers through the fetcher."""
    root = tmp_path_factory.mktemp("keys-only")
    source = make_tiny_model(root / "src", layers=4)
    ModelStore(root / "models-holder").add(
        "tiny", lambda d: [os.link(p, d / p.name) for p in source.iterdir()], source="test")
    cluster = f"keys-{os.getpid()}-{secrets.token_hex(3)}"
    spec = root / "cluster.toml"
    spec.write_text(f'[cluster]\nname = "{cluster}"\n'
                    '[[models]]\nmodel = "tiny"\nstrategy = "pipeline"\n'
                    'nodes = ["holder", "fetcher"]\nlayers = [2, 2]\n')
    discovery_port = _free_port(socket.SOCK_DGRAM)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOCK_")}
    env |= {"FLOCK_DISCOVERY_PORT": str(discovery_port),
            "FLOCK_DISCOVERY_INTERFACES": '["127.0.0.1/8"]'}
    lab = Lab([], root, spec, cluster, discovery_port, env)
    try:
        for name in ["holder", "fetcher"]:
            lab.nodes.append(_start(lab, name, [KEY, OTHER_KEY], root / f"models-{name}"))
        _wait_serving(lab.nodes[1])
        yield lab
    finally:
        for node in lab.nodes + lab.extra:
            node.process.send_signal(signal.SIGTERM)
        for node in lab.nodes + lab.extra:
            _stop(node)


@pytest.fixture(scope="module")
def nodes(lab: Lab) -> list[Node]:
    return lab.nodes


def _complete(node: Node, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{node.url}/v1/completions", headers=headers, timeout=60, json={
        "model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0})


def _wait_serving(node: Node, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        assert node.process.poll() is None, node.log_tail()
        try:
            response = _complete(node, {"Authorization": f"Bearer {KEY}"})
            if response.status_code == 200:
                return
            last = response.text[:300]
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(1)
    raise AssertionError(f"the pipeline never answered through {node.name}: {last}\n"
                         + node.log_tail())


def _status(node: Node) -> dict[str, Any]:
    response = httpx.get(f"{node.url}/cluster", headers={"x-api-key": KEY}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _generation() -> bytes:
    return msgspec.msgpack.encode(GenerationRequest(
        id=secrets.token_hex(8), model="tiny", prompt_tokens=[5, 6, 7],
        sampling=SamplingParams(max_tokens=2)))


def _calls(leader: str) -> list[tuple[str, str, bytes, bytes]]:
    """(method, path, body without a key, body with the key) of every agent-to-agent and admin
    endpoint. Without a key the assignment is one that would take over the node's placements
    (the real leader's id, a huge generation, no placements); with the key a harmless one."""
    takeover = json.dumps({"leader": leader, "generation": 10**9, "placements": []}).encode()
    generation = _generation()
    return [
        ("GET", "/cluster/profile", b"", b""),
        ("GET", "/cluster/assignment", b"", b""),
        ("POST", "/cluster/assignment", takeover, b'{"placements": []}'),
        ("POST", "/cluster/generate", generation, generation),
        ("GET", "/cluster/models/tiny/info", b"", b""),
        ("GET", "/cluster/models/tiny/files/config.json", b"", b""),
        ("POST", "/cluster/models/tiny/tensors", TENSORS, TENSORS),
        ("GET", "/cluster", b"", b""),
        ("POST", "/cluster/instances", b'{"model": "no-such-model"}',
         b'{"model": "no-such-model"}'),
        ("DELETE", "/cluster/instances/no-such-instance", b"", b""),
        ("POST", "/cluster/spec", b"not [valid toml", b"not [valid toml"),
    ]


def test_nodes_with_the_same_keys_and_no_secret_cluster_and_serve(nodes: list[Node]) -> None:
    holder, fetcher = nodes
    for node in nodes:
        status = _status(node)
        assert {n["name"] for n in status["nodes"]} == {"holder", "fetcher"}, status["nodes"]
        [placement] = status["placements"]
        assert len(placement["stages"]) == 2, placement
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": OTHER_KEY}):
            response = _complete(node, headers)
            assert response.status_code == 200, (node.name, response.text)
            assert response.json()["usage"]["completion_tokens"] == 5
        assert _complete(node, {}).status_code == 401
    # The fetcher got its stage's tensors from the holder, with its key.
    assert list((Path(fetcher.log).parents[1] / "models-fetcher" / ".shards").glob("tiny-*/*"))
    assert holder.process.poll() is None


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"},
    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
    {"x-api-key": KEY[:-1]},
], ids=["none", "wrong-bearer", "wrong-x-api-key", "basic", "longer", "shorter"])
def test_agent_to_agent_and_admin_calls_without_a_valid_key_get_401(
        nodes: list[Node], headers: dict[str, str]) -> None:
    ids = {node.name: _status(node)["node_id"] for node in nodes}
    leader = _status(nodes[0])["leader"]
    before = {node.name: _status(node)["placements"] for node in nodes}
    for node in nodes:
        other = next(n for n in nodes if n is not node)
        # Posing as the other member, from its address (loopback): no way around the key.
        spoof = {HEADER_NODE: ids[other.name], **headers}
        for method, path, body, _ in _calls(leader):
            response = httpx.request(method, node.url + path, content=body, headers=spoof,
                                     timeout=30)
            assert response.status_code == 401, (node.name, method, path, response.text[:300])
            error = response.json()["error"]
            assert error["type"] == "authentication_error", error
            assert "API key" in error["message"], error
            assert KEY not in response.text
    # Nothing changed: the placements stand and the pipeline still answers.
    assert {node.name: _status(node)["placements"] for node in nodes} == before
    assert _complete(nodes[1], {"x-api-key": KEY}).status_code == 200


AGENT_TO_AGENT = ("/cluster/profile", "/cluster/assignment", "/cluster/generate",
                  "/cluster/models/")


def _agent_to_agent(path: str) -> bool:
    return path != "/cluster" and path.startswith(AGENT_TO_AGENT)


def _let_in(node: Node, holder: Node, method: str, path: str,
            response: httpx.Response) -> None:
    assert response.status_code not in (401, 403), (node.name, method, path, response.text[:300])
    assert response.status_code < 500, (node.name, method, path, response.text[:300])
    holds = node is holder or not path.startswith("/cluster/models/")
    answers = method == "GET" or path in ("/cluster/generate", "/cluster/assignment")
    if answers and holds:
        assert response.status_code == 200, (node.name, path, response.text[:300])


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY},
                                     {"Authorization": f"bearer {OTHER_KEY}"}],
                         ids=["bearer", "x-api-key", "second-key"])
def test_a_key_opens_status_and_admin_calls_but_not_agent_to_agent_ones(
        nodes: list[Node], headers: dict[str, str]) -> None:
    holder, _ = nodes
    leader = _status(holder)["leader"]
    for node in nodes:
        for method, path, _, body in _calls(leader):
            response = httpx.request(method, node.url + path, content=body, headers=headers,
                                     timeout=60)
            if _agent_to_agent(path):
                # A key is not a member's signature: members sign, users call the APIs.
                assert response.status_code == 401, (node.name, method, path, response.text)
                assert "signed" in response.json()["error"]["message"], response.text
            else:
                _let_in(node, holder, method, path, response)
    assert len(_status(holder)["placements"]) == 1


def test_calls_signed_with_the_secret_derived_from_the_first_key_are_let_in(
        nodes: list[Node]) -> None:
    holder, _ = nodes
    leader = _status(holder)["leader"]
    member = secret_from_key(KEY)
    for node in nodes:
        for method, path, _, body in _calls(leader):
            if path == "/cluster":
                continue  # status is for users: a key
            signed = signed_headers(member, "e" * 32, method, path, body)
            response = httpx.request(method, node.url + path, content=body, headers=signed,
                                     timeout=60)
            _let_in(node, holder, method, path, response)
            # Signed by a node of another keyed cluster (or from the second key): refused.
            for other in (THIRD_KEY, OTHER_KEY):
                forged = signed_headers(secret_from_key(other), "e" * 32, method, path, body)
                response = httpx.request(method, node.url + path, content=body, headers=forged,
                                         timeout=60)
                assert response.status_code == 401, (node.name, method, path, response.text)
    # The shard endpoints serve the holder's model to a member, with a signed answer.
    signed = signed_headers(member, "e" * 32, "POST", "/cluster/models/tiny/tensors", TENSORS)
    tensors = httpx.post(f"{holder.url}/cluster/models/tiny/tensors", content=TENSORS,
                         headers=signed, timeout=60)
    assert tensors.status_code == 200 and len(tensors.content) > 1000
    assert len(_status(holder)["placements"]) == 1


class _Recorder(BaseHTTPRequestHandler):
    """Records every request the nodes make to a forged member (there should be none)."""

    seen: list[str] = []

    def _record(self) -> None:
        self.seen.append(f"{self.command} {self.path} {dict(self.headers)}")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _record

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _send_beacon(lab: Lab, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        s.bind(("127.0.0.1", 0))
        s.sendto(data, ("239.77.52.41", lab.discovery_port))  # the default discovery group
        s.sendto(data, ("127.0.0.1", lab.discovery_port))


def test_a_beacon_forged_without_the_key_admits_nobody_and_draws_no_key(lab: Lab) -> None:
    holder, fetcher = lab.nodes
    before = {node.name: _status(node) for node in lab.nodes}
    recorder = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.seen = []
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    forger = "0" * 32  # the lowest id: admitted, it would lead the cluster
    profile = NodeProfile(node_id=forger, name="forger", version=__version__,
                          addresses=["127.0.0.1"], api_port=recorder.server_address[1],
                          memory_total_bytes=64 << 30, memory_available_bytes=60 << 30)
    # The tag is public on the wire (an eavesdropper copies it from any beacon); the signature
    # needs the secret, which the forger, without the first key, can only guess.
    real_tag = cluster_tag(secret_from_key(KEY), lab.cluster)
    try:
        deadline = time.monotonic() + 5
        seq = 0
        while time.monotonic() < deadline:
            for tag, secret in [(real_tag, None), (real_tag, "guessed"),
                                (real_tag, secret_from_key(OTHER_KEY)), (real_tag, ""),
                                (cluster_tag(None, lab.cluster), None)]:
                seq += 1
                beacon = Beacon(proto=PROTO, cluster=lab.cluster, tag=tag, node_id=forger,
                                version=__version__, sent_at=time.time(), boot_nonce=1,
                                fingerprint="forger", seq=seq, api_port=profile.api_port,
                                addresses=["127.0.0.1"], profile=profile.model_dump(mode="json"))
                _send_beacon(lab, encode_beacon(beacon, secret or None))
            time.sleep(0.5)
        for node in lab.nodes:
            status = _status(node)
            assert forger not in {n["node_id"] for n in status["nodes"]}, status["nodes"]
            assert status["leader"] == before[node.name]["leader"] != forger
            # The beacons did arrive, and were dropped for their signature.
            assert "dropped beacon from 127.0.0.1" in node.log.read_text(errors="replace"), \
                node.log_tail()
        # Nobody fetched the forger's profile: no request, so no key either.
        assert _Recorder.seen == []
    finally:
        recorder.shutdown()
        recorder.server_close()
    assert {n["name"] for n in _status(holder)["nodes"]} == {"holder", "fetcher"}
    assert _complete(fetcher, {"x-api-key": KEY}).status_code == 200


def test_an_agent_with_another_first_key_does_not_join(lab: Lab) -> None:
    # It even holds the cluster's key, second: the secret comes from the first key only.
    outsider = _start(lab, "outsider", [THIRD_KEY, KEY], lab.root / "models-outsider")
    lab.extra.append(outsider)
    deadline = time.monotonic() + 60
    while True:
        assert outsider.process.poll() is None, outsider.log_tail()
        try:
            mine = httpx.get(f"{outsider.url}/cluster", headers={"x-api-key": THIRD_KEY},
                             timeout=10)
            if mine.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, outsider.log_tail()
        time.sleep(0.5)
    time.sleep(6)  # several beacon intervals (1 s) on the same port and group
    mine = httpx.get(f"{outsider.url}/cluster", headers={"x-api-key": THIRD_KEY}, timeout=10)
    assert [n["name"] for n in mine.json()["nodes"]] == ["outsider"], mine.json()["nodes"]
    for node in lab.nodes:
        names = {n["name"] for n in _status(node)["nodes"]}
        assert names == {"holder", "fetcher"}, (node.name, names)
    _stop(outsider)
    lab.extra.remove(outsider)
    assert _complete(lab.nodes[1], {"x-api-key": KEY}).status_code == 200
