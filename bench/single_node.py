"""Single-node figures of the foundation issue, measured side by side in one run.

    .venv/bin/python -m bench.single_node [--rounds 3] [--tokens 128]

Prints `name: value` lines:
  api_decode_vs_mlxlm       decode tok/s through the streaming HTTP API / mlx-lm in-process with
                            the same BLAS as flock's runners
  ttft_overhead_ms          time to first token through the API minus mlx-lm's, 64-token prompt
  batch8_vs_1               aggregate decode tok/s of 8 concurrent API streams / one stream
  prefill_vs_default_mlxlm  prompt tok/s (512-token prompt) / mlx-lm default install (no BLAS shim)
  decode_vs_default_mlxlm   decode tok/s / mlx-lm default install
Each mlx-lm figure runs in its own subprocess (the BLAS preload is process-wide); rounds alternate
and medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import wait_agent_ready

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"

MLXLM_PROBE = r"""
import json, sys, time
import mlx.core as mx
from mlx_lm.utils import load_model
from mlx_lm.models.cache import make_prompt_cache
from pathlib import Path
model_dir, prompt_json, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompt = json.loads(prompt_json)
model, _ = load_model(Path(model_dir))
def run(tokens, n):
    cache = make_prompt_cache(model)
    t0 = time.perf_counter()
    out = model(mx.array([tokens]), cache=cache)
    tok = mx.argmax(out[:, -1], axis=-1)
    mx.eval(tok)
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(n):
        out = model(tok[None], cache=cache)
        tok = mx.argmax(out[:, -1], axis=-1)
        mx.eval(tok)
    return ttft, n / (time.perf_counter() - t1)
run(prompt[:8], 4)  # warm-up
ttft, decode = run(prompt, n)
print(json.dumps({"ttft_s": ttft, "decode_tok_s": decode}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_model(models_dir: Path) -> Path:
    from agent.models.fetch import pull
    from agent.models.store import ModelStore

    store = ModelStore(models_dir)
    if MODEL not in {m.name for m in store.list()}:
        pull(store, MODEL)
    return store.resolve(MODEL)


def runner_env(state_dir: Path, *, blas: str) -> dict[str, str]:
    from agent.runtime.environment import runner_environment
    from agent.settings import NodeSettings

    env, _ = runner_environment(NodeSettings(state_dir=state_dir, blas=blas))  # type: ignore[arg-type]
    env["PYTHONPATH"] = str(ROOT)
    return env


def mlxlm(model_dir: Path, prompt: list[int], n: int, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", MLXLM_PROBE, str(model_dir), json.dumps(prompt),
                          str(n)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def chat_prompt(model_dir: Path, words: int) -> tuple[list[dict[str, str]], list[int]]:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    text = " ".join(f"item{i}" for i in range(words))
    messages = [{"role": "user", "content": f"Repeat this list back, then count to 300: {text}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return messages, list(ids)


def fit_prompt(model_dir: Path, target: int) -> tuple[list[dict[str, str]], list[int]]:
    words = max(1, target // 3)
    while True:
        messages, ids = chat_prompt(model_dir, words)
        if len(ids) >= target or words > 10 * target:
            return messages, ids
        words += max(1, (target - len(ids)) // 2)


async def stream_once(client: httpx.AsyncClient, messages: list[dict[str, str]], n: int
                      ) -> tuple[float, float, int]:
    """(ttft seconds, decode tok/s after the first token, tokens) of one streamed chat."""
    body = {"model": MODEL, "messages": messages, "stream": True, "temperature": 0,
            "max_tokens": n, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return first - started, decode, tokens


async def api_figures(url: str, short: list[dict[str, str]], long: list[dict[str, str]], n: int
                      ) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await stream_once(client, short, 8)  # warm-up: compile the shapes
        ttft, decode, _ = await stream_once(client, short, n)
        prefill_ttft, _, _ = await stream_once(client, long, 1)
        await asyncio.gather(*(stream_once(client, short, 8) for _ in range(8)))  # warm batch 8
        started = time.perf_counter()
        results = await asyncio.gather(*(stream_once(client, short, n) for _ in range(8)))
        elapsed = time.perf_counter() - started
        # Aggregate decode rate: tokens after each stream's first, over the shared wall time
        # minus the longest time to first token.
        produced = sum(max(0, r[2] - 1) for r in results)
        batch = produced / max(1e-9, elapsed - max(r[0] for r in results))
    return {"ttft_s": ttft, "decode_tok_s": decode, "prefill_ttft_s": prefill_ttft,
            "batch8_tok_s": batch}


def start_agent(models_dir: Path, state_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--host", "127.0.0.1", "--port", str(port),
         "--model", MODEL, "--models-dir", str(models_dir), "--state-dir", str(state_dir),
         "--metrics", "--no-discovery"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--models-dir", type=Path,
                        default=Path.home() / ".cache" / "flock-bench" / "models")
    args = parser.parse_args()
    model_dir = ensure_model(args.models_dir)
    short, short_ids = fit_prompt(model_dir, 64)
    long, long_ids = fit_prompt(model_dir, 512)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        same_blas = runner_env(state, blas="auto")
        default = runner_env(state, blas="off")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        agent = start_agent(args.models_dir, state / "agent", port)
        try:
            wait_agent_ready(url, agent)
            rows: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                api = asyncio.run(api_figures(url, short, long, args.tokens))
                same = mlxlm(model_dir, short_ids, args.tokens, same_blas)
                plain = mlxlm(model_dir, short_ids, args.tokens, default)
                plain_long = mlxlm(model_dir, long_ids, 1, default)
                for key, value in {
                    "api_decode_tok_s": api["decode_tok_s"],
                    "api_ttft_ms": api["ttft_s"] * 1000,
                    "api_prefill_tok_s": len(long_ids) / api["prefill_ttft_s"],
                    "api_batch8_tok_s": api["batch8_tok_s"],
                    "mlxlm_decode_tok_s": same["decode_tok_s"],
                    "mlxlm_ttft_ms": same["ttft_s"] * 1000,
                    "default_mlxlm_decode_tok_s": plain["decode_tok_s"],
                    "default_mlxlm_prefill_tok_s": len(long_ids) / plain_long["ttft_s"],
                }.items():
                    rows.setdefault(key, []).append(value)
        finally:
            agent.terminate()
            agent.wait(30)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"prompt_tokens: {len(short_ids)}")
    print(f"long_prompt_tokens: {len(long_ids)}")
    for key, value in med.items():
        print(f"{key}: {value:.2f}")
    print(f"api_decode_vs_mlxlm: {med['api_decode_tok_s'] / med['mlxlm_decode_tok_s']:.2f}")
    print(f"ttft_overhead_ms: {med['api_ttft_ms'] - med['mlxlm_ttft_ms']:.1f}")
    print(f"batch8_vs_1: {med['api_batch8_tok_s'] / med['api_decode_tok_s']:.2f}")
    print(f"prefill_vs_default_mlxlm: "
          f"{med['api_prefill_tok_s'] / med['default_mlxlm_prefill_tok_s']:.2f}")
    print(f"decode_vs_default_mlxlm: "
          f"{med['api_decode_tok_s'] / med['default_mlxlm_decode_tok_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
