"""Optimised BLAS for MLX on Linux: find OpenBLAS, build the flockblas shim, say what runners use.

The mlx[cpu] wheel links a reference BLAS (sgemm ~7 GFLOP/s). Runners preload the shim built from
native/flockblas.c, which forwards MLX's gemm calls to OpenBLAS (scipy-openblas32, a flock
dependency on Linux, or the system's libopenblas). On macOS MLX uses Accelerate and Metal, and
everything here is a no-op.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import hashlib
import importlib.util
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.settings import NodeSettings

NATIVE_DIR = Path(__file__).resolve().parent / "native"
SOURCE = NATIVE_DIR / "flockblas.c"
REFERENCE = "reference BLAS (mlx default)"

# Runs under the candidate LD_PRELOAD: proves the shim preloads and the library loads before any
# runner depends on it (the shim aborts a process whose library is missing).
_PROBE = """
import ctypes, sys
try:
    info = ctypes.CDLL(None).flockblas_info
except AttributeError:
    sys.exit("the shim was not preloaded")
info.restype = ctypes.c_char_p
sys.stdout.write(info().decode())
"""


class BlasError(RuntimeError):
    """The shim could not be built, or does not load with the library."""


@dataclass(frozen=True)
class OpenBlas:
    """An optimised CBLAS library the shim can forward to."""

    path: str  # a file, or a soname the dynamic loader resolves (Debian's libopenblas.so.0)
    origin: str  # "scipy-openblas32", or the soname


@dataclass(frozen=True)
class BlasSetup:
    """A shim and a library that were seen loading together, with the shim's own report."""

    shim: Path
    library: OpenBlas
    info: dict[str, str]


@dataclass(frozen=True)
class BlasUnavailable:
    """Why runners stay on MLX's reference BLAS."""

    reason: str


def platform_tag() -> str:
    return f"{sys.platform}-{platform.machine()}"


def shim_filename() -> str:
    return f"libflockblas-{platform_tag()}.so"


def find_openblas() -> OpenBlas | None:
    """scipy-openblas32's library, else the system's libopenblas; None when neither exists."""
    # find_spec, not import: importing scipy_openblas32 loads the library (and its threads).
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is not None and spec.origin is not None:
        lib_dir = Path(spec.origin).parent / "lib"
        candidates = sorted(lib_dir.glob("libscipy_openblas*.so*"))
        if candidates:
            return OpenBlas(path=str(candidates[0]), origin="scipy-openblas32")
    soname = ctypes.util.find_library("openblas")
    return OpenBlas(path=soname, origin=soname) if soname else None


def find_compiler() -> str | None:
    return next((cc for cc in ("cc", "gcc", "clang") if shutil.which(cc)), None)


