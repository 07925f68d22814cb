"""`make dist`: one shiv zipapp per platform, each running on any CPython 3.11-3.13 a user has.

    python -m agent.dist --out dist [--target linux-x86_64|macos-arm64 ...] [--python 3.11 ...]

writes `dist/flock-VERSION-linux-x86_64.pyz` and `dist/flock-VERSION-macos-arm64.pyz`. A user copies
one file and runs `python3 flock-VERSION-PLATFORM.pyz run`; nothing is compiled on their machine.

How a build goes, per target platform:

1. Resolve. pip resolves the project's dependencies (pyproject's [project].dependencies) for each
   CPython version with `--platform/--python-version/--implementation/--abi` and reports the
   wheels it would install (`pip install --dry-run --report`). pip evaluates environment markers
   against the *build* machine, not the target (a Linux build would never see mlx's
   `mlx-metal; platform_system == "Darwin"`), so the report is re-walked here with the target's
   marker environment: requirements the target needs but pip skipped are added and pip resolves
   again; packages only the build machine needed are dropped. Every CPython gets the same
   release of each project where it can have it (numpy 2.4.6 on 3.11-3.13 rather than 2.5 on
   3.12+ alone), so that builds can share files and a node's numerics do not depend on which
   python3 runs it.
2. Fetch. `pip download --no-deps` of exactly the reported files into a wheel cache
   (~/.cache/flock-dist-wheels, or $FLOCK_DIST_CACHE), checked against the index's sha256.
3. Lay out one site-packages. A wheel the same for every CPython version (pure, abi3, or a
   py3-none binary such as mlx-metal) is unpacked once. Builds of one version of a package for
   several CPythons usually differ only in version-tagged extension modules
   (`core.cpython-312-darwin.so`), which can sit side by side in one directory, each interpreter
   loading its own: those are merged. Anything else that differs (a project no one release of
   which serves every CPython, say) goes to `site-packages/_flock_cpXY/`, which
   `agent.bootstrap.main` puts first on sys.path and PYTHONPATH for that interpreter. A package
   sharing a top-level directory with such a per-version package moves with it, since a regular
   package cannot span two path entries (mlx-metal's `mlx/lib/libmlx.dylib` is found through
   the extension's rpath, next to it).
4. Add flock itself (a wheel built from a copy of this tree, so package-data rules apply: the
   Linux build carries the prebuilt BLAS shim `agent/runtime/native/libflockblas-*.so`).
5. shiv packs the directory (entry point `agent.bootstrap:main`, reproducible timestamps), and the
   archive is re-packed with deflate and `agent/bootstrap.py` as its `__main__.py`, so any
   python3 first checks itself and says in one line what to do when it cannot run flock (shiv's
   own bootstrap would die with a SyntaxError under Python < 3.6 and extract ~/.shiv for nothing
   under 3.6-3.10).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

# packaging is in every flock environment (transformers and huggingface-hub depend on it).
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from agent import __version__
from agent.bootstrap import BUILD_INFO, compiled_dir_name

REPO = Path(__file__).resolve().parents[1]
PYTHONS = ("3.11", "3.12", "3.13")
DEFAULT_CACHE = Path("~/.cache/flock-dist-wheels")
ENTRY_POINT = "agent.bootstrap:main"
SHEBANG = "/usr/bin/env python3"
BUILD_LINE = "BUILD = None\n"  # the line of agent/bootstrap.py the archive's __main__.py fills in
SHIM_DIR = PurePosixPath("agent/runtime/native")

# Files no user runs: (pattern on the path inside a wheel's install root, why it goes).
PRUNE: tuple[tuple[str, str], ...] = (
    ("*/__pycache__/*", "bytecode compiled by whoever built the wheel"),
    ("*.pyc", "bytecode compiled by whoever built the wheel"),
    ("*.pyi", "type stubs, read by type checkers only"),
    ("mlx/include/*", "MLX's C++ and Metal headers, for building MLX extensions"),
    ("mlx/share/*", "MLX's CMake package files, for building MLX extensions"),
    ("numpy/*/tests/*", "numpy's own test suite"),
    ("numpy/tests/*", "numpy's own test suite"),
    ("numpy/_core/include/*", "numpy's C headers, for building extensions"),
    ("*.a", "static libraries, for linking extensions"),
)

# Files that record how each build was made, so builds of one release for different CPythons
# differ there and nowhere else; where those builds share a directory, the first build's copy
# stays (numpy.show_config() then describes the 3.11 build on every version).
BUILD_RECORDS: frozenset[str] = frozenset({"numpy/__config__.py"})

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


def _run(command: Sequence[str], what: str, *, cwd: Path | None = None) -> str:
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
        _run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
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


def _compiled_dir(python: str) -> str:
    return compiled_dir_name(tuple(int(part) for part in python.split(".")))


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
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
              "--disable-pip-version-check", "-d", str(cache),
              *_pip_target_flags(target, python), *[w.url for w in todo]],
             f"downloading wheels for {target.name} CPython {python}")
    bad = [w.filename for w in wheels if not _cached(w, cache)]
    if bad:
        raise DistError(f"missing or corrupt after download: {', '.join(bad)}")
    return {w.filename: cache / w.filename for w in wheels}


# -- wheel contents ---------------------------------------------------------------------------


def installed_path(member: str) -> str | None:
    """Where a wheel member lands in site-packages; None for members a zipapp cannot use."""
    first, _, rest = member.partition("/")
    if first.endswith(".data"):
        kind, _, inner = rest.partition("/")
        # scripts, headers and data belong under a prefix (bin/, include/, share/) that a zipapp
        # does not have; purelib and platlib are site-packages itself.
        return inner if kind in ("purelib", "platlib") and inner else None
    return member


def pruned(path: str) -> bool:
    return any(fnmatch(path, pattern) for pattern, _ in PRUNE)


def wheel_files(wheel: Path) -> dict[str, zipfile.ZipInfo]:
    """A wheel's installed files (after pruning) and their zip entries."""
    files: dict[str, zipfile.ZipInfo] = {}
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = installed_path(info.filename)
            if path is None or info.is_dir() or pruned(path):
                continue
            files[path] = info
    return files


