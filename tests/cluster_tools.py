"""Helpers for cluster tests and benches: real agents on loopback or in network namespaces.

`LoopbackCluster` starts N `python -m agent run` processes on 127.0.0.1, each with its own API
port, data-port range, state directory and one BLAS thread; all of them share a discovery port
and a cluster name made up for this run, so they find each other over loopback and nobody else
(another engineer's agents on this machine included). `NetnsCluster` starts one agent per host
of a `tests.netns.NetnsLab`, discovery confined to the lab's subnet; HTTP calls to those agents
are made from a thread that entered the caller's namespace (`setns`), so a test can call a node
"from loopback" (its own namespace, 127.0.0.1) or "from another node" (another namespace).

Everything a cluster starts is stopped by `close()` (each agent's process group, by its id),
on failure too; loops here are bounded by deadlines.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.live_agent import (
    free_port,
    runner_pids,
    seed_probe_cache,
    spawn,
    stop_process,
    wait_until,
)
from tests.live_agent import metric_total as metric_total  # re-exported for the tests

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"  # the default model's store name
CLONE_NEWNET = 0x40000000
T = TypeVar("T")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# ---- the model store agents share -------------------------------------------------------------


def link_files(source: Path, directory: Path) -> None:
    """`source`'s files (not its folders) hard-linked into `directory`, copied where the
    filesystem refuses links: a model's weights without a second copy on disk."""
    for item in source.iterdir():
        if item.is_file():
            try:
                os.link(item, directory / item.name)
            except OSError:
                shutil.copy2(item, directory / item.name)


def shared_models_dir(root: Path, model_dir: Path) -> Path:
    """A model store at `root` holding `model_dir` (an mlx-lm directory) as `smollm2-135m`.

    Weight files are hard-linked when the filesystem allows (no second 540 MB copy); the store
    is built once and reused by later runs.
    """
    from agent.models.store import ModelStore

    store = ModelStore(root)
    if MODEL in {m.name for m in store.list()}:
        return root

    store.add(MODEL, lambda directory: link_files(model_dir, directory),
              source=f"path:{model_dir}", dtype="float32")
    return root


# ---- ports ----------------------------------------------------------------------------------


