"""`make dist`: one shiv zipapp per platform, each running on any CPython 3.11-3.13 a user has.

    python -m deploy.zipapp --out dist [--target linux-x86_64|macos-arm64 ...] [--python 3.11 ...]

writes `dist/flock-VERSION-linux-x86_64.pyz` and `dist/flock-VERSION-macos-arm64.pyz`. A user copies
one file and runs `python3 flock-VERSION-PLATFORM.pyz run`; nothing is compiled on their machine.

How a build goes, per target platform (steps 1-2 live in deploy/wheels.py, step 3 in
deploy/layout.py, 4-5 here):

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
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from agent import __version__
from agent.bootstrap import BUILD_INFO
from deploy.layout import compiled_dir, install_wheel, plan_layout
from deploy.wheels import (
    DEFAULT_CACHE,
    REPO,
    TARGETS,
    DistError,
    Log,
    Target,
    Wheel,
    fetch,
    project_requirements,
    resolve_target,
    run_command,
)

PYTHONS = ("3.11", "3.12", "3.13")
ENTRY_POINT = "agent.bootstrap:main"
SHEBANG = "/usr/bin/env python3"
BUILD_LINE = "BUILD = None\n"  # the line of agent/bootstrap.py the archive's __main__.py fills in
SHIM_DIR = PurePosixPath("agent/runtime/native")


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
    run_command([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
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
        per_version = site / compiled_dir(python)
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
    run_command([sys.executable, "-m", "shiv", "--site-packages", str(site),
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
            install_wheel(wheel, site / compiled_dir(python))
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
        if "linux-x86_64" in targets:
            # Built by `make native` for this machine's MLX and CPython; runners of other ones
            # fall back to MLX's CPU attention with a warning.
            kernels = sorted(p.name for p in (REPO / SHIM_DIR).glob("_flockattn-*.so"))
            shipped = ", ".join(kernels) or "none (`make native` builds them)"
            log(f"  attention kernels: {shipped}")
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
    parser = argparse.ArgumentParser(prog="python -m deploy.zipapp", description=__doc__,
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