def _top_level(paths: Iterable[str]) -> set[str]:
    """Top-level names a wheel installs (packages, modules, .libs dirs), dist-info excluded."""
    tops = set()
    for path in paths:
        first = path.split("/", 1)[0]
        if not first.endswith(".dist-info"):
            tops.add(first.removesuffix(".py") if "/" not in path else first)
    return tops


def _metadata_member(path: str) -> bool:
    # Builds of one release for several CPythons describe the same project; their dist-info files
    # differ in build details only: WHEEL's Tag lines and RECORD's hashes (combined when merged),
    # SBOMs (the first build's kept). BUILD_RECORDS likewise.
    return ".dist-info/" in path or path in BUILD_RECORDS


def _combined_member(path: str) -> bool:
    return path.endswith((".dist-info/WHEEL", ".dist-info/RECORD"))


def can_merge(wheels: Sequence[Path]) -> bool:
    """True when the wheels' files can share one directory: any path they have in common holds
    the same bytes, apart from dist-info metadata."""
    seen: dict[str, tuple[int, int]] = {}
    for wheel in wheels:
        for path, info in wheel_files(wheel).items():
            key = (info.CRC, info.file_size)
            if seen.setdefault(path, key) != key and not _metadata_member(path):
                return False
    return True


@dataclass
class Layout:
    """Which wheel goes where in the zipapp's site-packages."""

    shared: list[list[Path]] = field(default_factory=list)  # unpacked together into site/
    per_python: dict[str, list[Path]] = field(default_factory=dict)  # into site/_flock_cpXY/
    notes: list[str] = field(default_factory=list)


