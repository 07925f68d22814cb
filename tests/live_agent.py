"""A real `python -m agent run` in a subprocess, for tests and benches that need the whole node
(HTTP listeners, cluster controller, runner processes): start it, wait until it serves, read its
runners from /proc, and stop it — by its own pid and process group only.

Every agent gets its own state directory, a free loopback port and a data port range of its
own, so several can run side by side; discovery stays on loopback (tests/conftest.py). Every
process started through `spawn` runs in a session of its own and is stopped, with whatever is
left of its process group (its runners), when the helper's process exits, on SIGTERM, SIGINT
and SIGHUP too: a bench or test run stopped by a timeout leaves no agent behind. `wait_until`
is the one deadline-bounded wait loop for tests.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import httpx

RUNNER_MODULE = "agent.runtime.runner"
ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


# ---- waiting ---------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *,
               interval: float = 0.2, describe: Callable[[], str] | None = None) -> T:
    """predicate() until it returns something truthy (returned), for at most `timeout` seconds;
    then an AssertionError naming `what` (and `describe()`, e.g. log tails). The predicate may
    raise to fail at once (a process it watches has exited)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            detail = f"\n{describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


# ---- processes: own session, stopped at exit and on signals -----------------------------------

_started: list[subprocess.Popen[bytes]] = []
_lock = threading.RLock()  # re-entrant: a signal may arrive while the main thread holds it
_installed = False
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def spawn(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Popen `argv` in a session (and process group) of its own and remember it, so
    `stop_all` (run at exit and on SIGTERM/SIGINT/SIGHUP) ends it and its children."""
    install_cleanup()
    process: subprocess.Popen[bytes] = subprocess.Popen(list(argv), start_new_session=True,
                                                         **popen)
    with _lock:
        _started.append(process)
    return process


def kill_group(pid: int) -> None:
    """SIGKILL what is left of the process group led by `pid` (an agent's runners)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int | None:
    """SIGTERM (an agent drains and stops its runners), SIGKILL after `timeout`, then SIGKILL
    whatever is left of its process group. The exit code; None when it had to be killed."""
    code = process.poll()
    if code is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            code = None
    kill_group(process.pid)
    with _lock:
        if process in _started:
            _started.remove(process)
    return code


def stop_all(grace: float = 10.0) -> None:
    """Stop every process `spawn` started that is still remembered: SIGTERM all of them at
    once, wait up to `grace` seconds in all, then SIGKILL their process groups."""
    with _lock:
        processes = list(_started)
        _started.clear()
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.1, deadline - time.monotonic()))
    for process in processes:
        kill_group(process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)


