"""`flock demo` (the README's first command): a local 3-node cluster on the embedded model.

It pulls the default model, starts three agents on this machine (discovery confined to loopback,
each with its own ports, state directory and one BLAS thread), has them serve the model as a
3-stage pipeline, prints the placement, streams a chat answer through a node that is not the
pipeline's head, and leaves the cluster running with its URLs printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from agent.chat_client import stream_chat
from agent.settings import DEFAULT_MODEL, load_settings

READY_TIMEOUT_S = 300.0
NODES = 3
PORT_STEP = 10  # API ports 52415, 52425, 52435 (52416 is discovery's)

DEMO_SPEC = """\
# The demo's cluster: three agents on one machine serving one model as a 3-stage pipeline.
[cluster]
name = "flock-demo"

[[models]]
model = "{model}"
strategy = "pipeline"
nodes = [{nodes}]
"""


def wait_ready(url: str, processes: list[subprocess.Popen[bytes]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            return False
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def wait_placed(url: str, timeout: float) -> dict[str, Any] | None:
    """The cluster status once the pipeline spans all three nodes and its runners are up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{url}/cluster", timeout=5.0).json()
        except (httpx.HTTPError, ValueError):
            status = {}
        placements = status.get("placements", [])
        if placements and len(placements[0]["stages"]) == NODES:
            return status
        time.sleep(0.5)
    return None


def print_placement(status: dict[str, Any]) -> None:
    names = {n["node_id"]: n["name"] for n in status["nodes"]}
    for placement in status["placements"]:
        print(f"instance {placement['instance_id']} ({placement['strategy']}): "
              f"{placement['reason']}")
        for rank, stage in enumerate(placement["stages"]):
            role = "head" if rank == 0 else "stage"
            node = names.get(stage["nodes"][0], stage["nodes"][0])
            print(f"  {role:<5} {node:<8} layers {stage['layer_start']:>2}-"
                  f"{stage['layer_stop'] - 1:>2}")


def run_demo(args: argparse.Namespace) -> int:
    from agent.models.fetch import pull
    from agent.models.store import ModelStore

    settings = load_settings(state_dir=args.state_dir, models_dir=args.models_dir)
    store = ModelStore(settings.models_dir)
    if DEFAULT_MODEL not in {m.name for m in store.list()}:
        print(f"pulling {DEFAULT_MODEL} ...", file=sys.stderr)
        pull(store, DEFAULT_MODEL, progress=lambda line: print(line, file=sys.stderr))
    root = Path(settings.state_dir) / "demo"
    root.mkdir(parents=True, exist_ok=True)
    names = [f"demo-{i + 1}" for i in range(NODES)]
    spec = root / "cluster.toml"
    spec.write_text(DEMO_SPEC.format(model=DEFAULT_MODEL,
                                     nodes=", ".join(f'"{n}"' for n in names)))
    processes, urls = [], []
    for i, name in enumerate(names):
        port = args.port + PORT_STEP * i
        state = root / name
        state.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "agent", "run", "--host", "127.0.0.1",
                   "--port", str(port), "--node-name", name, "--cluster", str(spec),
                   "--discovery-interface", "127.0.0.1/8", "--data-port", str(52500 + 100 * i),
                   "--blas-threads", "1", "--model", DEFAULT_MODEL,
                   "--state-dir", str(state), "--models-dir", str(settings.models_dir)]
        with (state / "agent.log").open("ab") as log:
            processes.append(subprocess.Popen(command, stdout=log, stderr=log,
                                              start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    print(f"starting {NODES} flock nodes: {', '.join(urls)} (logs in {root}/*/agent.log)",
          file=sys.stderr)

    def give_up(why: str) -> int:
        print(why, file=sys.stderr)
        for p in processes:
            p.terminate()
        return 1

    status = wait_placed(urls[0], READY_TIMEOUT_S)
    if status is None or not all(wait_ready(u, processes, READY_TIMEOUT_S) for u in urls):
        return give_up(f"the cluster did not come up; see {root}/*/agent.log")
    print_placement(status)
    head = status["placements"][0]["head"]
    by_id = {n["node_id"]: n for n in status["nodes"]}
    entry = next(n for n in status["nodes"] if n["node_id"] != head)
    url = f"http://127.0.0.1:{entry['api_port']}"
    print(f"\nasking {entry['name']} (not the head, {by_id[head]['name']}): {args.prompt}")
    code = stream_chat(url, DEFAULT_MODEL, args.prompt)
    pids = " ".join(str(p.pid) for p in processes)
    print(f"\nflock is serving {DEFAULT_MODEL} on a 3-node pipeline at {', '.join(urls)} "
          f"(OpenAI, Anthropic and Ollama APIs on each).\nStop it with: kill {pids}")
    return code
