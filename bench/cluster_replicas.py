"""Replica figures of the cluster-throughput issue, measured with loopback agents.

    .venv/bin/python -m bench.cluster_replicas [--rounds 3] [--tokens 64] [--quick]

Prints `name: value` lines:
  ceiling_16_over_8            one replica on one core: 2 x aggregate tok/s of 8 streams /
                               aggregate tok/s of 16 streams (what spreading 16 streams over two
                               cores can give here at most); measured here until it is merged
                               with bench/cluster_throughput.py's
  replicas2_multi_vs_ceiling   (aggregate tok/s of 16 streams sent to one entry node, served by
                               two replicas, one per node, each runner on its own core / the
                               same 16 streams on one replica on one core) / ceiling_16_over_8
  replicas2_multi_vs_single    that ratio before dividing by the ceiling
  independent2_multi_vs_ceiling  the control: two separate single-replica models, one per node
                               and core, 8 streams sent straight to each node (no routing, no
                               relay) / the same ceiling: what two cores give two independent
                               replicas on this machine at all (they slow each other: shared
                               memory bandwidth and clock, and the agents and this client run on
                               the runners' cores), so the ceiling that routing can reach here
  autoscale_second_replica_s   `max_replicas = 2`, short thresholds, `--max-batch 4`: from the
                               start of a sustained overload (12 streams) to the second replica
                               answering a request
plus the raw aggregate tok/s. Every runner is pinned with `taskset` to its own core with one
BLAS thread (agents and this client unpinned), greedy SmolLM2, prompts the prefix cache has not
seen (each stream's prompt carries a fresh nonce), medians of interleaved rounds.
`replica_figures(models, rounds, tokens)` is what bench/cluster_throughput.py may call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import bench_models, chat_body, emit, stream_chat_async, warn_if_busy  # noqa: E402
from tests.cluster_tools import MODEL, LoopbackCluster, link_files, runner_config  # noqa: E402
from tests.live_agent import runner_pids, wait_until  # noqa: E402

SINGLE = "single-replica"  # the baseline model entry's name in the bench store (same weights)


def pin(pid: int, core: int) -> None:
    """Every thread of `pid` onto `core` (`taskset -a`)."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(core % (os.cpu_count() or 1)), str(pid)],
                   check=True, capture_output=True)


async def streamed_tokens(url: str, model: str, streams: int, tokens: int) -> int:
    """Completion tokens of `streams` concurrent greedy chats. Prompts are new to every prefix
    cache (a nonce leads each)."""
    async def one(client: httpx.AsyncClient, i: int) -> int:
        nonce = secrets.token_hex(4)
        messages = [{"role": "user", "content": f"[{nonce}] Tell story {i} about a lighthouse."}]
        body = chat_body(model, messages, tokens)
        timing = await stream_chat_async(client, body)
        return timing.tokens

    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False,
                                 limits=limits) as client:
        counts = await asyncio.gather(*(one(client, i) for i in range(streams)))
    return sum(counts)


async def aggregate_tok_s(url: str, model: str, streams: int, tokens: int) -> float:
    """Completion tokens of `streams` concurrent greedy chats / wall time from start to last
    end."""
    started = time.perf_counter()
    total = await streamed_tokens(url, model, streams, tokens)
    return total / (time.perf_counter() - started)


