"""The per-platform zipapps: the builder's parts, the interpreter check, and the real archives.

The slow tests build both zipapps with `python -m deploy.zipapp` (wheels cached under
~/.cache/flock-dist-wheels, or $FLOCK_DIST_CACHE) and run the Linux one the way a user does: a
plain python3 outside any venv, an empty environment, a fresh HOME, another working directory.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from agent import __version__, bootstrap
from deploy import wheels, zipapp
from deploy.layout import install_wheel, plan_layout
from deploy.wheels import Wheel

REPO = Path(__file__).resolve().parents[1]
PYENV = Path("/root/.pyenv/versions")
# Interpreters too old for flock that may be lying around (a Mac's /usr/bin/python3 is 3.9).
OLD_PYTHONS = [
    path for path in (sorted(PYENV.glob("[23].*/bin/python")) if PYENV.is_dir() else [])
    if tuple(int(part) for part in path.parts[-3].split(".")[:2]) < (3, 11)
]


def _system_python3() -> str:
    """A python3 that is no venv's: what a user has."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(candidate).exists():
            found = subprocess.run([candidate, "-c", "import sys; print(sys.prefix == "
                                    "sys.base_prefix and sys.version_info >= (3, 11))"],
                                   capture_output=True, text=True, check=False)
            if found.stdout.strip() == "True":
                return candidate
    pytest.skip("no system python3 >= 3.11 outside a venv")


THIS_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
LINUX_X86 = sys.platform == "linux" and platform.machine() == "x86_64"
LINUX_BUILD = {"version": "0.1.0", "target": "linux-x86_64", "sys_platform": "linux",
               "machine": "x86_64", "pythons": ["3.11", "3.12", "3.13"],
               "file": "flock-0.1.0-linux-x86_64.pyz"}
MAC_BUILD = {**LINUX_BUILD, "target": "macos-arm64", "sys_platform": "darwin", "machine": "arm64",
             "file": "flock-0.1.0-macos-arm64.pyz"}
# A build for this very machine and the Python running the tests.
HOST_BUILD = {**LINUX_BUILD, "sys_platform": sys.platform, "pythons": [THIS_PYTHON],
              "machine": bootstrap._MACHINES.get(platform.machine().lower(),
                                                 platform.machine().lower())}


# -- the interpreter check (agent/bootstrap.py as the archive's __main__) ------------------------


def test_old_python_on_a_mac_gets_one_line_of_advice() -> None:
    line = bootstrap.preflight_problem(MAC_BUILD, (3, 9, 6, "final", 0), "CPython", "darwin",
                                       "arm64", ["flock.pyz", "run"])
    assert "\n" not in line
    assert "3.9.6" in line and "3.11, 3.12 or 3.13" in line
    assert "brew install python@3.13" in line and "uv python install 3.13" in line
    assert line.endswith("run: python3.13 flock.pyz run")


def test_interpreter_check_cases() -> None:
    def problem(build: dict[str, object], version: tuple[int, ...], impl: str = "CPython",
                system: str = "linux", machine: str = "x86_64") -> str:
        return bootstrap.preflight_problem(build, version, impl, system, machine,
                                           ["/x/flock.pyz", "version"])

    for ok in [(3, 11, 2), (3, 12, 1), (3, 13, 0)]:
        assert problem(LINUX_BUILD, ok) == ""
    assert problem(LINUX_BUILD, (3, 11, 2), machine="AMD64") == ""
    assert problem(MAC_BUILD, (3, 12, 0), system="darwin", machine="arm64") == ""
    # No compiled parts for a newer CPython either, nor for PyPy.
    assert "3.14.0" in problem(LINUX_BUILD, (3, 14, 0))
    assert "PyPy 3.11.0" in problem(LINUX_BUILD, (3, 11, 0), impl="PyPy")
    # Python 2 calls Linux "linux2": it is told about its version, not about the platform.
    assert "needs CPython" in problem(LINUX_BUILD, (2, 7, 18), system="linux2")
    wrong = problem(MAC_BUILD, (3, 12, 0))
    assert "macOS arm64 build" in wrong and "flock-0.1.0-linux-x86_64.pyz" in wrong
    assert "Rosetta" in problem(MAC_BUILD, (3, 12, 0), system="darwin", machine="x86_64")
    assert "builds for" in problem(LINUX_BUILD, (3, 12, 0), machine="aarch64")


