"""Run flock as a service: render the systemd unit / launchd plist, install, uninstall, status.

The templates live here, in code, so the zipapp carries them without package-data lookups; the
files under `deploy/systemd/` and `deploy/launchd/` are examples rendered from this module
(`write_examples(Path("deploy"))` regenerates them, and a test fails when they drift).

Which kind of service to install:

- Linux, `scope="user"` (default): `~/.config/systemd/user/flock.service`, started by the user's
  systemd manager. `loginctl enable-linger` (run by install) makes it start at boot without a
  login. The unit carries only sandboxing that works without privileges.
- Linux, `scope="system"` (root): `/etc/systemd/system/flock.service`, running as `user`, with
  the full hardening set (read-only system, private /tmp, locked-memory limit for RDMA).
- macOS, `scope="user"`: a LaunchAgent in `~/Library/LaunchAgents`. It runs in the user's login
  session, which is what Metal and the user's files expect; with automatic login enabled a Mac
  serves after a reboot. Use this unless the Mac must serve with nobody logged in.
- macOS, `scope="system"` (root): a LaunchDaemon in `/Library/LaunchDaemons`, started at boot
  without a login, running as `user`.

On macOS the agent runs under `/usr/bin/caffeinate -is` so the Mac does not sleep while serving
(`-s` holds only on AC power).
"""

from __future__ import annotations

import json
import os
import plistlib
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.settings import DEFAULT_PORT

Scope = Literal["user", "system"]

SERVICE_NAME = "flock.service"
LAUNCHD_LABEL = "com.flock.agent"
CAFFEINATE = ("/usr/bin/caffeinate", "-is")
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_PLIST_DIR = Path("/Library/LaunchDaemons")


class ServiceError(RuntimeError):
    """Installing or controlling the service failed; the message says what to do."""


@dataclass(frozen=True)
class ServiceSpec:
    """What the service runs and where it keeps its files."""

    zipapp: Path
    state_dir: Path
    models_dir: Path
    # The interpreter that runs the zipapp; absolute, because neither systemd nor launchd
    # searches the user's PATH. Default: the one running `flock service install`.
    python: Path = field(default_factory=lambda: Path(sys.executable))
    run_args: tuple[str, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    scope: Scope = "user"
    user: str | None = None  # system scope: the account flock runs as
    keep_awake: bool = True  # macOS: wrap in caffeinate
    restart_sec: int = 5

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"


def program_arguments(spec: ServiceSpec) -> list[str]:
    """The command line the service manager starts: python3 /path/flock.pyz run ..."""
    return [str(spec.python), str(spec.zipapp), "run", *spec.run_args]


def service_environment(spec: ServiceSpec) -> dict[str, str]:
    env = {
        "FLOCK_STATE_DIR": str(spec.state_dir),
        "FLOCK_MODELS_DIR": str(spec.models_dir),
        # Log lines reach the journal / log file as they are written, not when a buffer fills.
        "PYTHONUNBUFFERED": "1",
        # A shiv-built zipapp unpacks itself to ~/.shiv; keep that inside the state dir, which
        # the systemd sandbox leaves writable.
        "SHIV_ROOT": str(spec.state_dir / "pyz"),
    }
    env.update(spec.environment)
    return env


# -- systemd -----------------------------------------------------------------------------------


def render_systemd_unit(spec: ServiceSpec) -> str:
    """The flock.service unit for `spec.scope` (see the module docstring for the difference)."""
    if spec.scope == "system" and not spec.user:
        raise ServiceError("a system unit needs the user flock runs as (the owner of its dirs)")
    system = spec.scope == "system"
    lines = [
        "# flock node agent. Written by `flock service install`; a reinstall overwrites it.",
        "[Unit]",
        "Description=flock LLM inference node agent",
    ]
    if system:  # a user manager cannot order itself after the system's network target
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += ["", "[Service]", "Type=simple"]
    if system:
        lines.append(f"User={spec.user}")
    lines += [
        f"ExecStart={' '.join(_systemd_quote(a, dollar=True) for a in program_arguments(spec))}",
        # One path, never split on spaces, so only specifiers need escaping.
        f"WorkingDirectory={str(spec.state_dir).replace('%', '%%')}",
    ]
    # CUDA keeps compiled kernels in ~/.nv, read-only under ProtectSystem=strict.
    env = {"CUDA_CACHE_PATH": str(spec.state_dir / "cuda-cache"), **service_environment(spec)}
    lines += [f"Environment={_systemd_quote(f'{k}={v}')}" for k, v in env.items()]
    lines += [
        "Restart=on-failure",
        f"RestartSec={spec.restart_sec}",
        "# SIGTERM goes to the agent alone, which drains requests and stops its runners;",
        "# whatever is left when TimeoutStopSec ends gets SIGKILL.",
        "KillMode=mixed",
        "TimeoutStopSec=30",
        "NoNewPrivileges=yes",
    ]
    if system:
        rw = " ".join(_systemd_quote(str(p)) for p in (spec.state_dir, spec.models_dir))
        lines += [
            "LimitNOFILE=65536",
            "# RDMA backends of mx.distributed pin (lock) the buffers they register.",
            "LimitMEMLOCK=infinity",
            "ProtectSystem=strict",
            f"ReadWritePaths={rw}",
            "PrivateTmp=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectControlGroups=yes",
            "RestrictSUIDSGID=yes",
            "LockPersonality=yes",
            "# Not MemoryDenyWriteExecute=: MLX compiles kernels at run time (g++ into the temp",
            "# dir on CPU, NVRTC on CUDA) and loads them. Not PrivateDevices=: GPUs live in /dev.",
        ]
    else:
        lines += [
            "# ProtectSystem=, PrivateTmp= and friends need unprivileged user namespaces in a",
            "# user unit and then hide the user's groups (GPU device access) behind PrivateUsers;",
            "# the system unit (`--system`) carries them.",
        ]
    lines += [
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if system else 'default.target'}",
        "",
    ]
    return "\n".join(lines)


