"""Keys-only mode (API keys, no cluster secret) with two real agents on loopback.

The nodes share one key list and no secret. They still cluster and serve a pipeline whose second
stage fetches its tensors from the node holding the model (shard transfer, streaming from the
head, the leader's assignment pushes: all carry the node's first key). Every agent-to-agent and
admin endpoint refuses a caller without a valid key with 401 in the cluster API's error format,
even one that names a member in `X-Flock-Node` and calls from that member's address (loopback
here) — which is how a caller got in before; with the key the same calls are let in.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from agent.cluster.auth import HEADER_NODE
from agent.generation import GenerationRequest, SamplingParams
from agent.models.store import ModelStore
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

KEY = "sk-flock-keys-only-" + "q" * 20
OTHER_KEY = "second-key"
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


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    """holder (has the model) and fetcher (has none), a 2-stage pipeline over them, both with
    the same API keys and no secret; yielded once the pipeline answers through the fetcher."""
    root = tmp_path_factory.mktemp("keys-only")
    source = make_tiny_model(root / "src", layers=4)
    ModelStore(root / "models-holder").add(
        "tiny", lambda d: [os.link(p, d / p.name) for p in source.iterdir()], source="test")
    spec = root / "cluster.toml"
    spec.write_text(f'[cluster]\nname = "keys-{os.getpid()}-{secrets.token_hex(3)}"\n'
                    '[[models]]\nmodel = "tiny"\nstrategy = "pipeline"\n'
                    'nodes = ["holder", "fetcher"]\nlayers = [2, 2]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOCK_")}
    env |= {"FLOCK_DISCOVERY_PORT": str(_free_port(socket.SOCK_DGRAM)),
            "FLOCK_DISCOVERY_INTERFACES": '["127.0.0.1/8"]'}
    started: list[Node] = []
    try:
        for name in ["holder", "fetcher"]:
            port = _free_port()
            state = root / name
            state.mkdir()
            log = state / "agent.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "agent", "run", "--host", "127.0.0.1",
                     "--port", str(port), "--node-name", name, "--cluster", str(spec),
                     "--model", "", "--state-dir", str(state),
                     "--models-dir", str(root / f"models-{name}"),
                     "--data-port", str(_free_port()), "--blas-threads", "1",
                     "--api-key", KEY, "--api-key", OTHER_KEY],
                    stdout=out, stderr=subprocess.STDOUT, env=env,
                    cwd=Path(__file__).resolve().parents[1])
            started.append(Node(name, f"http://127.0.0.1:{port}", process, log))
        _wait_serving(started[1])
        yield started
    finally:
        for node in started:
            node.process.send_signal(signal.SIGTERM)
        for node in started:
            try:
                node.process.wait(30)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(10)


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


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY},
                                     {"Authorization": f"bearer {OTHER_KEY}"}],
                         ids=["bearer", "x-api-key", "second-key"])
def test_with_a_key_the_same_calls_are_let_in(nodes: list[Node],
                                              headers: dict[str, str]) -> None:
    holder, _ = nodes
    leader = _status(holder)["leader"]
    for node in nodes:
        for method, path, _, body in _calls(leader):
            response = httpx.request(method, node.url + path, content=body, headers=headers,
                                     timeout=60)
            assert response.status_code not in (401, 403), (node.name, method, path,
                                                            response.text[:300])
            assert response.status_code < 500, (node.name, method, path, response.text[:300])
            holds = node is holder or not path.startswith("/cluster/models/")
            answers = method == "GET" or path in ("/cluster/generate", "/cluster/assignment")
            if answers and holds:
                assert response.status_code == 200, (node.name, path, response.text[:300])
    # The shard endpoints serve the holder's model to a key holder.
    tensors = httpx.post(f"{holder.url}/cluster/models/tiny/tensors", content=TENSORS,
                         headers=headers, timeout=60)
    assert tensors.status_code == 200 and len(tensors.content) > 1000
    # Still one placement, still serving.
    assert len(_status(holder)["placements"]) == 1
