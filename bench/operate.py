"""Operations figures: what Prometheus metrics cost a node, and what an idle agent costs.

    .venv/bin/python -m bench.operate [--rounds 9] [--tokens 128] [--scrapes 200] [--model DIR]
                                      [--blas-threads N] [--starts 5] [--baseline-rev REV]
                                      [--skip-metrics]

Prints `name: value` lines:
  agent_start_s             median seconds from starting `flock run` with one model (SmolLM2,
                            discovery off) to its first 200 from /readyz (the model placed and
                            its runner ready), over `--starts` fresh starts
  agent_idle_rss_mb         median VmRSS of that agent process once ready and idle (the agent
                            alone, not its runner), in MiB
  agent_runner_idle_rss_mb  the same for its runner, for scale
  With `--baseline-rev REV` the same three figures for revision REV as `<name>_baseline`, from a
  `git worktree` of it made in a temporary directory (its native .so copied from this checkout,
  the same Python), started alternately with this checkout's agent in the same run; removed after.
  metrics_on_vs_off_decode  decode tok/s of an agent run with `--metrics` / one run with
                            `--no-metrics` (the `metrics_enabled` setting): both serve the same
                            model side by side (own ports and state directories, discovery off),
                            rounds alternate which goes first, one streamed chat each per round;
                            the figure is the median of the per-round ratios. Decode tok/s of a
                            stream is (tokens - 1) / time from its first to its last token.
  metrics_scrape_ms         median wall time of GET /metrics (one keep-alive client, sequential)
                            on a node serving 3 instances: three tiny random models in its store,
                            each placed on demand by one request, runner snapshots flowing
The model defaults to SmolLM2-135M (the tests' float32 import, else `flock pull smollm2-135m`,
as bench.single_node does); pass `--model` for any mlx-lm directory. Helper figures (medians,
sizes) are printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from bench.common import ROOT, bench_agent, bench_models, chat_body, emit, stream_chat, warn_if_busy
from tests.live_agent import LiveAgent, rss_bytes, wait_until

PROMPT = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]
TINY_MODELS = ("tiny-ops-a", "tiny-ops-b", "tiny-ops-c")
READY_TIMEOUT_S = 300.0


def start_agent(state_dir: Path, models_dir: Path, model: str, extra: Sequence[str] = (),
                cwd: Path | None = None) -> LiveAgent:
    """`flock run` on loopback with discovery off, not waited for."""
    return bench_agent(state_dir, model, models_dir=models_dir, args=extra, cwd=cwd, wait=False)


@contextlib.contextmanager
def running(agents: list[LiveAgent]) -> Iterator[list[LiveAgent]]:
    try:
        for agent in agents:
            agent.wait_ready(READY_TIMEOUT_S)
        yield agents
    finally:
        for agent in agents:
            agent.stop()


def stream_decode(client: httpx.Client, model: str, max_tokens: int) -> tuple[float, int]:
    """(decode tok/s after the first token, completion tokens) of one streamed greedy chat."""
    timing = stream_chat(client, chat_body(model, PROMPT, max_tokens))
    return timing.decode_tok_s, timing.tokens


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
    from agent.models.store import ModelStore
    from tests.tiny_models import make_tiny_model

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
        # Runner snapshots (about one a second) fill the per-instance gauges.
        wait_until(lambda: all(f'flock_kv_cache_capacity_bytes{{model="{name}"}}'
                               in client.get("/metrics").text for name in TINY_MODELS), 30,
                   "every instance's runner gauges")
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


# ---- an idle agent: start time and memory ------------------------------------------------------
IDLE_SAMPLES = 3  # RSS reads, a second apart, once ready: the last is the figure


def idle_agent(checkout: Path, work: Path, model_dir: Path, common: Sequence[str]
               ) -> dict[str, float]:
    """Start `checkout`'s agent with `model_dir` placed; seconds to /readyz, then the idle RSS
    of the agent process and of its runner."""
    agent = start_agent(work, work / "models", str(model_dir), common, cwd=checkout)
    try:
        agent.wait_ready(READY_TIMEOUT_S)  # polls every 0.1 s
        ready_s = time.monotonic() - agent.started_at
        runners = wait_until(agent.runner_pids, 60, "the agent's runner")
        for _ in range(IDLE_SAMPLES):  # idle: nothing is asked of it; RSS settles
            time.sleep(1.0)
            agent_rss, runner_rss = rss_bytes(agent.pid), sum(rss_bytes(p) for p in runners)
    finally:
        agent.stop()
    return {"agent_start_s": ready_s, "agent_idle_rss_mb": agent_rss / 2**20,
            "agent_runner_idle_rss_mb": runner_rss / 2**20}


@contextlib.contextmanager
def baseline_checkout(rev: str) -> Iterator[tuple[Path, str]]:
    """A `git worktree` of `rev` in a temporary directory with this checkout's native .so
    (gitignored, so not in the worktree); (its path, the full commit). Removed after."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="flock-baseline-") as tmp:
        path = Path(tmp) / "checkout"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), commit],
                       cwd=ROOT, check=True)
        try:
            native = Path("agent") / "runtime" / "native"
            for so in (ROOT / native).glob("*.so"):
                shutil.copy2(so, path / native / so.name)
            yield path, commit
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT,
                           check=False)