def systemd_unit_path(scope: Scope, home: Path) -> Path:
    if scope == "system":
        return SYSTEM_UNIT_DIR / SERVICE_NAME
    return home / ".config" / "systemd" / "user" / SERVICE_NAME


def _systemd_quote(arg: str, *, dollar: bool = False) -> str:
    """Quote one word for a systemd setting: % specifiers expand everywhere, $VARS (dollar=True)
    only in ExecStart=."""
    escaped = arg.replace("%", "%%")
    if dollar:
        escaped = escaped.replace("$", "$$")
    if any(c in escaped for c in " \t\"'\\") or not escaped:
        escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


# -- launchd -----------------------------------------------------------------------------------


def launchd_plist(spec: ServiceSpec) -> dict[str, object]:
    """The launchd job as a dict (plistlib writes it)."""
    args = program_arguments(spec)
    if spec.keep_awake:
        args = [*CAFFEINATE, *args]
    job: dict[str, object] = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": args,
        "EnvironmentVariables": service_environment(spec),
        "WorkingDirectory": str(spec.state_dir),
        "RunAtLoad": True,
        # Restart after a crash, but a clean exit (`flock` stopping on request) stays stopped.
        "KeepAlive": {"SuccessfulExit": False},
        # Seconds between restarts, so a runner that cannot start does not spin.
        "ThrottleInterval": 10,
        # Seconds from SIGTERM to SIGKILL: time to drain requests and stop runners.
        "ExitTimeOut": 30,
        # Interactive: launchd does not throttle CPU or I/O as it does for background jobs.
        "ProcessType": "Interactive",
        "StandardOutPath": str(spec.logs_dir / "launchd.out.log"),
        "StandardErrorPath": str(spec.logs_dir / "launchd.err.log"),
        "SoftResourceLimits": {"NumberOfFiles": 65536},
    }
    if spec.scope == "system":
        if not spec.user:
            raise ServiceError("a LaunchDaemon needs the user flock runs as")
        job["UserName"] = spec.user
    return job


def render_launchd_plist(spec: ServiceSpec) -> str:
    return plistlib.dumps(launchd_plist(spec), sort_keys=False).decode()


def launchd_plist_path(scope: Scope, home: Path) -> Path:
    if scope == "system":
        return SYSTEM_PLIST_DIR / f"{LAUNCHD_LABEL}.plist"
    return home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"


def _launchd_domain(scope: Scope, uid: int) -> str:
    return "system" if scope == "system" else f"gui/{uid}"


