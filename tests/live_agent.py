"""A real `python -m agent run` in a subprocess, for tests that need the whole node (HTTP
listeners, cluster controller, runner processes): start it, wait until it serves, read its
runners from /proc, and stop it — by its own pid only.

Every agent gets its own state directory, a free loopback port and a data port range of its
own, so several can run side by side; discovery stays on loopback (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

RUNNER_MODULE = "agent.runtime.runner"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_data_port_base() -> int:
    """A data port base (runners' links use base .. base + 4k) unlikely to clash with another
    agent of this test run."""
    return 20000 + (os.getpid() * 7919 + free_port()) % 35000


@dataclass
class LiveAgent:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    state_dir: Path
    log_path: Path
    model: str | None
    _log: object = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def runner_pids(self) -> list[int]:
        """Runner processes this agent started (its children running the runner module)."""
        return [pid for pid in runner_pids() if parent_pid(pid) == self.pid]

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited ({self.process.returncode}):\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent did not become ready:\n{self.log_text()[-4000:]}")
            time.sleep(0.3)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit code (None if it had to be killed)."""
        code = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                code = None
        if self._log is not None:
            with contextlib.suppress(Exception):
                self._log.close()  # type: ignore[attr-defined]
        return code


def start_agent(
    state_dir: Path,
    *,
    model: str | None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    wait: bool = True,
    timeout: float = 180.0,
    prefix: Sequence[str] = (),
) -> LiveAgent:
    """Start an agent serving `model` (a directory or store name; None: no model). `prefix`
    wraps the command (e.g. `ip netns exec NS`)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [*prefix, sys.executable, "-m", "agent", "run", "--host", host, "--port", str(port),
            "--state-dir", str(state_dir), "--models-dir", str(state_dir / "models"),
            "--data-port", str(free_data_port_base()), "--log-level", "info"]
    if model is not None:
        argv += ["--model", model]
    argv += list(args)
    full_env = {**os.environ, **(env or {})}
    if model is None:
        full_env["FLOCK_MODEL"] = ""
    log_path = state_dir / "agent.out"
    log = log_path.open("ab")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                               cwd=Path(__file__).resolve().parents[1])
    url_host = "127.0.0.1" if host in ("0.0.0.0", "127.0.0.1") else host
    agent = LiveAgent(process, f"http://{url_host}:{port}", port, state_dir, log_path, model,
                      _log=log)
    if wait:
        try:
            agent.wait_ready(timeout)
        except BaseException:
            agent.stop(10)
            raise
    return agent


@contextlib.contextmanager
def running_agent(state_dir: Path, **kwargs: object) -> Iterator[LiveAgent]:
    agent = start_agent(state_dir, **kwargs)  # type: ignore[arg-type]
    try:
        yield agent
    finally:
        agent.stop()


# ---- /proc -----------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def runner_pids() -> list[int]:
    """Every live runner process on this machine (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        argv = _cmdline(pid)
        if RUNNER_MODULE in argv and _state(pid) not in ("Z", "X", None):
            pids.append(pid)
    return pids


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