def idle_figures(model_dir: Path, work: Path, starts: int, common: Sequence[str],
                 baseline: Path | None) -> dict[str, float]:
    """Medians of `idle_agent` over `starts` starts, this checkout and the baseline taking
    turns (which goes first alternates)."""
    checkouts = {"": ROOT, **({"_baseline": baseline} if baseline is not None else {})}
    rows: dict[str, list[float]] = {}
    for index in range(starts):
        names = list(checkouts) if index % 2 == 0 else list(reversed(checkouts))
        for suffix in names:
            got = idle_agent(checkouts[suffix], work / f"idle{suffix}{index}", model_dir, common)
            for name, value in got.items():
                rows.setdefault(name + suffix, []).append(value)
    return {name: statistics.median(values) for name, values in rows.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="alternating on/off pairs")
    parser.add_argument("--tokens", type=int, default=128, help="max tokens of each stream")
    parser.add_argument("--scrapes", type=int, default=200, help="GET /metrics to time")
    parser.add_argument("--model", type=Path, help="mlx-lm model directory (default SmolLM2)")
    parser.add_argument("--blas-threads", type=int,
                        help="OpenBLAS threads per runner, for every agent (default: flock's)")
    parser.add_argument("--starts", type=int, default=5, help="agent starts per checkout")
    parser.add_argument("--baseline-rev", help="also measure the idle agent of this revision")
    parser.add_argument("--skip-metrics", action="store_true",
                        help="only the idle agent figures")
    args = parser.parse_args()
    warn_if_busy()  # and: SIGTERM/SIGINT stop the agents started here
    if args.model is None:
        args.model = bench_models()[1]
    common = ["--blas-threads", str(args.blas_threads)] if args.blas_threads else []
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="flock-operate-") as tmp, \
            contextlib.ExitStack() as stack:
        work = Path(tmp)
        baseline = None
        if args.baseline_rev:
            baseline, commit = stack.enter_context(baseline_checkout(args.baseline_rev))
            emit("baseline_rev", f"{args.baseline_rev} ({commit[:12]})")
        figures |= idle_figures(args.model.resolve(), work, args.starts, common, baseline)
        if not args.skip_metrics:
            figures |= metrics_on_vs_off(args.model.resolve(), work, args.rounds, args.tokens,
                                         common)
            figures |= metrics_scrape(work, args.scrapes, common)
    for name, value in figures.items():
        emit(name, value, 3 if name in ("metrics_on_vs_off_decode", "agent_start_s") else 2)
    if baseline is not None:
        for name in ("agent_idle_rss_mb", "agent_start_s", "agent_runner_idle_rss_mb"):
            emit(f"{name}_after_vs_baseline", figures[name] / figures[f"{name}_baseline"], 3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
