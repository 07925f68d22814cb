"""Cluster figures of the cluster issue, measured on this machine with loopback agents.

    .venv/bin/python -m bench.cluster [--rounds 3] [--tokens 128] [--skip-cold-start]

Prints `name: value` lines:
  pipeline3_vs_1_decode        decode tok/s of a 3-node pipeline / one node: three agents serve
                               SmolLM2 twice at once (one instance on one node, one as a 3-stage
                               pipeline), streams alternate between them, medians of the rounds
  pipeline3_max_rss_vs_single  the largest pipeline runner's peak RSS (VmHWM) / the single-node
                               runner's, read from /proc after the decode rounds
  cold_start_to_first_token_s  three fresh agents (new state, no config) started to the first
                               streamed token of a chat for the default model through one of them
  pipeline_tcp_vs_ring_decode  decode tok/s over blocking TCP sockets / over mx.distributed ring
                               send/recv: 3 local processes, SmolLM2 split 10/10/10, one decode
                               loop, only the transport differs (rounds alternate, medians)
plus the raw tok/s and bytes behind each ratio. Every agent and worker runs one BLAS thread
(the machine may be shared); discovery stays on loopback, in a cluster named for this run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import bench_models, chat_body, emit, stream_chat, warn_if_busy  # noqa: E402
from tests.cluster_tools import MODEL, QUESTION, LoopbackCluster, runner_config  # noqa: E402
from tests.live_agent import free_port, peak_rss_bytes, runner_pids, wait_until  # noqa: E402

DECODE_PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


# ---- decode and memory through the API ---------------------------------------------------------


def stream_decode(client: httpx.Client, model: str, n: int) -> float:
    """Decode tok/s of one greedy streamed chat (first token to last)."""
    timing = stream_chat(client, chat_body(model, DECODE_PROMPT, n))
    if timing.tokens < 2 or timing.last <= timing.first:
        raise RuntimeError(f"too few tokens streamed ({timing.tokens})")
    return timing.decode_tok_s


def pipeline_figures(models: Path, model_dir: Path, rounds: int, n: int) -> dict[str, float]:
    """Three loopback agents serving one single-node and one 3-stage pipeline instance."""
    spec_text = (f'[cluster]\nname = "bench"\n\n[[models]]\nmodel = "{MODEL}"\nnodes = ["n0"]\n\n'
                 f'[[models]]\nmodel = "{model_dir}"\nstrategy = "pipeline"\n'
                 'nodes = ["n0", "n1", "n2"]\n')
    with tempfile.TemporaryDirectory(prefix="flock-bench-cluster-") as tmp:
        root = Path(tmp)
        spec = root / "cluster.toml"
        spec.write_text(spec_text)
        cluster = LoopbackCluster(root=root, models_dir=models)
        try:
            agents = [cluster.start(f"n{i}", cluster_file=spec) for i in range(3)]
            cluster.wait_up(timeout=180)
            cluster.wait_serving(agents[0], MODEL, nodes=1, timeout=600)
            cluster.wait_serving(agents[0], str(model_dir), nodes=3, timeout=600)
            single: list[float] = []
            pipeline: list[float] = []
            with httpx.Client(base_url=agents[0].url, timeout=600, trust_env=False) as client:
                stream_decode(client, MODEL, 16)  # warm-up: compile both instances' shapes
                stream_decode(client, str(model_dir), 16)
                for _ in range(rounds):
                    single.append(stream_decode(client, MODEL, n))
                    pipeline.append(stream_decode(client, str(model_dir), n))
            rss_single = 0
            rss_pipeline: list[int] = []
            for agent in agents:
                for pid in runner_pids(agent.pid):
                    config = runner_config(pid)
                    if config.get("model_name") == MODEL:
                        rss_single = peak_rss_bytes(pid)
                    elif config.get("model_name") == str(model_dir):
                        rss_pipeline.append(peak_rss_bytes(pid))
            if not rss_single or len(rss_pipeline) != 3:
                raise RuntimeError(f"runners not found: {rss_single}, {rss_pipeline}")
        finally:
            cluster.close()
    return {
        "single_decode_tok_s": statistics.median(single),
        "pipeline3_decode_tok_s": statistics.median(pipeline),
        "single_runner_peak_rss_mb": rss_single / 2**20,
        "pipeline3_largest_runner_peak_rss_mb": max(rss_pipeline) / 2**20,
    }


def cold_start(models: Path) -> float:
    """Seconds from starting three fresh agents to the first streamed token for the default
    model, asked of the first agent as soon as it answers HTTP."""
    with tempfile.TemporaryDirectory(prefix="flock-bench-cold-") as tmp:
        cluster = LoopbackCluster(root=Path(tmp), models_dir=models)
        try:
            started = time.monotonic()
            agents = [cluster.start(f"c{i}", model=MODEL) for i in range(3)]
            body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 8,
                    "stream": True}
            deadline = started + 600
            with httpx.Client(base_url=agents[0].url, timeout=600, trust_env=False) as client:
                def answers() -> bool:
                    if not agents[0].alive():
                        raise RuntimeError(f"agent did not start:\n{agents[0].log_tail()}")
                    try:
                        client.get("/healthz", timeout=2)
                        return True
                    except httpx.TransportError:
                        return False

                wait_until(answers, deadline - time.monotonic(), "the agent to answer HTTP",
                           interval=0.05, describe=agents[0].log_tail)
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                raise RuntimeError(chunk["error"])
                            if chunk.get("choices") and chunk["choices"][0]["delta"].get(
                                    "content"):
                                return time.monotonic() - started
            raise RuntimeError("no token streamed")
        finally:
            cluster.close()


# ---- pipeline activations: TCP sockets vs mx.distributed ring ----------------------------------

TRANSPORT_WORKER = r"""
import json, os, socket, struct, sys, time
import numpy as np
mode, rank, ports, model_dir, n, prompt = (sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]),
                                           sys.argv[4], int(sys.argv[5]), json.loads(sys.argv[6]))