def plan_layout(resolved: dict[str, dict[str, Wheel]], files: dict[str, Path]) -> Layout:
    """Share what can be shared across CPython versions; give each version the rest.

    resolved: CPython version -> canonical name -> wheel; files: wheel filename -> path.
    """
    pythons = list(resolved)
    names = sorted({name for by_name in resolved.values() for name in by_name})
    groups: dict[str, list[Wheel | None]] = {
        name: [resolved[py].get(name) for py in pythons] for name in names}
    local: set[str] = set()  # projects that get one directory per CPython version
    notes: list[str] = []
    for name, wheels in groups.items():
        present = [w for w in wheels if w is not None]
        if len(present) < len(pythons):
            local.add(name)
            notes.append(f"{name}: only needed for some CPython versions")
        elif len({w.filename for w in present}) == 1:
            continue
        elif len({w.version for w in present}) > 1:
            local.add(name)
            versions = ", ".join(f"{py}: {w.version}" for py, w in zip(pythons, present,
                                                                       strict=True))
            notes.append(f"{name}: different versions per CPython ({versions})")
        elif not can_merge([files[w.filename] for w in present]):
            local.add(name)
            notes.append(f"{name}: builds for each CPython differ beyond tagged extensions")
    tops = {name: set().union(*(_top_level(wheel_files(files[w.filename]))
                                for w in groups[name] if w is not None)) for name in names}
    changed = True
    while changed:  # a package sharing a top-level directory with a per-version one moves too
        changed = False
        for name in names:
            if name in local:
                continue
            clash = next((o for o in local if tops[name] & tops[o]), None)
            if clash is not None:
                local.add(name)
                notes.append(f"{name}: shares {sorted(tops[name] & tops[clash])} with {clash}")
                changed = True
    layout = Layout(notes=notes)
    for name in names:
        if name in local:
            for py, wheel in zip(pythons, groups[name], strict=True):
                if wheel is not None:
                    layout.per_python.setdefault(py, []).append(files[wheel.filename])
        else:
            unique = dict.fromkeys(files[w.filename] for w in groups[name] if w is not None)
            layout.shared.append(list(unique))
    return layout


def _merge_text(old: bytes, new: bytes) -> bytes:
    lines = old.decode().splitlines()
    lines += [line for line in new.decode().splitlines() if line not in lines]
    return ("\n".join(lines) + "\n").encode()


def install_wheel(wheel: Path, dest: Path) -> int:
    """Unpack a wheel's importable files into dest (site-packages); returns the file count.

    A file already there must be identical, except dist-info metadata (can_merge decided
    beforehand that this is all that differs): WHEEL's and RECORD's lines are combined, and other
    metadata stays as the first build wrote it.
    """
    count = 0
    root = dest.resolve()
    with zipfile.ZipFile(wheel) as archive:
        for path, info in wheel_files(wheel).items():
            target = (dest / path).resolve()
            if root not in target.parents:
                raise DistError(f"{wheel.name}: {path} points outside site-packages")
            data = archive.read(info)
            if target.exists():
                old = target.read_bytes()
                if old == data:
                    continue
                if not _metadata_member(path):
                    raise DistError(f"{wheel.name}: {path} clashes with a file already installed")
                if not _combined_member(path):
                    continue
                data = _merge_text(old, data)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            mode = (info.external_attr >> 16) & 0o777
            target.chmod(mode | 0o644 if mode else 0o644)
            count += 1
    return count


# -- flock itself -----------------------------------------------------------------------------


def ensure_shim(log: Log) -> Path | None:
    """The prebuilt Linux BLAS shim in the tree, built first when missing (Linux hosts only)."""
    from agent.runtime import blas

    shim = REPO / SHIM_DIR / "libflockblas-linux-x86_64.so"
    if shim.is_file():
        return shim
    if not (sys.platform == "linux" and os.uname().machine == "x86_64"):
        return None
    log(f"  building {shim.relative_to(REPO)}")
    try:
        return blas.build_shim(shim.parent, name=shim.name)
    except blas.BlasError as exc:
        raise DistError(f"cannot build the BLAS shim the Linux zipapp ships: {exc}") from exc


def build_flock_wheel(work: Path, log: Log) -> Path:
    """flock's own wheel, built from a copy of this tree (build/ and egg-info stay out of it)."""
    source = work / "flock-src"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    shutil.copy2(REPO / "pyproject.toml", source)
    for name in ("README.md", "LICENSE", "CHANGELOG.md"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, source)
    if not (source / "README.md").exists():  # pyproject names it; the wheel does not need it
        (source / "README.md").write_text("flock\n")
    shutil.copytree(REPO / "agent", source / "agent",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    out = work / "flock-wheel"
    shutil.rmtree(out, ignore_errors=True)
    log("  building the flock wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
          "--disable-pip-version-check", "-w", str(out), str(source)], "building flock's wheel")
    wheels = list(out.glob("flock-*.whl"))
    if len(wheels) != 1:
        raise DistError(f"expected one flock wheel in {out}, found {wheels}")
    return wheels[0]


