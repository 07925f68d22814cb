"""Operations figures of the operate issue: what Prometheus metrics cost a node.

    .venv/bin/python -m bench.operate [--rounds 9] [--tokens 128] [--scrapes 200] [--model DIR]
                                      [--blas-threads N]

Prints `name: value` lines:
  metrics_on_vs_off_decode  decode tok/s of an agent run with `--metrics` / one run with
                            `--no-metrics` (the `metrics_enabled` setting): both serve the same
                            model side by side (own ports and state directories, discovery off),
                            rounds alternate which goes first, one streamed chat each per round;
                            the figure is the median of the per-round ratios. Decode tok/s of a
                            stream is (tokens - 1) / time from its first to its last token.
  metrics_scrape_ms         median wall time of GET /metrics (one keep-alive client, sequential)
                            on a node serving 3 instances: three tiny random models in its store,
                            each placed on demand by one request, runner snapshots flowing
The model defaults to SmolLM2-135M (`flock pull smollm2-135m` into ~/.cache/flock-bench/models,
as bench.single_node does); pass `--model` for any mlx-lm directory. Helper figures (medians,
sizes) are printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]
TINY_MODELS = ("tiny-ops-a", "tiny-ops-b", "tiny-ops-c")
READY_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def data_port_base() -> int:
    """A base for an agent's runner link ports (base .. base + 4k), unlikely to clash with
    another agent on this machine."""
    return 20000 + (os.getpid() * 7919 + free_port()) % 35000


@dataclass
class Agent:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited ({self.process.returncode}):\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent not ready in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_agent(state_dir: Path, models_dir: Path, model: str,
                extra: Sequence[str] = ()) -> Agent:
    """`flock run` on loopback with discovery off, so agents side by side stay separate nodes."""
    state_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = state_dir / "agent.out"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--host", "127.0.0.1", "--port", str(port),
             "--state-dir", str(state_dir), "--models-dir", str(models_dir), "--model", model,
             "--data-port", str(data_port_base()), "--no-discovery", "--log-level", "warning",
             *extra],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    return Agent(process, f"http://127.0.0.1:{port}", log_path)


@contextlib.contextmanager
def running(agents: list[Agent]) -> Iterator[list[Agent]]:
    try:
        for agent in agents:
            agent.wait_ready()
        yield agents
    finally:
        for agent in agents:
            agent.stop()


def stream_decode(client: httpx.Client, model: str, max_tokens: int) -> tuple[float, int]:
    """(decode tok/s after the first token, completion tokens) of one streamed greedy chat."""
    body = {"model": model, "messages": PROMPT, "stream": True, "temperature": 0,
            "max_tokens": max_tokens, "stream_options": {"include_usage": True}}
    first = last = 0.0
    tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return rate, tokens


def metrics_on_vs_off(model_dir: Path, work: Path, rounds: int, tokens: int,
                      common: Sequence[str] = ()) -> dict[str, float]:
    model = str(model_dir)
    on = start_agent(work / "on", work / "on" / "models", model, ["--metrics", *common])
    off = start_agent(work / "off", work / "off" / "models", model, ["--no-metrics", *common])
    ratios: list[float] = []
    rates: dict[str, list[float]] = {"on": [], "off": []}
    produced: list[int] = []
    with running([on, off]), httpx.Client(base_url=on.url, timeout=600) as c_on, \
            httpx.Client(base_url=off.url, timeout=600) as c_off:
        if (c_on.get("/metrics").status_code, c_off.get("/metrics").status_code) != (200, 404):
            raise RuntimeError("one agent should export /metrics and the other should not")
        clients = {"on": c_on, "off": c_off}
        for client in clients.values():  # warm-up: compile the decode shapes
            stream_decode(client, model, 16)
        for i in range(rounds):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            pair: dict[str, float] = {}
            for name in order:
                pair[name], n = stream_decode(clients[name], model, tokens)
                rates[name].append(pair[name])
                produced.append(n)
            if pair["off"] > 0:
                ratios.append(pair["on"] / pair["off"])
    if not ratios:
        raise RuntimeError("no decode measured: the model produced at most one token")
    return {
        "decode_tok_s_metrics_on": statistics.median(rates["on"]),
        "decode_tok_s_metrics_off": statistics.median(rates["off"]),
        "decode_tokens_per_stream": statistics.median(produced),
        "metrics_on_vs_off_decode": statistics.median(ratios),
    }


def metrics_scrape(work: Path, scrapes: int, common: Sequence[str] = ()) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_tiny_model

    from agent.models.store import ModelStore

    state = work / "scrape"
    models = state / "models"
    store = ModelStore(models)
    for seed, name in enumerate(TINY_MODELS):
        store.add(name, lambda d, s=seed: make_tiny_model(d, seed=s), source="bench")
    agent = start_agent(state, models, TINY_MODELS[0], ["--metrics", *common])
    with running([agent]), httpx.Client(base_url=agent.url, timeout=120) as client:
        for name in TINY_MODELS:  # one request each places every model on demand
            reply = client.post("/v1/chat/completions", json={
                "model": name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
            reply.raise_for_status()
        status = client.get("/cluster").json()
        instances = {p["model"] for p in status.get("placements", [])}
        if len(instances) < len(TINY_MODELS):
            raise RuntimeError(f"expected {len(TINY_MODELS)} instances, /cluster shows {status}")
        time.sleep(2.5)  # runner snapshots (about one a second) fill the per-instance gauges
        for _ in range(10):  # warm-up
            body = client.get("/metrics").content
        times: list[float] = []
        for _ in range(scrapes):
            started = time.perf_counter()
            response = client.get("/metrics")
            body = response.content
            times.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    return {
        "scrape_instances": float(len(instances)),
        "scrape_series": float(series),
        "scrape_bytes": float(len(body)),
        "metrics_scrape_p95_ms": statistics.quantiles(times, n=20)[-1],
        "metrics_scrape_ms": statistics.median(times),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="alternating on/off pairs")
    parser.add_argument("--tokens", type=int, default=128, help="max tokens of each stream")
    parser.add_argument("--scrapes", type=int, default=200, help="GET /metrics to time")
    parser.add_argument("--model", type=Path, help="mlx-lm model directory (default SmolLM2)")
    parser.add_argument("--blas-threads", type=int,
                        help="OpenBLAS threads per runner, for every agent (default: flock's)")
    args = parser.parse_args()
    # A SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the agents started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.model is None:  # `flock pull smollm2-135m` into the bench cache, once
        from bench.single_node import ensure_model

        args.model = ensure_model(Path.home() / ".cache" / "flock-bench" / "models")
    with tempfile.TemporaryDirectory(prefix="flock-operate-") as tmp:
        work = Path(tmp)
        common = ["--blas-threads", str(args.blas_threads)] if args.blas_threads else []
        figures = metrics_on_vs_off(args.model.resolve(), work, args.rounds, args.tokens, common)
        figures |= metrics_scrape(work, args.scrapes, common)
    for name, value in figures.items():
        digits = 3 if name == "metrics_on_vs_off_decode" else 2
        print(f"{name}: {value:.{digits}f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