world = len(ports)
if mode == "ring":
    hostfile = os.path.join(os.environ["FLOCK_BENCH_TMP"], f"ring-{os.getpid()}.json")
    with open(hostfile, "w") as f:
        json.dump([[f"127.0.0.1:{p}"] for p in ports], f)
    os.environ["MLX_HOSTFILE"], os.environ["MLX_RANK"] = hostfile, str(rank)
import mlx.core as mx
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model
from pathlib import Path

model, _ = load_model(Path(model_dir))
inner = model.model
per = len(inner.layers) // world
start, stop = rank * per, len(inner.layers) if rank == world - 1 else (rank + 1) * per
layers = inner.layers[start:stop]
cache = make_prompt_cache(model)[start:stop]
nxt, prev = (rank + 1) % world, (rank - 1) % world

if mode == "ring":
    group = mx.distributed.init(backend="ring", strict=True)
    def send(h):
        mx.eval(mx.distributed.send(h, nxt, group=group))
    def recv(shape):
        out = mx.distributed.recv(shape, mx.float32, prev, group=group)
        mx.eval(out)
        return out
else:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", ports[rank]))
    listener.listen(1)
    out_sock = None
    deadline = time.monotonic() + 60
    def connect():
        while True:
            try:
                s = socket.create_connection(("127.0.0.1", ports[nxt]))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return s
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    if rank == 0:
        out_sock = connect(); in_sock, _ = listener.accept()
    else:
        in_sock, _ = listener.accept(); out_sock = connect()
    in_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def send(h):
        out_sock.sendall(np.asarray(h.astype(mx.float32)).tobytes())
    def recv(shape):
        size = 4 * int(np.prod(shape))
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            k = in_sock.recv_into(view[got:])
            if not k:
                raise ConnectionError("peer closed")
            got += k
        return mx.array(np.frombuffer(buf, dtype=np.float32).reshape(shape))

def run(h):
    mask = create_attention_mask(h, cache[0]) if h.shape[1] > 1 else None
    for layer, c in zip(layers, cache):
        h = layer(h, mask, c)
    mx.eval(h)
    return h

