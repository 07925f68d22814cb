"""Speed-aware placement on a mixed cluster: one node held to a fraction of a core.

    .venv/bin/python -m bench.cluster_hetero [--rounds 3] [--tokens 64] [--quota 0.35]

Two loopback agents, n0 pinned to core 0 and n1 to core 1 (`taskset`, one BLAS thread; their
runners and compute probes inherit it), n1 also held to `--quota` of a core by a cgroup v1 CPU
quota (`/sys/fs/cgroup/cpu/<group>/cpu.cfs_quota_us`; needs root). Once both have measured
their speed and see each other, one spec serves SmolLM2 twice:
- as placed by flock (`strategy = "pipeline"`, unpinned): speed-aware placement;
- pinned to both nodes with the layers that memory-proportional placement gives them
  (`place(..., weigh_by_compute=False)` on the nodes' own profiles).
One greedy stream at a time through n0, the two instances interleaved, medians of the rounds.
Prints `name: value` lines:
  hetero_speed_split_vs_memory_split  decode tok/s speed-aware / memory-proportional
plus the raw tok/s, both placements' layer counts, the nodes' measured decode speeds and the
reason placement gave for a node it left out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.cluster import DECODE_PROMPT, stream_decode  # noqa: E402
from bench.common import bench_models, emit, warn_if_busy  # noqa: E402
from tests.cluster_tools import MODEL, LoopbackCluster  # noqa: E402

CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
assert DECODE_PROMPT  # the prompt bench.cluster decodes; the same stream here


class QuotaGroup:
    """A cgroup v1 CPU group whose members together get `quota` of one core."""

    def __init__(self, quota: float) -> None:
        self.path = CGROUP_ROOT / f"flock-bench-{os.getpid()}"
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (self.path / "cpu.cfs_quota_us").write_text(str(int(quota * PERIOD_US)))

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def remove(self) -> None:
        # Members left (none once the agents stopped) go back to the root group first.
        with contextlib.suppress(OSError):
            for pid in self.procs.read_text().split():
                with contextlib.suppress(OSError):
                    (CGROUP_ROOT / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()


@dataclass
class PinnedCluster(LoopbackCluster):
    """Loopback agents, each started under its own prefix (taskset, a cgroup)."""

    prefixes: dict[str, list[str]] = field(default_factory=dict)

    def _popen(self, command: list[str], env: dict[str, str], log_path: Path,
               netns: str | None) -> subprocess.Popen[bytes]:
        name = command[command.index("--node-name") + 1]
        return super()._popen([*self.prefixes.get(name, []), *command], env, log_path, netns)


def _profiles(status: dict[str, Any]) -> list[Any]:
    from agent.cluster.membership import lenient_profile

    return [lenient_profile(n) for n in status.get("nodes", [])]


def _note(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


def _layers(placement: dict[str, Any]) -> str:
    return "/".join(str(s["layer_stop"] - s["layer_start"]) for s in placement["stages"])


def hetero_figures(models: Path, model_dir: Path, *, rounds: int = 3, n: int = 64,
                   quota: float = 0.35) -> dict[str, float]:
    """Speed-aware vs memory-proportional placement of one stream on a fast and a slow node."""
    from agent.cluster.placement import place
    from agent.cluster.shape import model_shape

    group = QuotaGroup(quota)
    try:
        with tempfile.TemporaryDirectory(prefix="flock-bench-hetero-") as tmp:
            root = Path(tmp)
            slow_prefix = ["sh", "-c", f'echo $$ > {group.procs} && exec "$@"', "sh",
                           "taskset", "-c", "1"]
            # A node throttled to a third of a core answers beacons late while its runner
            # loads: a longer beacon interval keeps the two from declaring each other gone.
            cluster = PinnedCluster(root=root, models_dir=models, discovery_interval_s=2.0,
                                    prefixes={"n0": ["taskset", "-c", "0"], "n1": slow_prefix})
            try:
                fast, slow = cluster.start("n0"), cluster.start("n1")
                cluster.wait_up(timeout=180)
                _note(f"agents up in {root}")
                status = cluster.status(fast)
                profiles = {p.name: p for p in _profiles(status)}
                shape = model_shape(model_dir, MODEL, dtype="float32")
                by_memory = place(shape, list(profiles.values()), strategy="pipeline",
                                  weigh_by_compute=False)
                names = {p.node_id: p.name for p in profiles.values()}
                pins = [names[i] for i in by_memory.nodes()]
                counts = [s.layer_stop - s.layer_start for s in by_memory.stages]
                spec = ('[cluster]\nname = "bench"\n\n'
                        f'[[models]]\nmodel = "{MODEL}"\nstrategy = "pipeline"\n\n'
                        f'[[models]]\nmodel = "{model_dir}"\nstrategy = "pipeline"\n'
                        f'nodes = {pins!r}\nlayers = {counts!r}\n').replace("'", '"')
                answer = cluster.post(fast, "/cluster/spec", content=spec.encode())
                if answer.status_code >= 300:
                    raise RuntimeError(f"spec refused: {answer.status_code} {answer.text}")
                _note(f"spec applied: memory-proportional {pins} {counts}")
                speed_placed = cluster.wait_serving(fast, MODEL, timeout=600)
                _note(f"speed-aware placement serving: {_layers(speed_placed)}")
                memory_placed = cluster.wait_serving(fast, str(model_dir), nodes=len(pins),
                                                     timeout=600)
                _note("memory-proportional placement serving")
                speed: list[float] = []
                memory: list[float] = []
                with httpx.Client(base_url=fast.url, timeout=600, trust_env=False) as client:
                    stream_decode(client, MODEL, 16)  # warm-up: compile both instances' shapes
                    stream_decode(client, str(model_dir), 16)
                    for _ in range(rounds):
                        speed.append(stream_decode(client, MODEL, n))
                        memory.append(stream_decode(client, str(model_dir), n))
                del slow
                # Links are measured in the background once peers meet: read them now.
                profiles = {p.name: p for p in _profiles(cluster.status(fast))}
            finally:
                cluster.close()
    finally:
        group.remove()
    fast_p, slow_p = profiles["n0"], profiles["n1"]
    link = fast_p.links.get(slow_p.node_id)
    reasons = speed_placed.get("left_out", {})
    for node_id, reason in reasons.items():
        print(f"# {names.get(node_id, node_id)}: {reason}", flush=True)
    print(f"# speed-aware: {speed_placed['reason']}", flush=True)
    return {
        "hetero_speed_split_vs_memory_split": statistics.median(speed) / statistics.median(memory),
        "hetero_speed_decode_tok_s": statistics.median(speed),
        "hetero_memory_decode_tok_s": statistics.median(memory),
        "hetero_speed_stages": float(len(speed_placed["stages"])),
        "hetero_speed_layers_on_fast": float(sum(
            s["layer_stop"] - s["layer_start"] for s in speed_placed["stages"]
            if fast_p.node_id in s["nodes"])),
        "hetero_memory_layers_on_fast": float(sum(
            s["layer_stop"] - s["layer_start"] for s in memory_placed["stages"]
            if fast_p.node_id in s["nodes"])),
        "hetero_slow_left_out": float(slow_p.node_id in reasons),
        "hetero_fast_decode_gflops": fast_p.decode_gflops,
        "hetero_slow_decode_gflops": slow_p.decode_gflops,
        "hetero_fast_matmul_gflops": fast_p.compute_gflops,
        "hetero_slow_matmul_gflops": slow_p.compute_gflops,
        "hetero_link_rtt_ms": link.rtt_ms if link else -1.0,
        "hetero_link_mbps": link.mbps if link else -1.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quota", type=float, default=0.35, help="the slow node's share of a core")
    args = parser.parse_args(argv)
    if not os.access(CGROUP_ROOT, os.W_OK):
        print(f"# {CGROUP_ROOT} is not writable (needs root and cgroup v1): no quota to apply",
              file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("# needs two cores, one per node", file=sys.stderr)
        return 2
    warn_if_busy()
    models, model_dir = bench_models()
    for name, value in hetero_figures(models, model_dir, rounds=args.rounds, n=args.tokens,
                                      quota=args.quota).items():
        emit(name, value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