# -- install / uninstall / status --------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    # Steps that fail harmlessly: unloading a job that is not loaded, lingering without polkit.
    may_fail: bool = False


@dataclass(frozen=True)
class ServicePlan:
    """Everything an action will do, so --dry-run can show it and tests can check it."""

    directories: tuple[Path, ...] = ()
    files: tuple[tuple[Path, str], ...] = ()
    remove: tuple[Path, ...] = ()
    commands: tuple[Command, ...] = ()
    chown: str | None = None  # owner for created directories (system scope, run as root)


def plan_install(
    spec: ServiceSpec,
    platform: str = sys.platform,
    home: Path | None = None,
    uid: int | None = None,
) -> ServicePlan:
    home = home if home is not None else Path.home()
    uid = uid if uid is not None else os.getuid()
    dirs = (spec.state_dir, spec.logs_dir, spec.models_dir)
    chown = spec.user if spec.scope == "system" else None
    if platform.startswith("linux"):
        path = systemd_unit_path(spec.scope, home)
        ctl = _systemctl(spec.scope)
        commands = [
            Command((*ctl, "daemon-reload")),
            Command((*ctl, "enable", SERVICE_NAME)),
            # restart, not start: a reinstall after copying a new flock.pyz runs the new one.
            Command((*ctl, "restart", SERVICE_NAME)),
        ]
        if spec.scope == "user":  # start at boot, not at the user's first login
            commands.insert(0, Command(("loginctl", "enable-linger", _user_name(uid)), True))
        return ServicePlan(dirs, ((path, render_systemd_unit(spec)),), (), tuple(commands), chown)
    if platform == "darwin":
        path = launchd_plist_path(spec.scope, home)
        domain = _launchd_domain(spec.scope, uid)
        target = f"{domain}/{LAUNCHD_LABEL}"
        commands = [
            Command(("launchctl", "bootout", target), may_fail=True),  # a loaded older version
            Command(("launchctl", "enable", target)),
            Command(("launchctl", "bootstrap", domain, str(path))),
        ]
        return ServicePlan(dirs, ((path, render_launchd_plist(spec)),), (), tuple(commands), chown)
    raise ServiceError(f"no service manager support for platform {platform!r}")


def plan_uninstall(
    scope: Scope, platform: str = sys.platform, home: Path | None = None, uid: int | None = None
) -> ServicePlan:
    home = home if home is not None else Path.home()
    uid = uid if uid is not None else os.getuid()
    if platform.startswith("linux"):
        ctl = _systemctl(scope)
        return ServicePlan(
            remove=(systemd_unit_path(scope, home),),
            commands=(
                Command((*ctl, "disable", "--now", SERVICE_NAME), may_fail=True),
                Command((*ctl, "daemon-reload")),
            ),
        )
    if platform == "darwin":
        target = f"{_launchd_domain(scope, uid)}/{LAUNCHD_LABEL}"
        return ServicePlan(
            remove=(launchd_plist_path(scope, home),),
            commands=(Command(("launchctl", "bootout", target), may_fail=True),),
        )
    raise ServiceError(f"no service manager support for platform {platform!r}")


def status_command(scope: Scope, platform: str = sys.platform, uid: int | None = None) -> Command:
    uid = uid if uid is not None else os.getuid()
    if platform.startswith("linux"):
        return Command((*_systemctl(scope), "status", "--no-pager", SERVICE_NAME), may_fail=True)
    if platform == "darwin":
        target = f"{_launchd_domain(scope, uid)}/{LAUNCHD_LABEL}"
        return Command(("launchctl", "print", target), may_fail=True)
    raise ServiceError(f"no service manager support for platform {platform!r}")


Runner = Callable[[Sequence[str]], int]
Echo = Callable[[str], None]


def _run(argv: Sequence[str]) -> int:
    try:
        return subprocess.run(list(argv), check=False).returncode
    except FileNotFoundError as e:
        raise ServiceError(f"{argv[0]} not found: is this system managed by it?") from e