def _routed(metrics: str, instance: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("flock_replica_requests_total{") and \
                f'instance_id="{instance}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _ready_heads(cluster: LoopbackCluster) -> set[str]:
    ready = set()
    for agent in cluster.agents:
        for runner in cluster.status(agent).get("runners", []):
            if runner["key"].endswith("/0") and runner["state"] == "ready":
                ready.add(runner["key"].rsplit("/", 1)[0])
    return ready


async def _independent_tok_s(urls: tuple[str, str], models: tuple[str, str], streams: int,
                             tokens: int) -> float:
    """`streams` to each (url, model) at once: all their tokens / the wall time of both."""
    started = time.perf_counter()
    totals = await asyncio.gather(*(streamed_tokens(u, m, streams, tokens)
                                    for u, m in zip(urls, models, strict=True)))
    return sum(totals) / (time.perf_counter() - started)


def throughput_figures(models: Path, model_dir: Path, rounds: int, tokens: int
                       ) -> dict[str, float]:
    """Two loopback agents: MODEL as two replicas (one per node), the same weights by path as
    one replica on n0 (the baseline) and, hard-linked, as another on n1 (the control); replica
    runners pinned to cores 0 and 1, the baseline's to core 0, the control's to core 1."""
    single: dict[int, list[float]] = {8: [], 16: []}
    replicas: list[float] = []
    independent: list[float] = []
    with tempfile.TemporaryDirectory(prefix="flock-bench-replicas-") as tmp:
        root = Path(tmp)
        control = root / "control-copy"  # the same weights, hard-linked, by another path
        control.mkdir()
        link_files(model_dir, control)
        spec = root / "cluster.toml"
        spec.write_text(f'[[models]]\nmodel = "{MODEL}"\nreplicas = 2\n\n'
                        f'[[models]]\nmodel = "{model_dir}"\nnodes = ["n0"]\n\n'
                        f'[[models]]\nmodel = "{control}"\nnodes = ["n1"]\n')
        cluster = LoopbackCluster(root=root, models_dir=models)
        try:
            agents = [cluster.start(f"n{i}", cluster_file=spec) for i in range(2)]
            cluster.wait_up(timeout=180)
            cluster.wait_for("four runners ready", lambda: len(_ready_heads(cluster)) == 4,
                             timeout=600)
            cores = {str(model_dir): 0, str(control): 1}
            for core, agent in enumerate(agents):
                for pid in runner_pids(agent.pid):
                    pin(pid, cores.get(runner_config(pid).get("model_name"), core))
            url = agents[0].url
            pair = ((agents[0].url, agents[1].url), (str(model_dir), str(control)))
            asyncio.run(aggregate_tok_s(url, MODEL, 16, 8))  # warm-up: compile the shapes
            asyncio.run(aggregate_tok_s(url, str(model_dir), 16, 8))
            asyncio.run(_independent_tok_s(*pair, 8, 8))
            for _ in range(rounds):
                single[8].append(asyncio.run(aggregate_tok_s(url, str(model_dir), 8, tokens)))
                single[16].append(asyncio.run(aggregate_tok_s(url, str(model_dir), 16, tokens)))
                replicas.append(asyncio.run(aggregate_tok_s(url, MODEL, 16, tokens)))
                independent.append(asyncio.run(_independent_tok_s(*pair, 8, tokens)))
            metrics = cluster.metrics(agents[0])
            share = [_routed(metrics, f"{_slug(MODEL)}-{r}") for r in range(2)]
        finally:
            cluster.close()
    one8, one16, two16, both16 = (statistics.median(single[8]), statistics.median(single[16]),
                                  statistics.median(replicas), statistics.median(independent))
    ceiling = 2 * one8 / one16
    return {
        "ceiling_16_over_8": ceiling,
        "replicas2_multi_vs_single": two16 / one16,
        "replicas2_multi_vs_ceiling": two16 / one16 / ceiling,
        "independent2_multi_vs_ceiling": both16 / one16 / ceiling,
        "single_8_streams_tok_s": one8,
        "single_16_streams_tok_s": one16,
        "replicas2_16_streams_tok_s": two16,
        "independent2_16_streams_tok_s": both16,
        "replicas2_share_of_replica_1": share[1] / max(1.0, sum(share)),
    }


def _slug(model: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")


def autoscale_figure(models: Path, tokens: int) -> dict[str, float]:
    """Seconds from the start of a sustained overload to the second replica answering
    (`autoscale_second_replica_s`), and to the leader's decision to add it
    (`autoscale_decision_s`; the rest is placing it, loading its runner, and its first answer)."""
    spec_text = (f'[[models]]\nmodel = "{MODEL}"\nmax_replicas = 2\nscale_up_wait_s = 0.5\n'
                 'scale_up_after_s = 2\nkeep_alive = 120\n')
    second = f"{_slug(MODEL)}-1"
    with tempfile.TemporaryDirectory(prefix="flock-bench-autoscale-") as tmp:
        root = Path(tmp)
        spec = root / "cluster.toml"
        spec.write_text(spec_text)
        cluster = LoopbackCluster(root=root, models_dir=models)
        try:
            agents = [cluster.start(f"n{i}", cluster_file=spec, extra=["--max-batch", "4"])
                      for i in range(2)]
            cluster.wait_up(timeout=180)
            cluster.wait_for("one replica ready", lambda: len(_ready_heads(cluster)) == 1,
                             timeout=600)
            pinned: set[int] = set()

            def pin_new() -> None:
                # A runner started by scaling is pinned as soon as it is seen.
                for core, agent in enumerate(agents):
                    for pid in set(runner_pids(agent.pid)) - pinned:
                        pin(pid, core)
                        pinned.add(pid)

            pin_new()
            entry = agents[0]
            # Warm: the entry node has loaded the tokenizer and the runner compiled its shapes
            # (a cold tokenizer is not part of scaling).
            asyncio.run(aggregate_tok_s(entry.url, MODEL, 2, 4))
            started, wall = time.monotonic(), time.time()
            stop = False

            async def overload() -> None:
                # 12 streams kept up (each one replaced when it ends) until the second replica
                # has answered: three times one replica's batch.
                async def stream(client: httpx.AsyncClient, i: int) -> None:
                    while not stop:
                        nonce = secrets.token_hex(4)
                        body = chat_body(MODEL, [{"role": "user", "content":
                                                  f"[{nonce}] Story {i}, please."}], tokens)
                        await stream_chat_async(client, body)

                async with httpx.AsyncClient(base_url=entry.url, timeout=600,
                                             trust_env=False) as client:
                    await asyncio.gather(*(stream(client, i) for i in range(12)))

            def answered() -> bool:
                pin_new()
                return _routed(cluster.metrics(entry), second) > 0 and any(
                    r["load"] and r["load"]["requests_total"] > 0
                    for r in cluster.status(entry).get("replicas", {}).get(MODEL, [])
                    if r["instance_id"] == second)

            async def main() -> float:
                nonlocal stop
                task = asyncio.create_task(overload())
                try:
                    await asyncio.to_thread(wait_until, answered, 300,
                                            "the second replica answering", interval=0.25)
                    return time.monotonic() - started
                finally:
                    stop = True
                    await task

            served = asyncio.run(main())
            events = cluster.status(entry).get("scaling", {}).get("events", [])
            added = next((e["at"] for e in events if e["change"] == "add"), float("nan"))
            return {"autoscale_second_replica_s": served, "autoscale_decision_s": added - wall}
        finally:
            cluster.close()


def replica_figures(models: Path, rounds: int = 3, tokens: int = 64) -> dict[str, float]:
    """Every figure this file prints (the store must hold MODEL)."""
    from agent.models.store import ModelStore

    model_dir = ModelStore(models).resolve(MODEL)
    figures = throughput_figures(models, model_dir, rounds, tokens)
    figures.update(autoscale_figure(models, tokens))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="one round of 32 tokens")
    parser.add_argument("--skip-autoscale", action="store_true")
    args = parser.parse_args(argv)
    rounds, tokens = (1, 32) if args.quick else (args.rounds, args.tokens)
    warn_if_busy()
    models, model_dir = bench_models()
    figures = throughput_figures(models, model_dir, rounds, tokens)
    if not args.skip_autoscale:
        figures.update(autoscale_figure(models, tokens))
    for name in ("ceiling_16_over_8", "replicas2_multi_vs_ceiling", "replicas2_multi_vs_single",
                 "independent2_multi_vs_ceiling", "replicas2_share_of_replica_1"):
        emit(name, figures[name], 3)
    for name in ("single_8_streams_tok_s", "single_16_streams_tok_s",
                 "replicas2_16_streams_tok_s", "independent2_16_streams_tok_s"):
        emit(name, figures[name], 1)
    for name in ("autoscale_second_replica_s", "autoscale_decision_s"):
        if name in figures:
            emit(name, figures[name], 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