def test_bootstrap_knows_the_builds_dist_makes() -> None:
    assert {(t.sys_platform, t.machine): name for name, t in wheels.TARGETS.items()} == \
        bootstrap._BUILDS


def _mini_zipapp(tmp_path: Path, build: dict[str, object]) -> Path:
    """An archive with the real __main__.py and a stand-in for shiv's _bootstrap."""
    archive = tmp_path / "flock.pyz"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("__main__.py", zipapp.main_py(build))
        zf.writestr("_bootstrap/__init__.py", "def bootstrap():\n    print('handed over')\n")
    return archive


@pytest.mark.skipif(not OLD_PYTHONS, reason="no Python older than 3.11 here")
@pytest.mark.parametrize("python", OLD_PYTHONS, ids=lambda p: p.parts[-3])
def test_main_py_parses_and_advises_on_old_pythons(tmp_path: Path, python: Path) -> None:
    archive = _mini_zipapp(tmp_path, {**HOST_BUILD, "pythons": ["3.11", "3.12", "3.13"]})
    done = subprocess.run([str(python), str(archive), "run"], capture_output=True, text=True,
                          check=False, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "needs CPython 3.11" in done.stderr


def test_main_py_hands_over_to_shiv_on_a_good_python(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(_mini_zipapp(tmp_path, HOST_BUILD))],
                          capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (0, "handed over\n"), done.stderr


def test_entry_point_puts_the_per_version_directory_first_for_children_too(tmp_path: Path) -> None:
    """main() in an extracted tree: this CPython's _flock_cpXY on sys.path and on PYTHONPATH."""
    site = tmp_path / "site-packages"
    (site / "agent").mkdir(parents=True)
    shutil.copy2(REPO / "agent" / "__init__.py", site / "agent")
    shutil.copy2(REPO / "agent" / "bootstrap.py", site / "agent")
    # A stand-in CLI: imports a module only the per-version directory has, then a child does.
    (site / "agent" / "cli.py").write_text(
        "import subprocess, sys\n"
        "def main(argv=None):\n"
        "    import probe\n"
        "    child = subprocess.run([sys.executable, '-c', 'import probe; print(probe.WHERE)'],\n"
        "                           cwd='/', capture_output=True, text=True)\n"
        "    print(probe.WHERE, child.stdout.strip(), child.returncode)\n"
        "    return 0\n")
    compiled = site / bootstrap.compiled_dir_name(sys.version_info)
    compiled.mkdir()
    (compiled / "probe.py").write_text(f"WHERE = {compiled.name!r}\n")
    (site / bootstrap.BUILD_INFO).write_text(json.dumps(HOST_BUILD))
    done = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                           "from agent.bootstrap import main; sys.exit(main())", str(site)],
                          capture_output=True, text=True, check=False,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": "/elsewhere"})
    assert done.stdout.split() == [compiled.name, compiled.name, "0"], done.stderr


# -- resolution and layout ----------------------------------------------------------------------


def _wheel(name: str, version: str, *requires: str, tag: str = "py3-none-any") -> Wheel:
    return Wheel(name=name, version=version, filename=f"{name}-{version}-{tag}.whl", url="",
                 sha256=None, requires=requires)


def test_closure_follows_the_target_markers_not_the_build_machine() -> None:
    found = {
        "mlx": _wheel("mlx", "0.32.4", 'mlx-metal==0.32.4; platform_system == "Darwin"',
                      'mlx-cpu==0.32.4; platform_system == "Linux" and extra == "cpu"'),
        "mlx-cpu": _wheel("mlx-cpu", "0.32.4"),
        "uvloop": _wheel("uvloop", "1.0"),  # the build machine's resolution had it: not needed
    }
    mac = wheels.TARGETS["macos-arm64"].markers("3.12")
    needed, missing = wheels.closure([Requirement("mlx>=0.32")], found, mac)
    assert needed == {"mlx"} and [str(r) for r in missing] == [
        'mlx-metal==0.32.4; platform_system == "Darwin"']
    linux = wheels.TARGETS["linux-x86_64"].markers("3.12")
    needed, missing = wheels.closure([Requirement("mlx[cpu]>=0.32")], found, linux)
    assert needed == {"mlx", "mlx-cpu"} and missing == []
    with pytest.raises(wheels.DistError, match=r"mlx 0\.32\.4"):
        wheels.closure([Requirement("mlx>=1")], found, linux)