def build_shim(out_dir: Path, *, name: str | None = None) -> Path:
    """Compile native/flockblas.c into out_dir; the file appears atomically (runners race)."""
    compiler = find_compiler()
    if compiler is None:
        raise BlasError("no C compiler (cc, gcc, clang) on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / (name or shim_filename())
    partial = str(out_dir / f".flockblas-{os.getpid()}-{secrets.token_hex(4)}.so")
    command = [compiler, "-O2", "-shared", "-fPIC", "-pthread", "-o", partial, str(SOURCE), "-ldl"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BlasError(f"{' '.join(command)} failed: {done.stderr.strip()}")
        # Readable by all: a packaged or system-wide install is dlopen()ed by other users.
        os.chmod(partial, 0o755)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def _built_name() -> str:
    # The source hash in the name keeps a state-dir build from outliving an upgraded flock.
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return f"libflockblas-{platform_tag()}-{digest}.so"


def find_shim(state_dir: Path | None) -> Path:
    """The shipped prebuilt shim, else one built (once) into <state_dir>/native."""
    shipped = NATIVE_DIR / shim_filename()
    if shipped.is_file():
        return shipped
    if state_dir is None or not SOURCE.is_file():
        raise BlasError(f"no prebuilt {shipped.name} ships with this flock")
    built = state_dir / "native" / _built_name()
    if built.is_file():
        return built
    try:
        return build_shim(built.parent, name=built.name)
    except BlasError as e:
        raise BlasError(f"no prebuilt {shipped.name}, and building it failed: {e}") from e


def parse_info(text: str) -> dict[str, str]:
    """flockblas_info()'s tab-separated key=value fields."""
    return dict(field.split("=", 1) for field in text.split("\t") if "=" in field)


def probe(shim: Path, library: OpenBlas) -> dict[str, str]:
    """flockblas_info() from a fresh process that preloads shim with library."""
    env = {
        **os.environ,
        "LD_PRELOAD": str(shim),
        "FLOCK_BLAS_LIB": library.path,
        "OPENBLAS_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    info = parse_info(done.stdout)
    if done.returncode != 0 or "error" in info or "lib" not in info:
        detail = info.get("error") or done.stderr.strip() or done.stdout.strip()
        raise BlasError(f"{shim.name} does not load {library.path}: {detail}")
    return info


@functools.cache
def resolve_blas(state_dir: Path | None) -> BlasSetup | BlasUnavailable:
    """What runners on this machine can preload; probed once per process."""
    if sys.platform != "linux":
        return BlasUnavailable(reason=f"not needed on {sys.platform}")
    library = find_openblas()
    if library is None:
        return BlasUnavailable(reason="neither scipy-openblas32 nor libopenblas is installed")
    try:
        shim = find_shim(state_dir)
        return BlasSetup(shim=shim, library=library, info=probe(shim, library))
    except (BlasError, OSError, subprocess.TimeoutExpired) as e:
        return BlasUnavailable(reason=str(e))


def loaded_info() -> dict[str, str] | None:
    """The shim's report when this process runs with it preloaded (a runner), else None."""
    try:
        info = ctypes.CDLL(None).flockblas_info
    except AttributeError:
        return None
    info.restype = ctypes.c_char_p
    return parse_info(info().decode())


def describe_info(info: dict[str, str]) -> str:
    """'OpenBLAS 0.3.30 SkylakeX via scipy-openblas32 (sgemv fast path)' from the shim's report."""
    if "error" in info:
        return f"flockblas misconfigured: {info['error']}"
    config = info.get("config", "")
    found = re.match(r"OpenBLAS\s+(\d+\.\d+\.\d+)", config)
    name = f"OpenBLAS {found.group(1)}" if found else "optimised BLAS"
    # OpenBLAS names the kernel family it chose for this CPU right before MAX_THREADS.
    core = re.search(r"(\w+)\s+MAX_THREADS", config)
    if core and core.group(1) not in ("NO_AFFINITY", "DYNAMIC_ARCH"):
        name += f" {core.group(1)}"
    lib = info.get("lib", "")
    origin = "scipy-openblas32" if "scipy_openblas" in lib else Path(lib).name
    path = "sgemv fast path" if info.get("gemv") == "on" else "sgemv fast path off"
    return f"{name} via {origin} ({path})"


def describe_blas(settings: NodeSettings | None = None) -> str:
    """A short line naming the BLAS MLX uses, for `flock version`, node profiles and logs.

    With settings: what this node's runners get (the shim is probed, built if need be). Without:
    what this process uses, so a runner reports the library it really has.
    """
    if sys.platform == "darwin":
        return "Accelerate (macOS; MLX default)"
    info = loaded_info()
    if info is not None:
        return describe_info(info)
    if settings is None:
        return REFERENCE
    if settings.blas == "off":
        return f"{REFERENCE}; blas = off"
    setup = resolve_blas(settings.state_dir)
    if isinstance(setup, BlasUnavailable):
        return f"{REFERENCE}; {setup.reason}"
    return describe_info(setup.info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.runtime.blas", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="compile the shim (for packaging)")
    build.add_argument("--out", type=Path, required=True, help="directory for the .so")
    build.add_argument("--name", help=f"file name (default {shim_filename()})")
    commands.add_parser("describe", help="print the BLAS runners on this machine would use")
    args = parser.parse_args(argv)
    if args.command == "build":
        if sys.platform != "linux":
            print(f"flockblas: not needed on {sys.platform}", file=sys.stderr)
            return 0
        try:
            print(build_shim(args.out, name=args.name))
        except BlasError as e:
            print(f"flockblas: {e}", file=sys.stderr)
            return 1
        return 0
    from agent.settings import load_settings

    print(describe_blas(load_settings()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