def apply_plan(plan: ServicePlan, *, dry_run: bool, run: Runner = _run, echo: Echo = print) -> None:
    """Carry out a plan; with dry_run, print what would be written and run, and change nothing."""
    for directory in plan.directories:
        if dry_run:
            echo(f"would create directory {directory}")
        elif not directory.exists():
            directory.mkdir(parents=True)
            if plan.chown:
                shutil.chown(directory, plan.chown)
    for path, text in plan.files:
        if dry_run:
            echo(f"would write {path}:\n{text}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # a half-written unit must never be what the manager reads
    for path in plan.remove:
        if dry_run:
            echo(f"would remove {path}")
        else:
            path.unlink(missing_ok=True)
    for command in plan.commands:
        if dry_run:
            echo(f"would run: {' '.join(command.argv)}")
            continue
        rc = run(command.argv)
        if rc != 0 and not command.may_fail:
            raise ServiceError(f"`{' '.join(command.argv)}` failed with exit status {rc}")


def service_install(
    spec: ServiceSpec,
    *,
    dry_run: bool,
    platform: str = sys.platform,
    run: Runner = _run,
    echo: Echo = print,
    home: Path | None = None,
) -> ServicePlan:
    """Write the unit/plist, then enable and (re)start the service. Returns what it did."""
    if spec.scope == "system" and not dry_run and os.geteuid() != 0:
        raise ServiceError("installing a system service needs root (sudo)")
    plan = plan_install(spec, platform, home)
    apply_plan(plan, dry_run=dry_run, run=run, echo=echo)
    return plan


def service_uninstall(
    scope: Scope,
    *,
    dry_run: bool,
    platform: str = sys.platform,
    run: Runner = _run,
    echo: Echo = print,
    home: Path | None = None,
) -> ServicePlan:
    """Stop and disable the service and remove its unit/plist (state and models stay)."""
    plan = plan_uninstall(scope, platform, home)
    apply_plan(plan, dry_run=dry_run, run=run, echo=echo)
    return plan


def service_status(scope: Scope, *, platform: str = sys.platform, run: Runner = _run) -> int:
    """Show the service manager's view of flock; returns that command's exit status."""
    return run(status_command(scope, platform).argv)


def _systemctl(scope: Scope) -> tuple[str, ...]:
    return ("systemctl",) if scope == "system" else ("systemctl", "--user")


def _user_name(uid: int) -> str:
    return pwd.getpwuid(uid).pw_name


# -- Prometheus file_sd ------------------------------------------------------------------------


@dataclass(frozen=True)
class ScrapeTarget:
    """One node as Prometheus should scrape it."""

    node_id: str
    host: str
    port: int = DEFAULT_PORT


def prometheus_targets(
    nodes: Iterable[ScrapeTarget], cluster: str | None = None
) -> list[dict[str, object]]:
    """file_sd groups, one per node, so each node's series carry its id as the `node` label."""
    groups: list[dict[str, object]] = []
    for node in sorted(nodes, key=lambda n: n.node_id):
        host = f"[{node.host}]" if ":" in node.host and not node.host.startswith("[") else node.host
        labels = {"node": node.node_id}
        if cluster:
            labels["cluster"] = cluster
        groups.append({"targets": [f"{host}:{node.port}"], "labels": labels})
    return groups


def write_prometheus_targets(path: Path, groups: list[dict[str, object]]) -> None:
    """Write file_sd JSON atomically: Prometheus re-reads the file whenever it changes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(groups, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


# -- examples under deploy/ --------------------------------------------------------------------

EXAMPLE_LINUX = ServiceSpec(
    zipapp=Path("/opt/flock/flock.pyz"),
    state_dir=Path("/var/lib/flock"),
    models_dir=Path("/var/lib/flock/models"),
    python=Path("/usr/bin/python3"),
    scope="system",
    user="flock",
)
EXAMPLE_MAC = ServiceSpec(
    zipapp=Path("/Users/you/flock/flock.pyz"),
    state_dir=Path("/Users/you/.flock"),
    models_dir=Path("/Users/you/.cache/flock/models"),
    python=Path("/opt/homebrew/bin/python3"),
    scope="user",
)


def example_files() -> dict[Path, str]:
    """deploy/ paths (relative) and their contents, rendered from the example specs."""
    return {
        Path("systemd/flock.service"): render_systemd_unit(EXAMPLE_LINUX),
        Path("launchd/com.flock.agent.plist"): render_launchd_plist(EXAMPLE_MAC),
    }


def write_examples(deploy_dir: Path) -> None:
    for relative, text in example_files().items():
        target = deploy_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
