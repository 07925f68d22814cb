"""Node-failure figures of the faults issue, on a pipeline in network namespaces.

    sudo .venv/bin/python -m bench.faults [--nodes 3] [--rounds 1] [--loopback]

Each round starts a fresh cluster of agents (one network namespace each, joined by a bridge,
flock's default failure detection), places SmolLM2 as a pipeline over all of them, streams an
OpenAI chat through a node that is not the head, and kill -9s the agent and runner of another
pipeline member (not the head) once tokens flow. Prints `name: value` lines:
  kill_to_stream_error_s   from the kill to the in-flight stream's error event
  kill_to_next_success_s   from the kill to the next successful completion through the same
                           node (asked every 0.25 s), served by the survivors
Medians over the rounds. `--loopback` runs the agents on loopback instead (no root needed; a
killed process's sockets close at once there too, so the figures are comparable).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import bench_models, warn_if_busy  # noqa: E402
from tests.cluster_requests import fault_during_streams, first_success  # noqa: E402
from tests.cluster_tools import MODEL, ClusterBase, LoopbackCluster, netns_cluster  # noqa: E402


@contextlib.contextmanager
def make_cluster(nodes: int, root: Path, models: Path, loopback: bool) -> Iterator[ClusterBase]:
    if loopback:
        cluster = LoopbackCluster(root=root, models_dir=models)
        try:
            for i in range(nodes):
                cluster.start(f"node{i}")
            yield cluster
        finally:
            cluster.close()
        return
    with netns_cluster(nodes, root, models) as namespaced:
        for i in range(nodes):
            namespaced.start(i)
        yield namespaced


def one_round(nodes: int, models: Path, loopback: bool) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="flock-bench-faults-") as tmp, \
            make_cluster(nodes, Path(tmp), models, loopback) as cluster:
        cluster.wait_up(timeout=180)
        response = cluster.post(cluster.agents[0], "/cluster/instances",
                                json={"model": MODEL, "strategy": "pipeline"})
        response.raise_for_status()
        placement = cluster.wait_serving(cluster.agents[0], nodes=nodes, strategy="pipeline",
                                         timeout=600)
        order = [cluster.agent_by_id(stage["nodes"][0]) for stage in placement["stages"]]
        victim, entry = order[1], order[-1]
        struck, records = fault_during_streams(cluster, entry, lambda: cluster.kill(victim),
                                               apis=("openai",))
        record = next(iter(records.values()))
        if record.error is None:
            raise RuntimeError(f"the stream did not end with an error: {record.lines[-3:]}")
        served, _ = first_success(cluster, entry, timeout=300)
        return record.ended - struck, served - struck


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--loopback", action="store_true",
                        help="agents on loopback instead of network namespaces")
    args = parser.parse_args(argv)
    if args.nodes < 3:
        parser.error("a pipeline of at least 3 nodes: head, victim, entry")
    if not args.loopback:
        from tests.netns import netns_unavailable

        reason = netns_unavailable()
        if reason:
            print(f"# {reason}; running on loopback", flush=True)
            args.loopback = True
    warn_if_busy()
    models, _ = bench_models()
    errors, successes = [], []
    for _ in range(args.rounds):
        error_s, success_s = one_round(args.nodes, models, args.loopback)
        errors.append(error_s)
        successes.append(success_s)
    where = "loopback" if args.loopback else "network namespaces"
    print(f"# {args.nodes}-node pipeline in {where}, {args.rounds} round(s), medians", flush=True)
    print(f"kill_to_stream_error_s: {statistics.median(errors):.2f}", flush=True)
    print(f"kill_to_next_success_s: {statistics.median(successes):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