def _make_wheel(directory: Path, name: str, version: str, tag: str,
                files: dict[str, str]) -> Path:
    path = directory / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
        info = f"{name}-{version}.dist-info"
        zf.writestr(f"{info}/METADATA", f"Name: {name}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nTag: {tag}\n")
        zf.writestr(f"{info}/RECORD", "".join(f"{m},,\n" for m in files))
    return path


def test_layout_shares_merges_and_splits(tmp_path: Path) -> None:
    pys = ["3.11", "3.12"]
    resolved: dict[str, dict[str, Wheel]] = {py: {} for py in pys}
    files: dict[str, Path] = {}

    def add(py: str, name: str, version: str, tag: str, members: dict[str, str]) -> None:
        path = _make_wheel(tmp_path, name, version, tag, members)
        files[path.name] = path
        resolved[py][name] = Wheel(name, version, path.name, "", None, ())

    for py in pys:
        nodot = py.replace(".", "")
        add(py, "pure", "1.0", "py3-none-any", {"pure/__init__.py": ""})
        # Tagged extensions side by side; their py3-none binary sibling stays shared with them.
        add(py, "ext", "2.0", f"cp{nodot}-cp{nodot}-linux_x86_64",
            {"ext/__init__.py": "", f"ext/core.cpython-{nodot}-x86_64-linux-gnu.so": py})
        add(py, "ext-lib", "2.0", "py3-none-linux_x86_64", {"ext/lib/libext.so": "lib"})
        # Different releases per CPython: one directory each, and its binary sibling follows.
        add(py, "num", "1.0" if py == "3.11" else "1.1", f"cp{nodot}-cp{nodot}-linux_x86_64",
            {"num/__init__.py": py, f"num/_m.cpython-{nodot}-x86_64-linux-gnu.so": py})
        add(py, "num-lib", "1.0", "py3-none-linux_x86_64", {"num/libs/x.so": "x"})
        # Same release, a plain .py that differs: cannot share a directory.
        add(py, "odd", "3.0", f"cp{nodot}-cp{nodot}-linux_x86_64", {"odd.py": py})
    layout = plan_layout(resolved, files)
    owner = {files[w.filename]: w.name for by_name in resolved.values() for w in by_name.values()}
    assert sorted(owner[group[0]] for group in layout.shared) == ["ext", "ext-lib", "pure"]
    assert [len(group) for group in layout.shared] == [2, 1, 1]  # ext's two builds merge
    for py in pys:
        assert sorted(owner[p] for p in layout.per_python[py]) == ["num", "num-lib", "odd"]
    site = tmp_path / "site"
    for group in layout.shared:
        for wheel in group:
            install_wheel(wheel, site)
    assert sorted(p.name for p in (site / "ext").glob("core.*.so")) == [
        "core.cpython-311-x86_64-linux-gnu.so", "core.cpython-312-x86_64-linux-gnu.so"]
    assert (site / "ext/lib/libext.so").is_file()
    wheel_file = (site / "ext-2.0.dist-info" / "WHEEL").read_text()
    assert "Tag: cp311-cp311-linux_x86_64" in wheel_file
    assert "Tag: cp312-cp312-linux_x86_64" in wheel_file


def test_unpacking_skips_scripts_and_pruned_files(tmp_path: Path) -> None:
    wheel = _make_wheel(tmp_path, "mlx", "1.0", "py3-none-any", {
        "mlx/__init__.py": "", "mlx/include/mlx.h": "", "mlx/core/__init__.pyi": "",
        "mlx/__pycache__/x.cpython-311.pyc": "", "mlx-1.0.data/scripts/mlx.launch": "",
        "mlx-1.0.data/platlib/mlx_extra.py": ""})
    install_wheel(wheel, tmp_path / "site")
    got = sorted(p.relative_to(tmp_path / "site").as_posix()
                 for p in (tmp_path / "site").rglob("*") if p.is_file())
    assert got == ["mlx-1.0.dist-info/METADATA", "mlx-1.0.dist-info/RECORD",
                   "mlx-1.0.dist-info/WHEEL", "mlx/__init__.py", "mlx_extra.py"]


