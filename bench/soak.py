"""Soak: a real agent on SmolLM2 under steady concurrent load; failed requests and memory growth.

    .venv/bin/python -m bench.soak [--minutes 10] [--concurrency 8] [--max-tokens 48]
                                   [--blas-threads N] [--agent-args "--prefix-cache 0 ..."]

Workers send requests back to back for the whole duration: the three APIs, streaming and not,
plain completions, greedy and seeded sampling, prompts that share prefixes (the prefix cache)
and ones that do not. The loop is bounded in time (`--minutes`), in count (`--max-requests`) and
per request (`--timeout`). Prints `name: value` lines:

  soak_requests       requests answered in the soak
  soak_errors         failed requests: non-2xx answers, error events, unfinished streams,
                      timeouts, dropped connections, and runner restarts
  soak_rss_growth     runner RSS at the end / after the first minute (VmRSS, /proc)
  soak_agent_rss_growth   the same for the agent process
  soak_tokens_per_s   generated tokens per second, all workers together

The runner's prefix cache keeps finished sequences' KV up to a quarter of the KV budget (for
SmolLM2 on a large machine, ~1.4 GiB): until it is full, RSS grows by design. Measured in 2-minute
soaks here: default cache 1.146, `--agent-args "--prefix-cache 67108864"` 1.005, no cache 0.974.

On a machine shared with other CPU-heavy work, pass `--blas-threads 1`: OpenBLAS threads that
wait for each other collapse under oversubscription (measured here at load 15 on 2 cores: 24
tokens in 86 s with the default 2 threads, 5 s with 1).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import bench_agent, bench_models, warn_if_busy
from tests.live_agent import rss_bytes, runner_pids

SAMPLE_EVERY_S = 5.0

TOPICS = ["the sea", "a lighthouse", "mountains", "a city at night", "a small robot", "winter",
          "an old library", "the moon", "a garden", "a train journey", "bees", "a storm"]
SYSTEM = ("You are a helpful assistant. Answer in plain prose, briefly and clearly. "
          "Prefer concrete details to generalities.")


# --- requests ---------------------------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    examples: list[str] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.errors += 1
        if len(self.examples) < 10:
            self.examples.append(what[:300])


def make_request(i: int, model: str, max_tokens: int, rng: random.Random
                 ) -> tuple[str, str, dict[str, Any], bool]:
    """(kind, path, body, stream) of the i-th request."""
    topic = rng.choice(TOPICS)
    # Half the conversations share a long system prompt (prefix cache hits), half do not.
    shared = rng.random() < 0.5
    question = f"Write a few sentences about {topic}." + ("" if shared else f" ({i})")
    messages: list[dict[str, str]] = [{"role": "user", "content": question}]
    sampling: dict[str, Any] = {"temperature": 0}
    if rng.random() < 0.4:
        sampling = {"temperature": 0.8, "top_p": 0.95, "seed": i}
    kind = ("openai", "anthropic", "ollama", "completion")[i % 4]
    stream = (i // 4) % 2 == 1
    if kind == "openai":
        chat = [{"role": "system", "content": SYSTEM}, *messages] if shared else messages
        return kind, "/v1/chat/completions", {
            "model": model, "messages": chat, "max_tokens": max_tokens, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}), **sampling}, stream
    if kind == "anthropic":
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens,
                                "stream": stream, "temperature": sampling["temperature"]}
        if shared:
            body["system"] = SYSTEM
        return kind, "/v1/messages", body, stream
    if kind == "ollama":
        chat = [{"role": "system", "content": SYSTEM}, *messages] if shared else messages
        options = {"num_predict": max_tokens, **sampling}
        return kind, "/api/chat", {"model": model, "messages": chat, "stream": stream,
                                   "options": options}, stream
    return kind, "/v1/completions", {"model": model, "prompt": f"{SYSTEM}\n\n{question}\n",
                                     "max_tokens": max_tokens, "stream": stream,
                                     **sampling}, stream


def finished(kind: str, stream: bool, text: str) -> tuple[bool, int]:
    """(whether the answer is complete, tokens generated) from a response body."""
    if kind in ("openai", "completion"):
        if stream:
            chunks = [json.loads(line[6:]) for line in text.splitlines()
                      if line.startswith("data: {")]
            ok = text.rstrip().endswith("data: [DONE]") and not any("error" in c for c in chunks)
            reasons = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
            return ok and any(reasons), sum(1 for c in chunks if c.get("choices")) - 1
        body = json.loads(text)
        return bool(body["choices"][0]["finish_reason"]), body["usage"]["completion_tokens"]
    if kind == "anthropic":
        if stream:
            ok = "event: message_stop" in text and "event: error" not in text
            return ok, text.count("content_block_delta")
        body = json.loads(text)
        return bool(body["stop_reason"]), body["usage"]["output_tokens"]
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else {}
    return bool(last.get("done")) and "error" not in last, int(last.get("eval_count") or 0)


async def worker(client: httpx.AsyncClient, model: str, args: argparse.Namespace,
                 counter: itertools.count[int], deadline: float, tally: Tally,
                 seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        i = next(counter)
        if i >= args.max_requests:
            return
        kind, path, body, stream = make_request(i, model, args.max_tokens, rng)
        try:
            async with asyncio.timeout(args.timeout):
                response = await client.post(path, json=body)
            text = response.text
        except (TimeoutError, httpx.HTTPError) as exc:
            tally.requests += 1
            tally.fail(f"{kind} stream={stream}: {type(exc).__name__}: {exc}")
            continue
        tally.requests += 1
        if response.status_code != 200:
            tally.fail(f"{kind} stream={stream}: {response.status_code} {text[:200]}")
            continue
        try:
            ok, tokens = finished(kind, stream, text)
        except (ValueError, KeyError, IndexError) as exc:
            ok, tokens = False, 0
            text = f"{exc!r}: {text[-200:]}"
        tally.tokens += max(tokens, 0)
        if not ok:
            tally.fail(f"{kind} stream={stream}: unfinished: {text[-200:]}")


async def soak(url: str, model: str, agent_pid: int, args: argparse.Namespace) -> dict[str, float]:
    tally = Tally()
    started = time.monotonic()
    deadline = started + args.minutes * 60
    counter = itertools.count()
    runners = runner_pids(agent_pid)
    if len(runners) != 1:
        raise RuntimeError(f"expected one runner, found {runners}")
    runner = runners[0]
    samples: list[tuple[float, int, int]] = []  # (seconds in, runner RSS, agent RSS)

    async def sample() -> None:
        while time.monotonic() < deadline:
            samples.append((time.monotonic() - started, rss_bytes(runner), rss_bytes(agent_pid)))
            await asyncio.sleep(SAMPLE_EVERY_S)

    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(worker(client, model, args, counter, deadline, tally, seed)
                               for seed in range(args.concurrency)))
        sampler.cancel()
    elapsed = time.monotonic() - started
    end = (elapsed, rss_bytes(runner), rss_bytes(agent_pid))
    if runner_pids(agent_pid) != [runner]:
        tally.fail(f"the runner restarted: {runner} -> {runner_pids(agent_pid)}")
    # Baseline: the first sample at or after one minute (or the middle one for short soaks).
    after_minute = [s for s in samples if s[0] >= min(60.0, elapsed / 2)]
    base = after_minute[0] if after_minute else samples[0]
    for line in tally.examples:
        print(f"  error: {line}", file=sys.stderr)
    budget = _kv_budget(url)
    print(f"  runner RSS {base[1] / 2**20:.0f} MiB at {base[0]:.0f}s -> "
          f"{end[1] / 2**20:.0f} MiB at {end[0]:.0f}s; agent {base[2] / 2**20:.0f} -> "
          f"{end[2] / 2**20:.0f} MiB; KV budget {budget / 2**20:.0f} MiB (the prefix cache "
          f"may grow to a quarter of it)", file=sys.stderr)
    return {
        "soak_requests": tally.requests,
        "soak_errors": tally.errors,
        "soak_rss_growth": end[1] / base[1] if base[1] else float("nan"),
        "soak_agent_rss_growth": end[2] / base[2] if base[2] else float("nan"),
        "soak_tokens_per_s": tally.tokens / elapsed,
    }


def _kv_budget(url: str) -> float:
    """The runner's KV budget, from the node's metrics (0 when unknown)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("flock_kv_cache_capacity_bytes"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-requests", type=int, default=1_000_000,
                        help="stop after this many requests even if time is left")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per request")
    parser.add_argument("--blas-threads", type=int, help="OpenBLAS threads per runner "
                        "(default: the agent's choice)")
    parser.add_argument("--agent-args", default="",
                        help="more `flock run` flags, e.g. \"--prefix-cache 0\"")
    parser.add_argument("--models-dir", type=Path,
                        help="model store to pull SmolLM2 into (default: the tests' import, "
                             "else ~/.cache/flock-bench/models)")
    args = parser.parse_args()
    extra = ["--blas-threads", str(args.blas_threads)] if args.blas_threads else []
    extra += shlex.split(args.agent_args)
    warn_if_busy()
    models_dir, model_dir = bench_models(args.models_dir)
    with tempfile.TemporaryDirectory() as tmp:
        # No discovery: other agents on this host must not join (and re-place) the soaked node.
        agent = bench_agent(Path(tmp) / "state", str(model_dir), models_dir=models_dir,
                            args=extra)
        try:
            figures = asyncio.run(soak(agent.url, str(model_dir), agent.pid, args))
        finally:
            agent.stop(60)
    for name, value in figures.items():
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
