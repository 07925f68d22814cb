"""One site-packages from many wheels (zipapp.py's step 3): what of a wheel is installed,
which wheels share a directory across CPython versions and which get `_flock_cpXY/`, and
unpacking them.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from agent.bootstrap import compiled_dir_name
from deploy.wheels import DistError, Wheel

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


def compiled_dir(python: str) -> str:
    return compiled_dir_name(tuple(int(part) for part in python.split(".")))


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