def test_required_imports_ignores_guarded_ones() -> None:
    source = (
        "import os, mlx.core as mx\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import typed_only\nelse:\n    import at_runtime\n"
        "try:\n    import optional\nexcept ImportError:\n    import fallback\n"
        "else:\n    import after_optional\n"
        "def f():\n    from lazy.sub import x\n    from . import relative\n"
    )
    assert zipapp.required_imports(source) == {
        "os", "mlx", "typing", "at_runtime", "fallback", "after_optional", "lazy"}


def _declared_closure() -> set[str]:
    """Distributions pyproject's dependencies pull in, as installed here (host markers)."""
    seen: set[tuple[str, str]] = set()
    stack = [(Requirement(r), "") for r in wheels.project_requirements()]
    names: set[str] = set()
    while stack:
        req, via_extra = stack.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": via_extra}):
            continue
        name = canonicalize_name(req.name)
        for extra in {"", *req.extras}:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            names.add(name)
            try:
                requires = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue
            stack.extend((Requirement(r), extra) for r in requires)
    return names


def test_every_module_agent_imports_comes_with_a_declared_dependency() -> None:
    """The zipapp carries pyproject's dependencies only: a module agent/ imports that none of
    them provides works in a dev venv and fails in the zipapp (where the build refuses it)."""
    closure = _declared_closure()
    owners = metadata.packages_distributions()
    undeclared: dict[str, list[str]] = {}
    for path in sorted((REPO / "agent").rglob("*.py")):
        for module in zipapp.required_imports(path.read_text()):
            if module in sys.stdlib_module_names or module in zipapp.PROVIDED_ELSEWHERE:
                continue
            if not {canonicalize_name(d) for d in owners.get(module, [])} & closure:
                undeclared.setdefault(module, []).append(path.relative_to(REPO).as_posix())
    assert not undeclared, f"add to pyproject.toml [project].dependencies: {undeclared}"