def free_port_range(count: int, *, low: int = 20000, high: int = 60000) -> int:
    """The first port of `count` consecutive free TCP ports on loopback (bounded search)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(low, high - count)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range")


# ---- namespaces -------------------------------------------------------------------------------


def _enter_netns(name: str) -> None:
    """Move the calling thread into network namespace `name` (sockets it makes live there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NsCaller:
    """Runs functions in a thread that lives in one network namespace (None: this one)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._pool = ThreadPoolExecutor(
            max_workers=8, thread_name_prefix=f"ns-{netns or 'root'}",
            initializer=_enter_netns if netns else None,
            initargs=(netns,) if netns else ())

    def __call__(self, fn: Callable[..., T], *args: Any, timeout: float = 600.0,
                 **kwargs: Any) -> T:
        return self._pool.submit(fn, *args, **kwargs).result(timeout=timeout)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Any:
        return self._pool.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---- agents -----------------------------------------------------------------------------------


@dataclass
class Agent:
    name: str
    address: str  # where other nodes (and tests from other namespaces) reach it
    port: int
    state_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    netns: str | None = None

    @property
    def url(self) -> str:
        """The URL from the agent's own namespace (loopback)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def remote_url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def runner_config(pid: int) -> dict[str, Any]:
    """The RunnerConfig a runner was started with (its last argv item, JSON)."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        return json.loads([a for a in argv if a][-1])  # type: ignore[no-any-return]
    except (OSError, ValueError, IndexError):
        return {}


def kill9(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class ClusterBase:
    """What loopback and namespace clusters share: agents, HTTP calls, waiting, cleanup."""

    root: Path
    models_dir: Path
    agents: list[Agent] = field(default_factory=list)
    cluster_name: str = field(default_factory=lambda: f"t{os.getpid()}{secrets.token_hex(3)}")
    blas_threads: int = 1
    # Beacon interval (suspect after 3 missed, gone after 8); None keeps flock's default (1 s).
    discovery_interval_s: float | None = None
    api_key: str | None = None  # sent with every call the helpers make, when the agents need one
    _callers: dict[str | None, NsCaller] = field(default_factory=dict)

    # -- processes --------------------------------------------------------------------------
    def _command(self, agent_name: str, port: int, state: Path, *, host: str,
                 discovery: str, data_port: int, model: str | None,
                 cluster_file: Path | None, extra: list[str]) -> list[str]:
        command = [sys.executable, "-m", "agent", "run", "--host", host, "--port", str(port),
                   "--node-name", agent_name, "--state-dir", str(state),
                   "--models-dir", str(self.models_dir), "--discovery-interface", discovery,
                   "--data-port", str(data_port), "--blas-threads", str(self.blas_threads),
                   "--log-level", "info"]
        if model:
            command += ["--model", model]
        if cluster_file is not None:
            command += ["--cluster", str(cluster_file)]
        return command + extra

    def _env(self, state: Path, discovery_port: int, model: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOCK_")}
        env.update({
            "PYTHONPATH": str(ROOT),
            "FLOCK_STATE_DIR": str(state),  # no ~/.flock/flock.toml leaks in
            "FLOCK_CLUSTER_NAME": self.cluster_name,
            "FLOCK_DISCOVERY_PORT": str(discovery_port),
        })
        if self.discovery_interval_s is not None:
            env["FLOCK_DISCOVERY_INTERVAL_S"] = str(self.discovery_interval_s)
        if model is None:
            env["FLOCK_MODEL"] = ""  # nothing placed at start
        return env

    def _popen(self, command: list[str], env: dict[str, str], log_path: Path,
               netns: str | None) -> subprocess.Popen[bytes]:
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]
        with log_path.open("ab") as log:
            # Its own session, stopped at exit and on SIGTERM/SIGINT even without close().
            return spawn(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))

    def kill(self, agent: Agent, *, runners: bool = True) -> list[int]:
        """kill -9 the agent (and its runners first when `runners`); returns the pids killed."""
        pids = runner_pids(agent.pid) if runners else []
        for pid in pids:
            kill9(pid)
        kill9(agent.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.process.wait(10)
        return [*pids, agent.pid]

    def close(self) -> None:
        for agent in self.agents:
            if agent.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(agent.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for agent in self.agents:
            # The agent's session holds its runners: whatever is left of it is killed.
            stop_process(agent.process, max(0.1, deadline - time.monotonic()))
        for caller in self._callers.values():
            caller.close()

    # -- HTTP -------------------------------------------------------------------------------
    def caller(self, netns: str | None) -> NsCaller:
        if netns not in self._callers:
            self._callers[netns] = NsCaller(netns)
        return self._callers[netns]

    def call(self, agent: Agent, fn: Callable[[httpx.Client], T], *, via: Agent | None = None,
             timeout: float = 600.0) -> T:
        """fn(client) with a client whose base URL reaches `agent`: over loopback from its own
        namespace (via None or itself), or over the network from `via`'s namespace."""
        remote = via is not None and via is not agent
        netns = via.netns if remote and via is not None else agent.netns
        base = agent.remote_url if remote else agent.url

        def run() -> T:
            with httpx.Client(base_url=base, timeout=timeout, trust_env=False,
                              headers=self._headers()) as client:
                return fn(client)

        return self.caller(netns)(run, timeout=timeout + 5)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def submit(self, agent: Agent, fn: Callable[[httpx.Client], T], *,
               timeout: float = 600.0) -> Future[T]:
        """`call` in the background (from the agent's own namespace, over loopback)."""

        def run() -> T:
            with httpx.Client(base_url=agent.url, timeout=timeout, trust_env=False,
                              headers=self._headers()) as client:
                return fn(client)

        return self.caller(agent.netns).submit(run)  # type: ignore[no-any-return]

    def get(self, agent: Agent, path: str, *, via: Agent | None = None,
            timeout: float = 10.0) -> httpx.Response:
        return self.call(agent, lambda c: c.get(path), via=via, timeout=timeout)

    def post(self, agent: Agent, path: str, *, via: Agent | None = None, timeout: float = 300.0,
             **kwargs: Any) -> httpx.Response:
        return self.call(agent, lambda c: c.post(path, **kwargs), via=via, timeout=timeout)

    def delete(self, agent: Agent, path: str, *, via: Agent | None = None,
               timeout: float = 30.0) -> httpx.Response:
        return self.call(agent, lambda c: c.delete(path), via=via, timeout=timeout)

    def status(self, agent: Agent) -> dict[str, Any]:
        try:
            response = self.get(agent, "/cluster", timeout=5.0)
            return response.json() if response.status_code == 200 else {}  # type: ignore[no-any-return]
        except (httpx.HTTPError, ValueError, TimeoutError):
            return {}

    def metrics(self, agent: Agent) -> str:
        return self.get(agent, "/metrics").text

    # -- waiting ----------------------------------------------------------------------------
    def wait_for(self, what: str, check: Callable[[], T | None], timeout: float,
                 interval: float = 0.5, agents: list[Agent] | None = None) -> T:
        """check() until it returns something truthy; fails with the agents' log tails, at
        once when a watched agent exits."""
        watched = self.agents if agents is None else agents

        def checked() -> T | None:
            result = check()
            dead = [a for a in watched if not a.alive()]
            if not result and dead:
                raise AssertionError(f"waiting for {what}: agent {dead[0].name} exited "
                                     f"({dead[0].process.returncode})\n{self.describe()}")
            return result

        return wait_until(checked, timeout, what, interval=interval,  # type: ignore[return-value]
                          describe=self.describe)

    def wait_up(self, timeout: float = 120.0) -> None:
        """Every agent answers and sees all the others."""
        ids: dict[str, str] = {}

        def check() -> bool:
            for agent in self.agents:
                status = self.status(agent)
                if not status:
                    return False
                ids[agent.name] = status["node_id"]
                seen = {n["node_id"] for n in status.get("nodes", [])
                        if n.get("status") in ("self", "alive")}
                if len(seen) < len(self.agents):
                    return False
            return True

        self.wait_for("every agent to see the others", check, timeout)

    def node_ids(self) -> dict[str, str]:
        """Agent name -> node id (from each agent's own status)."""
        out = {}
        for agent in self.agents:
            status = self.status(agent)
            if status:
                out[agent.name] = status["node_id"]
        return out

    def serving(self, agent: Agent, model: str = MODEL, *, nodes: int | None = None,
                strategy: str | None = None) -> dict[str, Any] | None:
        """The placement of `model` as `agent` sees it once every runner it lists is ready on
        the nodes that run it (checked through each live node's status), else None."""
        status = self.status(agent)
        for placement in status.get("placements", []):
            if placement["model"] != model:
                continue
            if strategy is not None and placement["strategy"] != strategy:
                continue
            ids = [n for stage in placement["stages"] for n in stage["nodes"]]
            if nodes is not None and len(ids) != nodes:
                continue
            if self._all_ready(placement, ids):
                return placement  # type: ignore[no-any-return]
        return None

    def _all_ready(self, placement: dict[str, Any], ids: list[str]) -> bool:
        by_id = {}
        for other in self.agents:
            if other.alive():
                status = self.status(other)
                if status:
                    by_id[status["node_id"]] = status
        for node in ids:
            status = by_id.get(node)
            if status is None:
                return False
            runners = [r for r in status.get("runners", [])
                       if r["key"].startswith(placement["instance_id"] + "/")]
            if not runners or any(r["state"] != "ready" for r in runners):
                return False
        return True

    def wait_serving(self, agent: Agent, model: str = MODEL, *, nodes: int | None = None,
                     strategy: str | None = None, timeout: float = 300.0) -> dict[str, Any]:
        return self.wait_for(
            f"{model} placed on {nodes or 'some'} nodes with ready runners",
            lambda: self.serving(agent, model, nodes=nodes, strategy=strategy), timeout,
            interval=1.0, agents=[a for a in self.agents if a.alive()])

    def describe(self) -> str:
        parts = []
        for agent in self.agents:
            status = self.status(agent) if agent.alive() else {}
            summary = {k: status.get(k) for k in ("node_id", "leader", "assignment_generation",
                                                  "spec", "placements", "runners", "problems")}
            parts.append(f"--- {agent.name} (alive={agent.alive()}): "
                         f"{json.dumps(summary)[:3000]}\n{agent.log_tail(25)}")
        return "\n".join(parts)

    def agent_by_id(self, node_id: str) -> Agent:
        ids = self.node_ids()
        for agent in self.agents:
            if ids.get(agent.name) == node_id:
                return agent
        raise KeyError(node_id)


@dataclass
class LoopbackCluster(ClusterBase):
    discovery_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))

    def start(self, name: str, *, model: str | None = None, cluster_file: Path | None = None,
              extra: list[str] | None = None) -> Agent:
        state = self.root / name
        state.mkdir(parents=True, exist_ok=True)
        seed_probe_cache(state)
        port = free_port()
        data_port = free_port_range(32)
        command = self._command(name, port, state, host="127.0.0.1", discovery="127.0.0.1/8",
                                data_port=data_port, model=model, cluster_file=cluster_file,
                                extra=extra or [])
        log_path = state / "agent.log"
        process = self._popen(command, self._env(state, self.discovery_port, model), log_path,
                              None)
        agent = Agent(name, "127.0.0.1", port, state, log_path, process)
        self.agents.append(agent)
        return agent