def install_cleanup() -> None:
    """Run `stop_all` at exit and before the usual effect of SIGTERM, SIGINT and SIGHUP (a
    handler already installed runs after it; the default ones become SystemExit(128 + n) or
    KeyboardInterrupt, so `finally` blocks run too). Signal handlers need the main thread:
    from another thread only the exit hook is installed."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    atexit.register(stop_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _STOP_SIGNALS:
        previous = signal.getsignal(signum)
        if previous is signal.SIG_IGN:
            continue
        signal.signal(signum, _stopper(previous))


def _stopper(previous: Any) -> Callable[[int, FrameType | None], None]:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_all(grace=5.0)
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(128 + signum)

    return on_signal


def flock_processes(exclude: Sequence[int] = ()) -> list[tuple[int, str]]:
    """(pid, command line) of every agent (`-m agent run`, `flock run`) and runner on this
    machine but `exclude` and this process's own descendants."""
    found = []
    mine = set(exclude) | {os.getpid()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        argv = _cmdline(pid)
        if pid in mine or _state(pid) in ("Z", "X", None) or _descends_from(pid, os.getpid()):
            continue
        line = " ".join(argv)
        if RUNNER_MODULE in argv or "agent run" in line or (
                argv[1:2] == ["run"] and argv[0].endswith("flock")):
            found.append((pid, line))
    return found


def _descends_from(pid: int, ancestor: int) -> bool:
    seen = 0
    current: int | None = pid
    while current and current > 1 and seen < 64:
        current = parent_pid(current)
        if current == ancestor:
            return True
        seen += 1
    return False


# ---- the compute probe, measured once per test session --------------------------------------

# Set (by tests/conftest.py) to a file path: agents the helpers start get a copy of the compute
# probe's cache (measured once, into that file, on first use) in their new state directory, so
# each agent start skips its ~1.5 s probe subprocess (MLX import and six timed windows) and
# every node of a test cluster reports the same, real speed. Benches leave it unset: their
# agents measure as a user's would. The probe and its cache are tested on their own
# (tests/test_speed_placement.py).
PROBE_CACHE_ENV = "TESTS_FLOCK_PROBE_CACHE"  # not FLOCK_: agents read those as settings
PROBE_CACHE_FILE = "compute_probe.json"  # agent.cluster.compute_probe.CACHE_FILE
_PROBE_SCRIPT = ("import asyncio, sys; from pathlib import Path;"
                 "from agent.cluster.compute_probe import measure_speed;"
                 "from agent.settings import NodeSettings;"
                 "asyncio.run(measure_speed(NodeSettings(state_dir=Path(sys.argv[1]))))")


def seed_probe_cache(state_dir: Path) -> None:
    """Copy the session's compute probe cache into `state_dir` (when PROBE_CACHE_ENV is set and
    the directory has none), measuring it first if no agent has yet. The cache is keyed by the
    conditions the speed depends on (BLAS, cores, quota ...): an agent whose conditions differ
    still probes."""
    template = os.environ.get(PROBE_CACHE_ENV)
    target = state_dir / PROBE_CACHE_FILE
    if not template or target.exists():
        return
    source = Path(template)
    with _lock:
        if not source.exists():
            source.parent.mkdir(parents=True, exist_ok=True)
            # In a subprocess, as an agent measures: with the environment agents inherit (one
            # BLAS thread), the agent package of this checkout, and no state of the user's.
            probe_env = {**os.environ, "FLOCK_STATE_DIR": str(source.parent)}
            probe_env["PYTHONPATH"] = str(ROOT)
            subprocess.run([sys.executable, "-c", _PROBE_SCRIPT, str(source.parent)],
                           env=probe_env, cwd=ROOT, check=False, timeout=120,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            written = source.parent / PROBE_CACHE_FILE
            if written != source and written.exists():
                written.replace(source)
        if source.exists():
            state_dir.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())


# ---- ports and /proc -------------------------------------------------------------------------


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_data_port_base() -> int:
    """A data port base (runners' links use base .. base + 4k) unlikely to clash with another
    agent of this test run."""
    return 20000 + (os.getpid() * 7919 + free_port()) % 35000


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on; [] when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return stat.rsplit(")", 1)[1].split()


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 else None


def _state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie, not yet reaped, counts as gone)."""
    return _state(pid) in (None, "Z", "X")


def runner_pids(parent: int | None = None) -> list[int]:
    """Live runner processes (zombies excluded): every one on this machine, or the ones
    `parent` (an agent's pid) started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if RUNNER_MODULE not in _cmdline(pid) or _state(pid) in ("Z", "X", None):
            continue
        if parent is None or parent_pid(pid) == parent:
            pids.append(pid)
    return pids


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS), in bytes; 0 when it is gone."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size of a live process (VmHWM), in bytes; 0 when it is gone."""
    return _status_kib(pid, "VmHWM") * 1024


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


# ---- agents ----------------------------------------------------------------------------------


@dataclass
class LiveAgent:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    state_dir: Path
    log_path: Path
    model: str | None
    _log: object = field(repr=False, default=None)
    started_at: float = 0.0  # time.monotonic() just before the process was started

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
        return runner_pids(self.pid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def ready(self) -> bool:
        """Whether /readyz answers 200 now; raises when the agent has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"agent exited ({self.process.returncode}):\n{self.log_text()}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 180.0) -> None:
        try:
            wait_until(self.ready, timeout, "the agent to become ready", interval=0.1)
        except AssertionError:
            raise RuntimeError(f"agent did not become ready:\n{self.log_text()[-4000:]}") from None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`, then SIGKILL what is left of its process
        group; the exit code (None if it had to be killed)."""
        code = stop_process(self.process, timeout)
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
    models_dir: Path | None = None,
    cwd: Path | None = None,
) -> LiveAgent:
    """Start an agent serving `model` (a directory or store name; None: no model). `prefix`
    wraps the command (e.g. `ip netns exec NS`); `models_dir` defaults to one inside the state
    directory; `cwd` is the checkout whose `agent` package runs (default: this one). Later
    `args` override the defaults given here (e.g. `--log-level warning`)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    seed_probe_cache(state_dir)
    port = port or free_port()
    argv = [*prefix, sys.executable, "-m", "agent", "run", "--host", host, "--port", str(port),
            "--state-dir", str(state_dir),
            "--models-dir", str(models_dir or state_dir / "models"),
            "--data-port", str(free_data_port_base()), "--log-level", "info"]
    if model is not None:
        argv += ["--model", model]
    argv += list(args)
    full_env = {**os.environ, **(env or {})}
    if model is None:
        full_env["FLOCK_MODEL"] = ""
    log_path = state_dir / "agent.out"
    log = log_path.open("ab")
    started_at = time.monotonic()
    process = spawn(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd or ROOT)
    url_host = "127.0.0.1" if host in ("0.0.0.0", "127.0.0.1") else host
    agent = LiveAgent(process, f"http://{url_host}:{port}", port, state_dir, log_path, model,
                      _log=log, started_at=started_at)
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