# Imported by agent/ but not from site-packages: module -> where it comes from.
PROVIDED_ELSEWHERE = {"agent": "this package", "_bootstrap": "shiv's runtime at the archive root"}
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _guarded(node: ast.AST) -> bool:
    """An import in this block's body may fail: try/except ImportError, or `if TYPE_CHECKING:`."""
    if isinstance(node, ast.Try):
        caught: set[str] = set()
        for handler in node.handlers:
            kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            caught |= {ast.unparse(kind).rsplit(".", 1)[-1] for kind in kinds if kind is not None}
            if handler.type is None:
                return True
        return bool(caught & _IMPORT_ERRORS)
    return isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def required_imports(source: str) -> set[str]:
    """Top-level modules a source file imports where a failure is not handled."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        for name, value in ast.iter_fields(node):
            if name == "body" and _guarded(node):
                continue  # (a try's else and a TYPE_CHECKING if's else are not guarded)
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    visit(child)

    visit(ast.parse(source))
    return found


def _module_names(directory: Path) -> set[str]:
    """Names importable from a sys.path entry: packages (namespace ones too) and modules."""
    names = set()
    for entry in directory.iterdir():
        if entry.is_dir() and "." not in entry.name:
            names.add(entry.name)
        elif entry.suffix in (".py", ".so", ".pyd"):
            names.add(entry.name.split(".")[0])
    return names


def missing_imports(site: Path, pythons: Sequence[str]) -> dict[str, list[str]]:
    """Modules flock's code needs that no packaged distribution provides: module -> importers.

    Catches a dependency used in agent/ but missing from pyproject.toml before a user does.
    """
    provided = set(sys.stdlib_module_names) | set(PROVIDED_ELSEWHERE) | _module_names(site)
    for python in pythons:  # present for every CPython version, or it is missing for some
        per_version = site / _compiled_dir(python)
        if per_version.is_dir():
            provided |= _module_names(per_version)
    missing: dict[str, list[str]] = {}
    for path in sorted((site / "agent").rglob("*.py")):
        for module in sorted(required_imports(path.read_text()) - provided):
            missing.setdefault(module, []).append(path.relative_to(site).as_posix())
    return missing


# -- packing ----------------------------------------------------------------------------------


def main_py(build: dict[str, object]) -> bytes:
    """agent/bootstrap.py with the build's facts filled in: the archive's __main__.py."""
    source = (REPO / "agent" / "bootstrap.py").read_text()
    if source.count(BUILD_LINE) != 1:
        raise DistError(f"agent/bootstrap.py must hold the line {BUILD_LINE!r} exactly once")
    # json.dumps of str/list values is also a Python literal, in every Python version.
    return source.replace(BUILD_LINE, f"BUILD = {json.dumps(build, sort_keys=True)}\n").encode()


def run_shiv(site: Path, output: Path) -> None:
    _run([sys.executable, "-m", "shiv", "--site-packages", str(site),
          "--entry-point", ENTRY_POINT, "--output-file", str(output), "--python", SHEBANG,
          "--reproducible", "--uncompressed"], "shiv")


def repack(shiv_output: Path, final: Path, main: bytes) -> None:
    """Compress shiv's archive and make `main` its __main__.py (written atomically to final)."""
    with shiv_output.open("rb") as handle:
        first = handle.readline()
    shebang = first if first.startswith(b"#!") else b""
    partial = final.with_name(final.name + ".partial")
    with zipfile.ZipFile(shiv_output) as source:
        original = source.read("__main__.py")
        if b"_bootstrap.bootstrap()" not in original:
            # agent.bootstrap hands over to shiv's _bootstrap exactly as shiv's own main does.
            raise DistError(f"unexpected shiv __main__.py: {original!r}")
        with partial.open("wb") as out:
            out.write(shebang)
            with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for info in source.infolist():
                    data = main if info.filename == "__main__.py" else source.read(info)
                    entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                    entry.external_attr = info.external_attr
                    entry.compress_type = zipfile.ZIP_DEFLATED
                    archive.writestr(entry, data)
    partial.chmod(0o755)
    os.replace(partial, final)


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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