@dataclass
class NetnsCluster(ClusterBase):
    lab: Any = None  # tests.netns.NetnsLab
    port: int = 52415
    discovery_port: int = 52416

    def start(self, index: int, *, model: str | None = None, cluster_file: Path | None = None,
              extra: list[str] | None = None, name: str | None = None) -> Agent:
        host = self.lab.hosts[index]
        name = name or f"node{index}"
        state = self.root / name
        state.mkdir(parents=True, exist_ok=True)
        seed_probe_cache(state)
        command = self._command(name, self.port, state, host="0.0.0.0", discovery=self.lab.cidr,
                                data_port=52500, model=model, cluster_file=cluster_file,
                                extra=extra or [])
        log_path = state / "agent.log"
        process = self._popen(command, self._env(state, self.discovery_port, model), log_path,
                              host.netns)
        # The lab stops what it started at exit too; register ours as a second safety net.
        self.lab._procs.append(process)
        agent = Agent(name, host.address, self.port, state, log_path, process, host.netns)
        self.agents.append(agent)
        return agent

    def restart(self, agent: Agent, **kwargs: Any) -> Agent:
        """Start the same node again (same state directory, so the same node id)."""
        index = next(h.index for h in self.lab.hosts if h.netns == agent.netns)
        self.agents.remove(agent)
        return self.start(index, name=agent.name, **kwargs)


@contextlib.contextmanager
def loopback_cluster(root: Path, models_dir: Path) -> Iterator[LoopbackCluster]:
    cluster = LoopbackCluster(root=root, models_dir=models_dir)
    try:
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def netns_cluster(n: int, root: Path, models_dir: Path) -> Iterator[NetnsCluster]:
    from tests.netns import netns_lab

    with netns_lab(n) as lab:
        cluster = NetnsCluster(root=root, models_dir=models_dir, lab=lab)
        try:
            yield cluster
        finally:
            cluster.close()