dim = inner.embed_tokens.weight.shape[1]
shapes = [(1, len(prompt), dim)] + [(1, 1, dim)] * n
if rank == 0:
    h = inner.embed_tokens(mx.array([prompt]))
    times = []
    for shape in shapes:
        send(run(h))
        h = recv(shape)
        h = inner.norm(h[:, -1:])
        logits = model.lm_head(h) if hasattr(model, "lm_head") else inner.embed_tokens.as_linear(h)
        token = mx.argmax(logits, axis=-1)
        mx.eval(token)
        times.append(time.perf_counter())
        h = inner.embed_tokens(token)
    decode = (len(times) - 2) / (times[-1] - times[1])
    print("@@result@@ " + json.dumps({"decode_tok_s": decode}), flush=True)
else:
    for shape in shapes:
        send(run(recv(shape)))
"""


def transport_round(mode: str, model_dir: Path, n: int, env: dict[str, str]) -> float:
    ports = [free_port() for _ in range(3)]
    prompt = [1, 504, 3458, 282, 260, 2987, 314, 253]
    with tempfile.TemporaryDirectory(prefix="flock-bench-ring-") as tmp:
        worker_env = {**env, "FLOCK_BENCH_TMP": tmp}
        procs = [subprocess.Popen(
            [sys.executable, "-c", TRANSPORT_WORKER, mode, str(rank), json.dumps(ports),
             str(model_dir), str(n), json.dumps(prompt)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env)
            for rank in range(3)]
        try:
            outs = [p.communicate(timeout=600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"{mode} worker failed ({p.returncode}): {err[-2000:]}")
    line = next(x for x in outs[0][0].splitlines() if x.startswith("@@result@@ "))
    return float(json.loads(line.split(" ", 1)[1])["decode_tok_s"])


def transport_figures(model_dir: Path, rounds: int, n: int) -> dict[str, float]:
    from agent.runtime.environment import runner_environment
    from agent.settings import NodeSettings

    with tempfile.TemporaryDirectory() as state:
        env, _ = runner_environment(NodeSettings(state_dir=Path(state), blas_threads=1),
                                    ranks_on_this_machine=3)
    env["PYTHONPATH"] = str(ROOT)
    tcp: list[float] = []
    ring: list[float] = []
    for _ in range(rounds):
        tcp.append(transport_round("tcp", model_dir, n, env))
        ring.append(transport_round("ring", model_dir, n, env))
    return {"tcp_decode_tok_s": statistics.median(tcp),
            "ring_decode_tok_s": statistics.median(ring)}


def _loopback_ok() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument("--skip-transport", action="store_true")
    args = parser.parse_args(argv)
    _loopback_ok()
    warn_if_busy()
    models, model_dir = bench_models()

    figures: dict[str, Any] = pipeline_figures(models, model_dir, args.rounds, args.tokens)
    emit("pipeline3_vs_1_decode",
         figures["pipeline3_decode_tok_s"] / figures["single_decode_tok_s"], 3)
    emit("pipeline3_max_rss_vs_single",
         figures["pipeline3_largest_runner_peak_rss_mb"] / figures["single_runner_peak_rss_mb"], 3)
    for name in ("single_decode_tok_s", "pipeline3_decode_tok_s", "single_runner_peak_rss_mb",
                 "pipeline3_largest_runner_peak_rss_mb"):
        emit(name, figures[name], 1)
    if not args.skip_cold_start:
        emit("cold_start_to_first_token_s", cold_start(models), 1)
    if not args.skip_transport:
        transport = transport_figures(model_dir, args.rounds, args.tokens)
        emit("pipeline_tcp_vs_ring_decode",
             transport["tcp_decode_tok_s"] / transport["ring_decode_tok_s"], 3)
        emit("pipeline_tcp_decode_tok_s", transport["tcp_decode_tok_s"], 1)
        emit("pipeline_ring_decode_tok_s", transport["ring_decode_tok_s"], 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
