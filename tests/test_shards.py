"""Peer-to-peer shards: a node gets only its stage's tensors from a peer that holds the model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

from agent.models.shards import (
    ShardError,
    StageSelector,
    check_shard,
    safetensors_stream,
    tensor_index,
)
from agent.models.store import ModelStore
from tests.live_agent import seed_probe_cache
from tests.tiny_models import make_tiny_model


def write_stream(model_dir: Path, selector: StageSelector, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text((model_dir / "config.json").read_text())
    with (out / "model.safetensors").open("wb") as f:
        for chunk in safetensors_stream(tensor_index(model_dir), selector.names(model_dir)):
            f.write(chunk)


def test_stream_holds_exactly_the_stage_tensors_bit_for_bit(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m", layers=4, tie=False)
    middle = StageSelector(1, 3, embeds=False, projects=False)
    write_stream(model, middle, tmp_path / "shard")
    shard = mx.load(str(tmp_path / "shard" / "model.safetensors"))
    full = mx.load(str(model / "model.safetensors"))
    assert sorted(shard) == middle.names(model)
    assert all(k.startswith(("model.layers.1.", "model.layers.2.")) for k in shard)
    assert all(mx.array_equal(shard[k], full[k]).item() for k in shard)
    last = StageSelector(3, 4, embeds=False, projects=True)
    assert {"lm_head.weight", "model.norm.weight"} <= set(last.names(model))
    assert check_shard(tmp_path / "shard", middle) == middle.names(model)


def test_truncated_or_wrong_shards_are_refused(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m", layers=4)
    selector = StageSelector(0, 2, embeds=True, projects=False)
    write_stream(model, selector, tmp_path / "shard")
    with pytest.raises(ShardError, match="other tensors"):
        check_shard(tmp_path / "shard", StageSelector(2, 4, embeds=False, projects=True))
    data = (tmp_path / "shard" / "model.safetensors").read_bytes()
    (tmp_path / "shard" / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ShardError, match="truncated"):
        check_shard(tmp_path / "shard", selector)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_node_without_the_model_fetches_only_its_layers(tmp_path: Path) -> None:
    source = make_tiny_model(tmp_path / "src", layers=6)
    holder_store = ModelStore(tmp_path / "models-holder")
    holder_store.add("tiny", lambda d: [os.link(p, d / p.name) for p in source.iterdir()],
                     source="test")
    spec = tmp_path / "cluster.toml"
    cluster = f"shards-{os.getpid()}"
    spec.write_text(f'[cluster]\nname = "{cluster}"\n[[models]]\nmodel = "tiny"\n'
                    'strategy = "pipeline"\nnodes = ["holder", "fetcher"]\nlayers = [3, 3]\n')
    agents, urls = [], []
    for name in ["holder", "fetcher"]:
        port = free_port()
        state = tmp_path / name
        state.mkdir()
        seed_probe_cache(state)
        with (state / "agent.log").open("wb") as log:
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--host", "127.0.0.1", "--port", str(port),
                 "--node-name", name, "--cluster", str(spec), "--model", "",
                 "--state-dir", str(state), "--models-dir", str(tmp_path / f"models-{name}"),
                 "--data-port", str(free_port()), "--blas-threads", "1"],
                stdout=log, stderr=subprocess.STDOUT))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 120
        answer = None
        while time.monotonic() < deadline:
            try:
                response = httpx.post(f"{urls[1]}/v1/completions", timeout=30, json={
                    "model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0})
                if response.status_code == 200:
                    answer = response.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert answer is not None, (tmp_path / "fetcher" / "agent.log").read_text()[-3000:]
        assert answer["usage"]["completion_tokens"] == 5
        shards = list((tmp_path / "models-fetcher" / ".shards").glob("tiny-*/*"))
        assert [s.name for s in shards] == ["3-6-h"]  # layers 3-6 and the head weights
        held = mx.load(str(shards[0] / "model.safetensors"))
        assert {k.split(".")[2] for k in held if k.startswith("model.layers.")} == {"3", "4", "5"}
        # The last stage projects part of the vocabulary for decode steps (vocab_split.py):
        # it holds the tied embedding and the final norm as well as its layers.
        assert {"model.embed_tokens.weight", "model.norm.weight"} <= set(held)
        assert json.loads((shards[0] / "flock-shard.json").read_text())["tensors"] == sorted(held)
    finally:
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
        for agent in agents:
            agent.wait(30)