def build_target(target: Target, resolved: dict[str, dict[str, Wheel]], out_dir: Path, *,
                 cache: Path, work: Path, flock_wheel: Path, log: Log) -> Path:
    """Build dist/flock-VERSION-<target>.pyz from its resolution; returns the path."""
    started = time.monotonic()
    pythons = list(resolved)
    files: dict[str, Path] = {}
    for python in pythons:
        files.update(fetch(target, python, resolved[python].values(), cache, log))
    layout = plan_layout(resolved, files)

    site = work / f"site-{target.name}"
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    for group in layout.shared:
        for wheel in group:
            install_wheel(wheel, site)
    for python, wheels in layout.per_python.items():
        for wheel in wheels:
            install_wheel(wheel, site / _compiled_dir(python))
    install_wheel(flock_wheel, site)
    shim = site / SHIM_DIR / "libflockblas-linux-x86_64.so"
    if target.sys_platform == "linux":
        if not shim.is_file():
            raise DistError(f"the flock wheel lacks {SHIM_DIR}/{shim.name}: "
                            "run `python -m agent.runtime.blas build --out agent/runtime/native`")
    else:
        for binary in (site / SHIM_DIR).glob("*.so"):
            binary.unlink()  # Linux binaries: MLX uses Accelerate on macOS
    missing = missing_imports(site, pythons)
    if missing:
        lines = [f"{module} (imported by {', '.join(users)})" for module, users in missing.items()]
        raise DistError("flock imports modules that no dependency in pyproject.toml provides; "
                        "add their distributions to [project].dependencies: " + "; ".join(lines))
    stray = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.pth"))
    if stray:
        # shiv processes .pth files only at the top of site-packages, and PYTHONPATH (how runner
        # subprocesses find packages) processes none: a package needing one would break there.
        raise DistError(f".pth files would be ignored in the zipapp: {', '.join(stray)}")

    name = f"flock-{__version__}-{target.name}.pyz"
    build = {"version": __version__, "target": target.name, "sys_platform": target.sys_platform,
             "machine": target.machine, "pythons": list(pythons), "file": name}
    (site / BUILD_INFO).write_text(json.dumps(build, indent=2, sort_keys=True) + "\n")

    for note in layout.notes:
        log(f"  per-version: {note}")
    log(f"  site-packages: {_tree_bytes(site) / 1e6:.0f} MB unpacked; packing")
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = work / f"{name}.shiv"
    run_shiv(site, raw)
    final = out_dir / name
    repack(raw, final, main_py(build))
    raw.unlink()
    log(f"  {final}: {final.stat().st_size / 1e6:.1f} MB ({time.monotonic() - started:.0f} s "
        "to fetch and pack)")
    return final


def build(out_dir: Path, targets: Sequence[str], *, pythons: Sequence[str] = PYTHONS,
          cache: Path | None = None, work: Path | None = None, extra: Sequence[str] = (),
          log: Log = print) -> list[Path]:
    """Build the zipapps for `targets`; returns their paths.

    extra: requirements beyond pyproject's dependencies (PEP 508, markers allowed).
    """
    cache = (cache or Path(os.environ.get("FLOCK_DIST_CACHE", DEFAULT_CACHE))).expanduser()
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise DistError(f"unknown target {unknown}; known: {', '.join(TARGETS)}")
    with tempfile.TemporaryDirectory(prefix="flock-dist-") as scratch:
        base = work or Path(scratch)
        base.mkdir(parents=True, exist_ok=True)
        if "linux-x86_64" in targets and ensure_shim(log) is None:
            raise DistError("the Linux zipapp ships a prebuilt BLAS shim, and this machine cannot "
                            "build it: run `make dist` on Linux x86_64 with a C compiler")
        flock_wheel = build_flock_wheel(base, log)
        requirements = [*project_requirements(), *extra]
        built = []
        for name in targets:
            target = TARGETS[name]
            log(f"{name}: resolving for CPython {', '.join(pythons)}")
            resolved = resolve_target(target, pythons, requirements, base, log)
            built.append(build_target(target, resolved, out_dir.resolve(), cache=cache,
                                      work=base, flock_wheel=flock_wheel, log=log))
        return built


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.dist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output directory")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS),
                        help="platform to build (repeatable; default: all)")
    parser.add_argument("--python", action="append", dest="pythons", metavar="X.Y",
                        help=f"CPython version to carry (repeatable; default {' '.join(PYTHONS)})")
    parser.add_argument("--cache", type=Path,
                        help=f"wheel cache (default $FLOCK_DIST_CACHE or {DEFAULT_CACHE})")
    parser.add_argument("--with", action="append", dest="extra", default=[], metavar="REQ",
                        help="also pack this requirement (repeatable; e.g. to try a dependency "
                        "before it is in pyproject.toml)")
    parser.add_argument("--work", type=Path,
                        help="keep the staging tree here (default: a temporary directory)")
    args = parser.parse_args(argv)
    try:
        build(args.out, args.target or list(TARGETS), pythons=args.pythons or PYTHONS,
              cache=args.cache, work=args.work, extra=args.extra,
              log=lambda line: print(line, flush=True))
    except DistError as exc:
        print(f"flock dist: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