# -- the real zipapps -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zipapps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both zipapps, built as `make dist` builds them (about 3 minutes with a warm wheel cache)."""
    out = tmp_path_factory.mktemp("dist")
    # FLOCK_DIST_TEST_WITH: requirements to add while trying a dependency not yet in pyproject.
    extra = [f"--with={req}" for req in os.environ.get("FLOCK_DIST_TEST_WITH", "").split()]
    # The Linux build needs the BLAS shim, prebuilt or compiled here (Linux x86_64 only).
    targets = [t for t in wheels.TARGETS if t != "linux-x86_64" or LINUX_X86 or (
        REPO / "agent/runtime/native/libflockblas-linux-x86_64.so").is_file()]
    done = subprocess.run([sys.executable, "-m", "deploy.zipapp", "--out", str(out), *extra,
                           *(f"--target={t}" for t in targets)],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    built = {t: out / f"flock-{__version__}-{t}.pyz" for t in targets}
    for path in built.values():
        assert path.is_file(), done.stdout
    return built


def _clean_env(home: Path, bin_dir: Path) -> dict[str, str]:
    # PATH holds python3 and nothing else: no compiler, no venv. Discovery is off: a one-node
    # test must not join the other agents tests run on this host.
    return {"PATH": str(bin_dir), "HOME": str(home), "LANG": "C.UTF-8",
            "FLOCK_DISCOVERY_ENABLED": "false"}


@pytest.fixture
def user_machine(tmp_path: Path, zipapps: dict[str, Path]) -> dict[str, Path]:
    """A copied Linux zipapp, a HOME, a working directory and a PATH with only python3."""
    if not LINUX_X86:
        pytest.skip("runs the Linux x86_64 zipapp")
    home, cwd, bin_dir = tmp_path / "home", tmp_path / "elsewhere", tmp_path / "bin"
    for directory in (home, cwd, bin_dir):
        directory.mkdir()
    (bin_dir / "python3").symlink_to(_system_python3())
    pyz = tmp_path / "flock.pyz"
    shutil.copy2(zipapps["linux-x86_64"], pyz)
    return {"pyz": pyz, "home": home, "cwd": cwd, "bin": bin_dir}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(method: str, url: str, body: dict[str, object] | None = None
          ) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def _runner_environments(pid: int) -> list[dict[str, str]]:
    """The environments of a process's children (its runners), from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    envs = []
    for child in children:
        raw = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        envs.append(dict(item.decode().split("=", 1) for item in raw if b"=" in item))
    return envs


def _shipped_kernels(pyz: Path) -> list[str]:
    """The attention kernels in the archive for the clean machine's python3: those `make
    native` built here for its CPython must be there (for other CPythons there are none, and
    runners fall back to MLX's attention with a warning)."""
    done = subprocess.run([_system_python3(), "-c", "import sys; print(*sys.version_info[:2], "
                           "sep='')"], capture_output=True, text=True, check=True)
    tag = f"-cp{done.stdout.strip()}-linux-"
    built = [p.name for p in (REPO / "agent/runtime/native").glob("_flockattn-*.so")
             if tag in p.name]
    with zipfile.ZipFile(pyz) as zf:
        shipped = [n.rpartition("/")[2] for n in zf.namelist()
                   if "/agent/runtime/native/_flockattn-" in n and tag in n]
    assert set(built) <= set(shipped), (built, shipped)
    return shipped


@pytest.mark.slow
def test_linux_zipapp_serves_from_a_clean_environment(user_machine: dict[str, Path],
                                                      tmp_path: Path) -> None:
    from tests.tiny_models import make_tiny_model

    env = _clean_env(user_machine["home"], user_machine["bin"])
    version = subprocess.run(["python3", str(user_machine["pyz"]), "version"],
                             cwd=user_machine["cwd"], env=env, capture_output=True, text=True,
                             check=False, timeout=300)
    assert version.returncode == 0, version.stderr
    rows = dict(line.split(None, 1) for line in version.stdout.splitlines())
    assert rows["flock:"] == __version__
    assert "OpenBLAS" in rows["blas:"], version.stdout  # the shipped shim: PATH has no compiler
    # The attention kernels `make native` built for this MLX and the clean machine's CPython
    # ship prebuilt too; runners must load them without a compiler (checked below).
    kernels = _shipped_kernels(user_machine["pyz"])
    if kernels:
        assert rows["kernels:"].startswith("flockattn"), version.stdout

    model = make_tiny_model(tmp_path / "tiny")
    port = _free_port()
    log = tmp_path / "agent.log"
    with log.open("w") as out:
        agent = subprocess.Popen(
            ["python3", str(user_machine["pyz"]), "run", "--port", str(port), "--host",
             "127.0.0.1", "--state-dir", str(tmp_path / "state"), "--models-dir",
             str(tmp_path / "models"), "--model", str(model)],
            cwd=user_machine["cwd"], env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert agent.poll() is None, log.read_text()
            try:
                if _http("GET", f"{base}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"the zipapp's agent did not become ready:\n{log.read_text()}")
        status, models = _http("GET", f"{base}/v1/models")
        assert status == 200
        name = models["data"][0]["id"]  # type: ignore[index]
        status, reply = _http("POST", f"{base}/v1/chat/completions", {
            "model": name, "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 8, "temperature": 0})
        assert status == 200, log.read_text()
        assert reply["usage"]["completion_tokens"] == 8  # type: ignore[index]
        assert isinstance(reply["choices"][0]["message"]["content"], str)  # type: ignore[index]
        # The runner runs from the extracted archive with the shipped shim preloaded.
        runners = [e for e in _runner_environments(agent.pid) if "LD_PRELOAD" in e]
        assert runners, "no runner child found"
        extracted = str(user_machine["home"] / ".shiv")
        assert runners[0]["LD_PRELOAD"].startswith(extracted)
        assert runners[0]["PYTHONPATH"].startswith(extracted)
        if kernels:
            assert runners[0]["FLOCK_KERNELS_LIB"].startswith(extracted)
            # The runner's Ready names what it loaded; the agent logs it with the runner.
            text = log.read_text()
            assert "attention: flockattn" in text and "kernels not loaded" not in text, text
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
    assert agent.returncode == 0, log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_linux_zipapp_runs_on_other_cpythons(user_machine: dict[str, Path], version: str) -> None:
    candidates = sorted(PYENV.glob(f"{version}.*/bin/python{version}")) if PYENV.is_dir() else []
    found = shutil.which(f"python{version}")
    python = str(candidates[-1]) if candidates else found
    if python is None:
        pytest.skip(f"no python{version} here")
    done = subprocess.run([python, str(user_machine["pyz"]), "version", "--json"],
                          cwd=user_machine["cwd"],
                          env=_clean_env(user_machine["home"], user_machine["bin"]),
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows["python"].startswith(version) and rows["mlx"] != "missing"
    assert "OpenBLAS" in rows["blas"]


@pytest.mark.slow
@pytest.mark.skipif(not OLD_PYTHONS, reason="no Python older than 3.11 here")
def test_linux_zipapp_tells_old_pythons_what_to_do(user_machine: dict[str, Path]) -> None:
    for python in OLD_PYTHONS:
        done = subprocess.run([str(python), str(user_machine["pyz"]), "run"],
                              cwd=user_machine["cwd"],
                              env=_clean_env(user_machine["home"], user_machine["bin"]),
                              capture_output=True, text=True, check=False, timeout=60)
        assert done.returncode == 2, (python, done.stderr)
        assert len(done.stderr.splitlines()) == 1, (python, done.stderr)
        assert "flock needs CPython 3.11, 3.12 or 3.13" in done.stderr
        assert done.stderr.strip().endswith("flock.pyz run")
    assert not (user_machine["home"] / ".shiv").exists()  # refused before extracting anything


@pytest.mark.slow
def test_macos_zipapp_carries_arm64_mlx_for_each_cpython(zipapps: dict[str, Path]) -> None:
    with zipfile.ZipFile(zipapps["macos-arm64"]) as zf:
        names = set(zf.namelist())
        main = zf.read("__main__.py").decode()
        build = json.loads(zf.read("site-packages/_flock_build.json"))
    site = "site-packages/"
    assert build["sys_platform"] == "darwin" and build["pythons"] == ["3.11", "3.12", "3.13"]
    assert 'BUILD = {"file": "flock-' in main and '"target": "macos-arm64"' in main
    for nodot in ("311", "312", "313"):
        tag = f"cpython-{nodot}-darwin.so"
        # mlx's extension and every other compiled dependency, for each CPython version
        for ext in (f"mlx/core.{tag}", f"pydantic_core/_pydantic_core.{tag}",
                    f"msgspec/_core.{tag}", f"netifaces.{tag}"):
            assert any(n.startswith(site) and n.endswith(ext) for n in names), ext
    # mlx-metal beside mlx's extension (it loads @rpath/libmlx.dylib from mlx/lib)
    assert {f"{site}mlx/lib/libmlx.dylib", f"{site}mlx/lib/mlx.metallib"} <= names
    assert not any(n.endswith(("-linux-gnu.so", ".pyc")) for n in names)
    assert not any("/torch/" in n or n.startswith(f"{site}agent/runtime/native/lib")
                   for n in names)


@pytest.mark.slow
def test_zipapps_stay_lean(zipapps: dict[str, Path]) -> None:
    for target, path in zipapps.items():
        size_mb = path.stat().st_size / 1e6
        assert size_mb < 140, f"{target}: {size_mb:.0f} MB"
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        assert not any("/__pycache__/" in n or n.endswith(".pyc") for n in names), target
        assert not any(n.startswith("site-packages/numpy/") and "/tests/" in n
                       for n in names), target
        assert not any(n.startswith(("site-packages/pytest", "site-packages/hypothesis",
                                     "site-packages/torch/", "site-packages/tests/"))
                       for n in names), target
    if "linux-x86_64" in zipapps:  # users need no compiler for the fast BLAS
        with zipfile.ZipFile(zipapps["linux-x86_64"]) as zf:
            names = zf.namelist()
        assert "site-packages/agent/runtime/native/libflockblas-linux-x86_64.so" in names
        assert any(n.startswith("site-packages/scipy_openblas32/lib/libscipy_openblas")
                   for n in names)
