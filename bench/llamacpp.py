"""llama.cpp's decode speed on the same weights as flock's benchmarks: SmolLM2-135M in f32.

Run from the repository root: `python -m bench.llamacpp [--threads N] [--runs 3]`. The first run
builds llama.cpp for the benchmark's own use from the `llama-cpp-python` sdist's vendored source
(`pip download --no-binary llama-cpp-python` into the bench cache, cmake with GGML_NATIVE, only the
`llama-bench` and `llama-quantize` targets) and makes the f32 GGUF with
`llama-quantize --allow-requantize <Q4_1 gguf> <out> F32`; later runs reuse both. Nothing is
written under the repository. When llama.cpp cannot be built the figure reads
`llamacpp_decode_tok_s: unavailable (<reason>)`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import CACHE, emit, median, smollm2_gguf

SDIST_DIR = CACHE / "sdist"
TARGETS = ("llama-bench", "llama-quantize")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)


BUILD_TIMEOUT_S = 3 * 3600


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp could not be fetched, built or run here; the message says why."""


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: where its binaries are and which source they came from."""

    bin_dir: Path
    source: str  # "llama-cpp-python 0.3.36"

    def tool(self, name: str) -> Path:
        return self.bin_dir / name


def _run(command: list[str], *, cwd: Path | None = None, timeout: float = 1800) -> str:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LlamaCppUnavailable(f"{command[0]}: {e}") from e
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        raise LlamaCppUnavailable(f"{' '.join(command[:3])} ... exited {done.returncode}: {tail}")
    return done.stdout


def _sdist() -> Path:
    """The llama-cpp-python sdist: the newest cached one, else downloaded from PyPI."""
    cached = sorted(SDIST_DIR.glob("llama_cpp_python-*.tar.gz"))
    if cached:
        return cached[-1]
    SDIST_DIR.mkdir(parents=True, exist_ok=True)
    # Only llama-cpp-python itself as source: `--no-binary :all:` would also build its build
    # backends (scikit-build-core, setuptools, hatchling...) from source, recursively, for minutes.
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
          "-q", "-d", str(SDIST_DIR), "llama-cpp-python"])
    cached = sorted(SDIST_DIR.glob("llama_cpp_python-*.tar.gz"))
    if not cached:
        raise LlamaCppUnavailable("pip download left no llama_cpp_python sdist")
    return cached[-1]


def ensure_built(*, jobs: int | None = None) -> LlamaCpp:
    """llama-bench and llama-quantize, built once into the bench cache."""
    sdist = _sdist()
    name = sdist.name.removesuffix(".tar.gz")  # llama_cpp_python-0.3.36
    source = f"llama-cpp-python {name.rsplit('-', 1)[-1]}"
    tree = CACHE / "src" / name / "vendor" / "llama.cpp"
    build = tree / "build"
    built = LlamaCpp(bin_dir=build / "bin", source=source)
    if all(built.tool(t).is_file() for t in TARGETS):
        return built
    if shutil.which("cmake") is None:
        raise LlamaCppUnavailable("cmake is not on PATH")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise LlamaCppUnavailable("no C++ compiler (c++, g++) on PATH")
    if not (tree / "CMakeLists.txt").is_file():
        try:
            with tarfile.open(sdist) as tar:
                tar.extractall(CACHE / "src", filter="data")
        except (OSError, tarfile.TarError) as e:
            raise LlamaCppUnavailable(f"cannot unpack {sdist.name}: {e}") from e
        if not (tree / "CMakeLists.txt").is_file():
            raise LlamaCppUnavailable(f"{sdist.name} has no vendor/llama.cpp")
    _run(["cmake", "-S", str(tree), "-B", str(build), *CMAKE_OPTIONS])
    jobs = jobs or len(os.sched_getaffinity(0))
    # 30 minutes did not finish it on 2 cores shared with other work; a rerun resumes the build.
    _run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs),
          "--target", *TARGETS], timeout=BUILD_TIMEOUT_S)
    missing = [t for t in TARGETS if not built.tool(t).is_file()]
    if missing:
        raise LlamaCppUnavailable(f"the build produced no {', '.join(missing)}")
    return built


def f32_gguf(llama: LlamaCpp) -> Path:
    """SmolLM2 requantized from the shipped Q4_1 GGUF to F32 by llama-quantize (cached)."""
    out = CACHE / "models" / "SmolLM2-135M-Instruct.F32.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".part")
    _run([str(llama.tool("llama-quantize")), "--allow-requantize", str(smollm2_gguf()),
          str(partial), "F32"])
    partial.replace(out)
    return out


def _supports_depth(llama: LlamaCpp) -> bool:
    done = subprocess.run([str(llama.tool("llama-bench")), "--help"], capture_output=True,
                          text=True, check=False)
    return "--n-depth" in done.stdout + done.stderr


def decode_tok_s(llama: LlamaCpp, model: Path, *, threads: int, tokens: int = 128,
                 depth: int = 64, runs: int = 1) -> list[float]:
    """Decode tok/s of each of `runs` timed runs (`llama-bench -p 0 -n tokens`, after its own
    warm-up run), with `depth` tokens already in the context where llama-bench supports it."""
    command = [str(llama.tool("llama-bench")), "-m", str(model), "-p", "0", "-n", str(tokens),
               "-t", str(threads), "-r", str(runs), "-o", "json"]
    if depth and _supports_depth(llama):
        command += ["-d", str(depth)]
    report = json.loads(_run(command, timeout=600))
    samples = [float(s) for entry in report for s in entry.get("samples_ts", [])]
    if not samples:
        raise LlamaCppUnavailable("llama-bench reported no decode samples")
    return samples


def prepare() -> tuple[LlamaCpp, Path]:
    """Build (or find) llama.cpp and the f32 GGUF; raises LlamaCppUnavailable with the reason."""
    llama = ensure_built()
    return llama, f32_gguf(llama)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="threads (default: what flock's runners use)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--tokens", type=int, default=128, help="decoded tokens per run")
    args = parser.parse_args()
    if args.threads is None:
        from bench.common import runner_env

        _, args.threads = runner_env(gemv=True)
    emit("llamacpp_threads", args.threads)
    try:
        llama, model = prepare()
        emit("llamacpp_source", llama.source)
        rates = decode_tok_s(llama, model, threads=args.threads, tokens=args.tokens,
                             runs=args.runs)
    except LlamaCppUnavailable as e:
        emit("llamacpp_decode_tok_s", f"unavailable ({e})")
        return
    emit("llamacpp_decode_tok_s", median(rates), 1)


if __name__ == "__main__":
    main()
