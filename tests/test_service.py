"""agent.service: units systemd accepts, plists launchd needs, install plans, file_sd targets."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.service import (
    LAUNCHD_LABEL,
    ScrapeTarget,
    ServiceError,
    ServiceSpec,
    launchd_plist,
    plan_install,
    plan_uninstall,
    prometheus_targets,
    render_launchd_plist,
    render_systemd_unit,
    service_install,
    service_status,
    service_uninstall,
    status_command,
    write_prometheus_targets,
)


def make_spec(tmp_path: Path, **changes: object) -> ServiceSpec:
    zipapp = tmp_path / "opt" / "flock.pyz"
    zipapp.parent.mkdir(parents=True, exist_ok=True)
    zipapp.write_bytes(b"PK")  # systemd-analyze checks ExecStart's program exists
    fields: dict[str, object] = {
        "zipapp": zipapp,
        "state_dir": tmp_path / "state",
        "models_dir": tmp_path / "models",
        "python": Path(sys.executable),
    }
    fields.update(changes)
    return ServiceSpec(**fields)  # type: ignore[arg-type]


def unit_settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


# -- systemd -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["user", "system"])
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path, scope: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    spec = make_spec(
        tmp_path,
        scope=scope,
        user="root" if scope == "system" else None,
        state_dir=tmp_path / "state dir",  # a space, to exercise quoting
        run_args=("--port", "52415", "--api-key", "s3cr%t$x"),
    )
    unit = tmp_path / "flock.service"
    unit.write_text(render_systemd_unit(spec), encoding="utf-8")
    runtime = tmp_path / "xdg-runtime"  # a user manager needs a runtime dir, even offline
    runtime.mkdir(mode=0o700)
    command = [analyze, *(["--user"] if scope == "user" else []), "verify", str(unit)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        timeout=60,
    )
    # verify exits 0 even for unknown keys and unparsable values; it only says so on stderr.
    complaints = [line for line in result.stderr.splitlines() if str(unit) in line]
    assert result.returncode == 0, result.stderr
    assert complaints == []


def test_system_unit_is_hardened_without_breaking_mlx(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, scope="system", user="flock")
    settings = unit_settings(render_systemd_unit(spec))
    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartSec"] == ["5"]
    assert settings["User"] == ["flock"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["PrivateTmp"] == ["yes"]
    assert settings["LimitMEMLOCK"] == ["infinity"]
    assert settings["ReadWritePaths"] == [f"{tmp_path}/state {tmp_path}/models"]
    assert settings["WantedBy"] == ["multi-user.target"]
    # MLX compiles and loads kernels at run time and reaches GPUs through /dev.
    assert "MemoryDenyWriteExecute" not in settings
    assert "PrivateDevices" not in settings
    assert f"FLOCK_STATE_DIR={tmp_path}/state" in settings["Environment"]
    assert settings["ExecStart"] == [f"{sys.executable} {tmp_path}/opt/flock.pyz run"]


def test_user_unit_leaves_out_what_needs_privileges(tmp_path: Path) -> None:
    settings = unit_settings(render_systemd_unit(make_spec(tmp_path)))
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["WantedBy"] == ["default.target"]
    for key in ("User", "ProtectSystem", "PrivateTmp", "LimitMEMLOCK", "After"):
        assert key not in settings


def test_unit_quotes_spaces_specifiers_and_dollars(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, state_dir=Path("/srv/my state"), run_args=("--api-key", "a%b$c d"))
    settings = unit_settings(render_systemd_unit(spec))
    assert settings["ExecStart"][0].endswith(' run --api-key "a%%b$$c d"')
    assert '"FLOCK_STATE_DIR=/srv/my state"' in settings["Environment"]
    assert settings["WorkingDirectory"] == ["/srv/my state"]


def test_system_scope_needs_a_user(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="user"):
        render_systemd_unit(make_spec(tmp_path, scope="system"))
    with pytest.raises(ServiceError, match="user"):
        launchd_plist(make_spec(tmp_path, scope="system"))


# -- launchd -----------------------------------------------------------------------------------


def test_plist_parses_and_carries_the_keys_launchd_needs(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, environment={"FLOCK_LOG_FORMAT": "json"})
    job = plistlib.loads(render_launchd_plist(spec).encode())
    assert job["Label"] == LAUNCHD_LABEL
    assert job["ProgramArguments"] == [
        "/usr/bin/caffeinate", "-is", sys.executable, str(spec.zipapp), "run",
    ]  # fmt: skip
    assert job["KeepAlive"] == {"SuccessfulExit": False}  # crash: restart; clean stop: stay down
    assert job["RunAtLoad"] is True
    assert job["ProcessType"] == "Interactive"
    assert job["StandardOutPath"] == f"{tmp_path}/state/logs/launchd.out.log"
    assert job["StandardErrorPath"] == f"{tmp_path}/state/logs/launchd.err.log"
    assert job["EnvironmentVariables"]["FLOCK_STATE_DIR"] == f"{tmp_path}/state"
    assert job["EnvironmentVariables"]["FLOCK_LOG_FORMAT"] == "json"
    assert "UserName" not in job


def test_plist_for_a_daemon_names_its_user_and_can_skip_caffeinate(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, scope="system", user="ai", keep_awake=False)
    job = plistlib.loads(render_launchd_plist(spec).encode())
    assert job["UserName"] == "ai"
    assert job["ProgramArguments"][0] == sys.executable


# -- install / uninstall / status --------------------------------------------------------------


class Recorder:
    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail = fail or {}

    def __call__(self, argv: Sequence[str]) -> int:
        self.calls.append(tuple(argv))
        return next((rc for word, rc in self.fail.items() if word in argv), 0)


def test_dry_run_prints_everything_and_changes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spec = make_spec(tmp_path)
    run, printed = Recorder(), []
    plan = service_install(
        spec, dry_run=True, platform="linux", run=run, echo=printed.append, home=home
    )
    assert run.calls == []
    assert not home.exists() and not spec.state_dir.exists()
    text = "\n".join(printed)
    unit_path = home / ".config/systemd/user/flock.service"
    assert f"would write {unit_path}:" in text
    assert "ExecStart=" in text
    assert "would run: systemctl --user enable flock.service" in text
    assert plan.files[0][0] == unit_path


def test_linux_user_install_writes_the_unit_and_starts_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spec = make_spec(tmp_path)
    run = Recorder(fail={"enable-linger": 1})  # no polkit: the service still installs
    service_install(spec, dry_run=False, platform="linux", run=run, echo=print, home=home)
    unit = home / ".config/systemd/user/flock.service"
    assert unit.read_text(encoding="utf-8") == render_systemd_unit(spec)
    assert spec.logs_dir.is_dir() and spec.models_dir.is_dir()
    assert run.calls[0][:2] == ("loginctl", "enable-linger")
    assert run.calls[1:] == [
        ("systemctl", "--user", "daemon-reload"),
        ("systemctl", "--user", "enable", "flock.service"),
        ("systemctl", "--user", "restart", "flock.service"),
    ]
    assert not list(unit.parent.glob("*.tmp"))


def test_a_failing_required_step_raises(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="restart"):
        service_install(
            make_spec(tmp_path), dry_run=False, platform="linux",
            run=Recorder(fail={"restart": 3}), echo=print, home=tmp_path / "home",
        )  # fmt: skip


def test_system_install_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ServiceError, match="root"):
        service_install(make_spec(tmp_path, scope="system", user="x"), dry_run=False)


def test_linux_uninstall_disables_and_removes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    service_install(make_spec(tmp_path), dry_run=False, platform="linux", run=Recorder(),
                    echo=print, home=home)  # fmt: skip
    run = Recorder(fail={"disable": 1})  # already stopped: fine
    service_uninstall("user", dry_run=False, platform="linux", run=run, echo=print, home=home)
    assert not (home / ".config/systemd/user/flock.service").exists()
    assert run.calls[-1] == ("systemctl", "--user", "daemon-reload")
    assert (tmp_path / "state").is_dir()  # state and models stay


def test_macos_agent_plan_bootstraps_into_the_gui_domain(tmp_path: Path) -> None:
    home = tmp_path / "home"
    plan = plan_install(make_spec(tmp_path), platform="darwin", home=home, uid=501)
    path, text = plan.files[0]
    assert path == home / "Library/LaunchAgents/com.flock.agent.plist"
    plistlib.loads(text.encode())
    argv = [c.argv for c in plan.commands]
    assert argv == [
        ("launchctl", "bootout", "gui/501/com.flock.agent"),
        ("launchctl", "enable", "gui/501/com.flock.agent"),
        ("launchctl", "bootstrap", "gui/501", str(path)),
    ]
    assert plan.commands[0].may_fail and not plan.commands[2].may_fail


def test_macos_daemon_goes_to_library_launchdaemons(tmp_path: Path) -> None:
    plan = plan_install(make_spec(tmp_path, scope="system", user="ai"), platform="darwin", uid=0)
    assert plan.files[0][0] == Path("/Library/LaunchDaemons/com.flock.agent.plist")
    assert plan.commands[-1].argv[:3] == ("launchctl", "bootstrap", "system")
    assert plan.chown == "ai"
    uninstall = plan_uninstall("system", platform="darwin", uid=0)
    assert uninstall.commands[0].argv == ("launchctl", "bootout", "system/com.flock.agent")


def test_status_asks_the_service_manager(tmp_path: Path) -> None:
    assert status_command("user", "linux").argv == (
        "systemctl", "--user", "status", "--no-pager", "flock.service",
    )  # fmt: skip
    assert status_command("user", "darwin", uid=501).argv == (
        "launchctl", "print", "gui/501/com.flock.agent",
    )  # fmt: skip
    run = Recorder(fail={"status": 3})
    assert service_status("system", platform="linux", run=run) == 3


def test_unknown_platform_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="win32"):
        plan_install(make_spec(tmp_path), platform="win32")


# -- Prometheus file_sd ------------------------------------------------------------------------


def test_prometheus_targets_one_group_per_node(tmp_path: Path) -> None:
    groups = prometheus_targets(
        [ScrapeTarget("node-b", "fe80::1", 52415), ScrapeTarget("node-a", "10.0.0.5")],
        cluster="home",
    )
    assert groups == [
        {"targets": ["10.0.0.5:52415"], "labels": {"node": "node-a", "cluster": "home"}},
        {"targets": ["[fe80::1]:52415"], "labels": {"node": "node-b", "cluster": "home"}},
    ]
    path = tmp_path / "prom" / "targets.json"
    write_prometheus_targets(path, groups)
    assert json.loads(path.read_text(encoding="utf-8")) == groups
    assert prometheus_targets([ScrapeTarget("a", "h", 1)]) == [
        {"targets": ["h:1"], "labels": {"node": "a"}}
    ]


def test_target_labels_are_valid_prometheus_label_names() -> None:
    for group in prometheus_targets([ScrapeTarget("a", "h")], cluster="c"):
        for name in group["labels"]:  # type: ignore[attr-defined]
            assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name) and not name.startswith("__")
