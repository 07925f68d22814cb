"""Which wheels a zipapp carries and getting them: pip resolves the project's dependencies for a
target platform and CPython version (re-walked with the target's markers, see zipapp.py's steps
1-2), releases are unified across CPythons, and the files land verified in a wheel cache.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# packaging is in every flock environment (transformers and huggingface-hub depend on it).
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path("~/.cache/flock-dist-wheels")

Log = Callable[[str], None]


class DistError(RuntimeError):
    """The build cannot go on: a resolution, download or packing step failed."""


@dataclass(frozen=True)
class Target:
    """One zipapp: the platform it runs on and how pip and markers name that platform."""

    name: str  # in the file name: flock-VERSION-<name>.pyz
    sys_platform: str
    machine: str  # platform.machine() there
    platform_system: str
    pip_platforms: tuple[str, ...]  # pip --platform values, most preferred first

    def markers(self, python: str) -> dict[str, str]:
        """The PEP 508 marker environment of CPython `python` on this platform."""
        full = f"{python}.0"
        return {
            "implementation_name": "cpython",
            "implementation_version": full,
            "os_name": "posix",
            "platform_machine": self.machine,
            "platform_python_implementation": "CPython",
            "platform_release": "",
            "platform_system": self.platform_system,
            "platform_version": "",
            "python_full_version": full,
            "python_version": python,
            "sys_platform": self.sys_platform,
        }


# mlx's Linux wheels are manylinux_2_35 (glibc 2.35: Ubuntu 22.04, Debian 12, Fedora 36 and newer),
# so that is the floor anyway; pip does not expand manylinux_2_X to older tags by itself.
_MANYLINUX = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)),
    "manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64",
    "manylinux_2_5_x86_64", "manylinux1_x86_64",
)

TARGETS: dict[str, Target] = {
    "linux-x86_64": Target("linux-x86_64", "linux", "x86_64", "Linux", _MANYLINUX),
    # MLX ships macosx_14_0_arm64 wheels; pip expands this to every older macOS tag and universal2.
    "macos-arm64": Target("macos-arm64", "darwin", "arm64", "Darwin", ("macosx_14_0_arm64",)),
}


@dataclass(frozen=True)
class Wheel:
    """One wheel pip chose for one (platform, CPython) pair."""

    name: str  # as the project spells it
    version: str
    filename: str
    url: str
    sha256: str | None
    requires: tuple[str, ...]


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """[project].dependencies: what a flock install needs at run time (no test or dev extras)."""
    with pyproject.open("rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


def _requirement_text(req: Requirement) -> str:
    """The requirement without its marker (markers are decided here, for the target)."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras} @ {req.url}" if req.url else f"{req.name}{extras}{req.specifier}"


def _applies(req: Requirement, env: dict[str, str], extras: Iterable[str] = ("",)) -> bool:
    return req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras)


def closure(top: Sequence[Requirement], found: dict[str, Wheel], env: dict[str, str]
            ) -> tuple[set[str], list[Requirement]]:
    """The projects `top` needs on the target (by its markers), and the requirements that no found
    wheel meets.

    Raises DistError when a found version does not satisfy a requirement: the build machine's
    resolution cannot simply be re-walked then.
    """
    extras_done: dict[str, set[str]] = {}
    missing: list[Requirement] = []
    stack = [req for req in top if _applies(req, env)]
    while stack:
        req = stack.pop()
        name = canonicalize_name(req.name)
        wheel = found.get(name)
        if wheel is None:
            missing.append(req)
            continue
        if not req.specifier.contains(Version(wheel.version), prereleases=True):
            raise DistError(f"{wheel.name} {wheel.version} was resolved; the target needs {req}")
        done = extras_done.setdefault(name, set())
        new = ({""} | set(req.extras)) - done
        if not new:
            continue
        done |= new
        stack.extend(dep for dep in map(Requirement, wheel.requires) if _applies(dep, env, new))
    return set(extras_done), missing


def run_command(command: Sequence[str], what: str, *, cwd: Path | None = None) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True, check=False, cwd=cwd)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise DistError(f"{what} failed ({done.returncode}): {' '.join(command)}\n{tail}")
    return done.stdout


def _pip_target_flags(target: Target, python: str) -> list[str]:
    flags = ["--only-binary=:all:"]
    for tag in target.pip_platforms:
        flags += ["--platform", tag]
    nodot = python.replace(".", "")
    return [*flags, "--python-version", python, "--implementation", "cp", "--abi", f"cp{nodot}"]


def _pip_report(target: Target, python: str, requirements: Sequence[str], work: Path
                ) -> dict[str, Wheel]:
    # pip insists on a --target with --platform; nothing is written there (--dry-run).
    with tempfile.TemporaryDirectory(prefix="resolve-", dir=work) as scratch:
        report = Path(scratch) / "report.json"
        run_command([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
              "--quiet", "--disable-pip-version-check", "--report", str(report),
              *_pip_target_flags(target, python), "--target", str(Path(scratch) / "target"),
              *requirements], f"resolving for {target.name} CPython {python}")
        installs = json.loads(report.read_text())["install"]
    found: dict[str, Wheel] = {}
    for item in installs:
        meta = item["metadata"]
        info = item["download_info"]
        hashes = info.get("archive_info", {}).get("hashes", {})
        url = info["url"]
        found[canonicalize_name(meta["name"])] = Wheel(
            name=meta["name"], version=meta["version"], filename=url.rsplit("/", 1)[-1],
            url=url, sha256=hashes.get("sha256"), requires=tuple(meta.get("requires_dist") or ()))
    return found


def resolve(target: Target, python: str, requirements: Sequence[str], work: Path,
            prefer: Sequence[str] = ()) -> dict[str, Wheel]:
    """The wheels CPython `python` on `target` needs for `requirements`, by canonical name.

    prefer: exact pins to ask pip for as well (what another CPython got). Pins the target does
    not need fall out of the result; pins it cannot have make pip fail (DistError).
    """
    env = target.markers(python)
    top = [req for req in map(Requirement, requirements) if _applies(req, env)]
    asked = [_requirement_text(req) for req in top] + list(prefer)
    for _ in range(6):
        found = _pip_report(target, python, asked, work)
        needed, missing = closure(top, found, env)
        if not missing:
            return {name: found[name] for name in sorted(needed)}
        # pip skipped these by the build machine's markers: ask for them outright and re-resolve.
        asked += [_requirement_text(req) for req in missing]
    raise DistError(f"{target.name} CPython {python}: no stable resolution; still missing "
                    f"{', '.join(map(str, missing))}")


def unify_versions(target: Target, resolved: dict[str, dict[str, Wheel]],
                   requirements: Sequence[str], work: Path, log: Log) -> None:
    """Give every CPython the same release of a project where pip chose different ones.

    pip picks the newest release each CPython supports, so numpy can come out 2.4 for 3.11 and 2.5
    for 3.12. Pinning the oldest of those everywhere (when every CPython can have it) lets the
    builds share a directory instead of carrying one copy per version, and makes a node's
    numerics independent of which python3 it happens to run. `resolved` is updated in place.
    """
    pins: dict[str, list[str]] = {python: [] for python in resolved}  # added requirements
    impossible: set[tuple[str, str]] = set()  # stays one directory per version
    for _ in range(4):  # a pin can move other projects: settle within a few rounds
        changed = False
        for name, oldest in _divergent(resolved).items():
            if (name, oldest) in impossible:
                continue
            pin = f"{name}=={oldest}"
            for python, by_name in list(resolved.items()):
                if name not in by_name or by_name[name].version == oldest:
                    continue
                try:
                    again = resolve(target, python, [*requirements, *pins[python], pin], work)
                except DistError:
                    impossible.add((name, oldest))
                    continue
                log(f"  {target.name}: {pin} for CPython {python} as well (pip chose "
                    f"{by_name[name].version})")
                pins[python].append(pin)
                resolved[python] = again
                changed = True
        if not changed:
            return


def _divergent(resolved: dict[str, dict[str, Wheel]]) -> dict[str, str]:
    """Projects resolved to different releases for different CPythons, with the oldest release."""
    releases: dict[str, set[str]] = {}
    for by_name in resolved.values():
        for name, wheel in by_name.items():
            releases.setdefault(name, set()).add(wheel.version)
    return {name: min(versions, key=Version)
            for name, versions in sorted(releases.items()) if len(versions) > 1}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached(wheel: Wheel, cache: Path) -> bool:
    path = cache / wheel.filename
    return path.is_file() and (wheel.sha256 is None or _sha256(path) == wheel.sha256)


def fetch(target: Target, python: str, wheels: Iterable[Wheel], cache: Path, log: Log
          ) -> dict[str, Path]:
    """Every wheel as a verified file in the cache (pip downloads the ones not there yet)."""
    wheels = list(wheels)
    cache.mkdir(parents=True, exist_ok=True)
    todo = [w for w in wheels if not _cached(w, cache)]
    if todo:
        log(f"  downloading {len(todo)} wheels for {target.name} CPython {python}")
        for wheel in todo:
            (cache / wheel.filename).unlink(missing_ok=True)
        run_command([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
              "--disable-pip-version-check", "-d", str(cache),
              *_pip_target_flags(target, python), *[w.url for w in todo]],
             f"downloading wheels for {target.name} CPython {python}")
    bad = [w.filename for w in wheels if not _cached(w, cache)]
    if bad:
        raise DistError(f"missing or corrupt after download: {', '.join(bad)}")
    return {w.filename: cache / w.filename for w in wheels}


def resolve_target(target: Target, pythons: Sequence[str], requirements: Sequence[str],
                   work: Path, log: Log) -> dict[str, dict[str, Wheel]]:
    """What each CPython version needs on `target`, releases unified where possible."""
    # One after another: pip processes run side by side were no faster here (they queue on the
    # index and pip's HTTP cache).
    first, *later = pythons
    resolved = {first: resolve(target, first, requirements, work)}
    # Ask the later CPythons for the releases the first one got (mlx-metal included, which the
    # build machine's markers hide): usually one pip run each, where unify_versions would need
    # more. A CPython that cannot have them all resolves on its own.
    same = [f"{wheel.name}=={wheel.version}" for wheel in resolved[first].values()]
    for python in later:
        try:
            resolved[python] = resolve(target, python, requirements, work, prefer=same)
        except DistError:
            resolved[python] = resolve(target, python, requirements, work)
    unify_versions(target, resolved, requirements, work, log)
    log(f"  {len(set().union(*map(set, resolved.values())))} projects")
    return resolved
