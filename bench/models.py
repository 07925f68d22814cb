"""The models people cluster (issue 12's numbers): every listed architecture through a real
agent's API and as a 2-stage pipeline, the refusal of an unknown one, quantized checkpoints kept
quantized, the mlx-lm engine's and a mixture-of-experts model's decode speed.

Run from the repository root: `python -m bench.models [--quick] [--skip-moe] [--only ...]`.
Every process gets the environment flock's runners get (the flockblas shim preloaded, the sgemv
fast path on, flock's and mlx-lm's processes alike).

- `archs_total`, `archs_identical`, `archs_failing`: one `python -m agent run` (no model at
  start) serves each of the 24 architectures' tiny random-weight models
  (`tests.tiny_archs.make_arch_model`, the tests' cached directories), each requested by its
  directory path on the raw completions endpoint (`/v1/completions`, the fixed 16-token prompt
  as token ids, greedy, 32 tokens) and placed on demand by that first request; identical means
  32 completion tokens whose text equals mlx-lm's detokenized greedy ids (the API returns text,
  not ids). Each instance is removed (`DELETE /cluster/instances/...`) before the next.
- `archs_pipeline_identical`: the same check on a 2-node loopback cluster (two agents, one
  store holding every tiny model), each model placed by `POST /cluster/instances` with
  strategy `pipeline` over both nodes, then removed.
- `unknown_arch_error_ms`: a chat request for a directory whose config.json says
  `model_type: "frobnicator"` until the API's 400, median of 5, through the same agent.
- `kept4bit_rss_vs_f32`, `kept4bit_decode_vs_mlxlm`: SmolLM2 converted to 4-bit by
  `mlx_lm.convert -q`, served with `dtype = "keep"` (see `rss_worker`); decode through flock's
  scheduler over mlx-lm's `generate_step` in-process on the same directory.
- `generic_decode_vs_mlxlm`: bench.generic_engine's measurement (its functions), gemma3_text at
  SmolLM2's size on the mlx-lm engine.
- `moe_decode_vs_mlxlm`, `moe_batch8_vs_1`: a random qwen3_moe (8 layers, hidden 1024, 32
  experts of width 512, top 4, vocabulary 32,000, float32: about 1.8 GB) through a runner
  process (greedy, client-timed from the first streamed token, plain decode: prompt-lookup
  drafting off, as mlx-lm's loop does not draft) over mlx-lm in-process, and 8 concurrent
  streams' aggregate decode over one stream's. `--skip-moe` leaves them out.
  `moe_step_vs_mlxlm_interleaved`, `moe_batch8_step_vs_1_interleaved`: the same model's
  decode steps timed in one process, flock's compiled step (1 row, 8 rows; KV written in place
  as the runner writes it) and mlx-lm's model call taking turns step by step (median of each),
  so load that comes and goes on a shared machine falls on both alike (see
  `moe_interleaved_worker`).

Prints `name: value` lines (and `#` comments); asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    CACHE,
    TEST_CACHE,
    bench_agent,
    call_in_subprocess,
    cpu_pressure,
    emit,
    median,
    runner_env,
    save_random_model,
    smollm2_f32_dir,
    warn_if_busy,
)

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss",
         "deepseek_v3", "deepseek_v2", "glm4_moe", "minimax", "gemma2", "gemma3_text", "phi3",
         "granite", "olmo2", "starcoder2", "cohere", "smollm3", "ministral3", "lfm2",
         "qwen3_next", "nemotron_h")
MOE_NAME = "qwen3-moe-random-8x1024-e32-v1"
MOE_VOCAB = 32000
MOE_PROMPT = [100 + (i * 7919) % (MOE_VOCAB - 200) for i in range(64)]
MOE_WARMUP = 16


def smollm2_4bit_dir() -> Path:
    """The same directory the tests use (tests/conftest.py smollm2_4bit_dir), made once."""
    from tests.quant_models import convert_quantized

    return convert_quantized(smollm2_f32_dir(), CACHE / "models" / "smollm2-135m-4bit-g64")


# ---- the 24 architectures --------------------------------------------------------------------


def arch_models(archs: tuple[str, ...]) -> dict[str, tuple[Path, list[int]]]:
    """Each architecture's tiny model and mlx-lm's greedy ids, in the tests' cache (the key is
    tests/test_mlxlm_engine.py's: built there or here, each is built once per machine)."""
    import mlx_lm

    from tests.tiny_archs import make_arch_model

    key = hashlib.sha256((Path(__file__).parents[1] / "tests" / "tiny_archs.py").read_bytes()
                         + mlx_lm.__version__.encode()).hexdigest()[:12]
    tokenizer_dir = smollm2_f32_dir(TEST_CACHE)
    return {arch: make_arch_model(TEST_CACHE / "models" / f"tiny-{arch}-{key}", arch,
                                  tokenizer_dir) for arch in archs}


def expected_texts(models: dict[str, tuple[Path, list[int]]]) -> dict[str, str]:
    """mlx-lm's detokenized greedy ids, as mlx-lm's generate and server stream them: its
    streaming detokenizer (which drops the first token's leading space, as flock does; a plain
    `decode` keeps it)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    texts = {}
    for arch, (directory, ids) in models.items():
        detokenizer = load_tokenizer(directory).detokenizer
        detokenizer.reset()
        for token in ids:
            detokenizer.add_token(token)
        detokenizer.finalize()
        texts[arch] = detokenizer.text
    return texts


def complete(client: httpx.Client, model: str) -> tuple[str | None, str]:
    """A greedy 32-token raw completion of the fixed prompt's ids: (its text, or None, and why)."""
    from tests.tiny_archs import GREEDY_TOKENS, PROMPT

    try:
        response = client.post("/v1/completions", json={
            "model": model, "prompt": PROMPT, "max_tokens": GREEDY_TOKENS, "temperature": 0})
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return None, f"HTTP {response.status_code}: {response.text[:300]}"
    body = response.json()
    tokens = body["usage"]["completion_tokens"]
    if tokens != GREEDY_TOKENS:
        return None, f"{tokens} tokens ({body['choices'][0]['finish_reason']})"
    return body["choices"][0]["text"], ""


def instance_key(model: str) -> str:
    """The id the controller gives an on-demand instance (`ClusterController.request_instance`)."""
    key = "".join(c if c.isalnum() else "-" for c in model.lower()).strip("-") or "model"
    return f"auto-{key}-0"


def frobnicator_dir(root: Path, template: Path) -> Path:
    """A model directory like `template` (its weights linked) whose architecture nobody runs."""
    from tests.cluster_tools import link_files

    out = root / "frobnicator"
    out.mkdir(parents=True, exist_ok=True)
    link_files(template, out)
    (out / "config.json").unlink()  # a link to the template's: written anew, not through it
    config = json.loads((template / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    return out


def single_node_figures(models: dict[str, tuple[Path, list[int]]], want: dict[str, str],
                        unknown_rounds: int) -> tuple[dict[str, str], list[float], list[int]]:
    """(arch -> "" when identical else why, unknown-architecture error times in ms, statuses)."""
    failing: dict[str, str] = {}
    times: list[float] = []
    statuses: list[int] = []
    with tempfile.TemporaryDirectory(prefix="flock-bench-models-") as tmp:
        agent = bench_agent(Path(tmp) / "agent", None, timeout=300)
        try:
            with httpx.Client(base_url=agent.url, timeout=600, trust_env=False) as client:
                for arch, (directory, _) in models.items():
                    started = time.monotonic()
                    text, why = complete(client, str(directory))
                    if text is not None and text != want[arch]:
                        why = f"text differs: {text[:80]!r} vs mlx-lm {want[arch][:80]!r}"
                    failing[arch] = why
                    print(f"# single {arch}: {why or 'ok'} "
                          f"({time.monotonic() - started:.1f}s)", flush=True)
                    client.delete(f"/cluster/instances/{instance_key(str(directory))}")
                template = next(iter(models.values()))[0]
                frob = frobnicator_dir(Path(tmp), template)
                for _ in range(unknown_rounds):
                    began = time.perf_counter()
                    response = client.post("/v1/chat/completions", json={
                        "model": str(frob), "max_tokens": 8,
                        "messages": [{"role": "user", "content": "Hello"}]})
                    times.append((time.perf_counter() - began) * 1000)
                    statuses.append(response.status_code)
                print(f"# unknown architecture answer: {response.text[:200]}", flush=True)
        finally:
            agent.stop()
    return failing, times, statuses


def pipeline_figures(models: dict[str, tuple[Path, list[int]]],
                     want: dict[str, str]) -> dict[str, str]:
    """arch -> "" when a 2-stage pipeline instance of it gives mlx-lm's text, else why."""
    from agent.models.store import ModelStore
    from tests.cluster_tools import LoopbackCluster, link_files

    failing: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="flock-bench-models-pipe-") as tmp:
        root = Path(tmp)
        store = ModelStore(root / "store")
        for arch, (directory, _) in models.items():
            def build(out: Path, source: Path = directory) -> None:
                link_files(source, out)

            store.add(f"tiny-{arch.replace('_', '-')}", build, source=f"path:{directory}",
                      dtype="float32")
        cluster = LoopbackCluster(root=root, models_dir=root / "store")
        try:
            agents = [cluster.start(f"n{i}") for i in range(2)]
            cluster.wait_up(timeout=180)
            with httpx.Client(base_url=agents[0].url, timeout=600, trust_env=False) as client:
                for arch in models:
                    name = f"tiny-{arch.replace('_', '-')}"
                    started = time.monotonic()
                    placed = client.post("/cluster/instances",
                                         json={"model": name, "strategy": "pipeline"})
                    if placed.status_code != 201:
                        failing[arch] = f"placement HTTP {placed.status_code}: {placed.text}"
                        continue
                    try:
                        cluster.wait_serving(agents[0], name, nodes=2, timeout=180)
                        text, why = complete(client, name)
                        if text is not None and text != want[arch]:
                            why = f"text differs: {text[:80]!r} vs mlx-lm {want[arch][:80]!r}"
                    except AssertionError as exc:
                        why = str(exc).splitlines()[0]
                    failing[arch] = why
                    print(f"# pipeline {arch}: {why or 'ok'} "
                          f"({time.monotonic() - started:.1f}s)", flush=True)
                    client.delete(f"/cluster/instances/{placed.json()['instance_id']}")
        finally:
            cluster.close()
    return failing


# ---- quantized checkpoints kept ----------------------------------------------------------------


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_worker(model_dir: str, dtype: str, tokens: int) -> dict[str, Any]:
    """Peak RSS over the RSS before the weights, of a runner's load and a short generation."""
    import mlx.core as mx  # noqa: F401  (imported before the baseline: not the weights' cost)
    import mlx_lm.tokenizer_utils  # noqa: F401

    from agent.generation import GenerationRequest, SamplingParams
    from agent.runtime.protocol import RunnerConfig
    from agent.runtime.runner import load
    from agent.runtime.scheduler import Scheduler

    before = _rss_kb("VmRSS")
    config = RunnerConfig(model_name="m", model_dir=model_dir, dtype=dtype, max_batch=1,
                          context_length=512)
    (decoder, tokenizer, kv, limits, prefix), ready = load(config)
    sched = Scheduler(decoder, tokenizer, kv, limits, lambda event: None, compiled=True,
                      prefix_cache=prefix)
    sched.submit(GenerationRequest(id="r", model="m", prompt_tokens=list(range(10, 74)),
                                   sampling=SamplingParams(max_tokens=tokens, temperature=0.0)))
    while not sched.idle:
        sched.step()
    peak = _rss_kb("VmHWM")
    return {"grown_kb": peak - before, "weight_bytes": ready.weight_bytes, "dtype": ready.dtype}


def kept4bit_figures(rounds: int, tokens: int, env: dict[str, str]) -> None:
    model_dir = str(smollm2_4bit_dir())
    grown = {dtype: call_in_subprocess("bench.models:rss_worker",
                                       {"model_dir": model_dir, "dtype": dtype, "tokens": 32},
                                       env)
             for dtype in ("keep", "float32")}
    for dtype, result in grown.items():
        emit(f"rss_grown_mb_{dtype}", result["grown_kb"] / 1024, 1)
        emit(f"weight_mb_{dtype}", result["weight_bytes"] / 2**20, 1)
    emit("kept4bit_rss_vs_f32", grown["keep"]["grown_kb"] / grown["float32"]["grown_kb"])

    rates: dict[str, list[float]] = {"flock": [], "mlxlm": []}
    ids: dict[str, list[int]] = {}
    workers = {
        "flock": ("bench.decode:flock_worker", {"model_dir": model_dir, "tokens": tokens,
                                                "streams": 1, "optimised": True}),
        "mlxlm": ("bench.decode:mlxlm_worker", {"model_dir": model_dir, "tokens": tokens}),
    }
    for round_index in range(rounds):
        order = list(workers) if round_index % 2 == 0 else list(reversed(workers))
        for name in order:
            target, kwargs = workers[name]
            result = call_in_subprocess(target, kwargs, env)
            rates[name].append(result["tok_s"])
            ids[name] = result["ids"][0] if name == "flock" else result["ids"]
    flock, mlxlm = median(rates["flock"]), median(rates["mlxlm"])
    emit("kept4bit_decode_tok_s_flock", flock)
    emit("kept4bit_decode_tok_s_mlxlm", mlxlm)
    emit("kept4bit_decode_vs_mlxlm", flock / mlxlm)
    # flock's history excludes nothing mlx-lm yields: both start at the first generated token.
    emit("kept4bit_greedy_ids_equal", ids["flock"] == ids["mlxlm"][:len(ids["flock"])])


# ---- the mlx-lm engine's decode (bench.generic_engine's measurement) ---------------------------


def generic_figures(rounds: int, tokens: int, env: dict[str, str]) -> None:
    from bench import generic_engine

    directory = generic_engine.model_dir()
    rates: dict[str, list[float]] = {"mlxlm": [], "flock": []}
    for round_index in range(rounds):
        for name in (["mlxlm", "flock"] if round_index % 2 == 0 else ["flock", "mlxlm"]):
            if name == "mlxlm":
                result = call_in_subprocess("bench.generic_engine:mlxlm_worker",
                                            {"model_dir": str(directory), "tokens": tokens}, env)
            else:
                result = asyncio.run(generic_engine._flock_run(directory, tokens, env))
            rates[name].append(result["tok_s"])
    emit("generic_decode_tok_s_flock", median(rates["flock"]), 1)
    emit("generic_decode_tok_s_mlxlm", median(rates["mlxlm"]), 1)
    emit("generic_decode_vs_mlxlm", median(rates["flock"]) / median(rates["mlxlm"]))


# ---- mixture of experts --------------------------------------------------------------------------


def moe_dir() -> Path:
    """The random qwen3_moe directory (built once, cached). Embeddings are tied and the special
    tokens' rows are zero (their logit is 0, below the largest of 32,000 random ones), so greedy
    decoding never ends early on an end-of-text token."""
    out = CACHE / "models" / MOE_NAME
    if (out / "config.json").exists():
        return out
    from mlx_lm.models import qwen3_moe

    args = qwen3_moe.ModelArgs.from_dict({
        "model_type": "qwen3_moe", "hidden_size": 1024, "num_hidden_layers": 8,
        "intermediate_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 4,
        "head_dim": 64, "num_experts": 32, "num_experts_per_tok": 4,
        "moe_intermediate_size": 512, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": MOE_VOCAB, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": True, "norm_topk_prob": True,
    })
    return save_random_model(qwen3_moe, args, out)


def moe_mlxlm_worker(model_dir: str, tokens: int) -> dict[str, Any]:
    """mlx-lm's own greedy loop on the MoE model: decode tok/s and the ids."""
    from mlx_lm.utils import load_model

    from bench.common import mlxlm_timed_greedy

    model, _ = load_model(Path(model_dir))
    tok_s, ids = mlxlm_timed_greedy(model, MOE_PROMPT, tokens, MOE_WARMUP)
    return {"tok_s": tok_s, "ids": ids}


def moe_interleaved_worker(model_dir: str, steps: int) -> dict[str, float]:
    """Median seconds of one decode step: flock's compiled step with 1 and 8 rows, and
    mlx-lm's model on one row with its KV cache, run in turns in this one process."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from agent.runtime.kv import KvGeometry, KvSlots
    from agent.runtime.model import load_decoder
    from agent.runtime.step import make_decode_fn

    model, _ = load_model(Path(model_dir))
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([MOE_PROMPT]), cache=cache))
    dec = load_decoder(Path(model_dir), dtype=mx.float32)
    runs: dict[str, Any] = {}
    for rows in (1, 8):
        kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
        for row in range(rows):
            kv.acquire(str(row), len(MOE_PROMPT) + steps + 1)
        runs[f"flock{rows}"] = (make_decode_fn(dec, compiled=True), kv,
                                mx.array([100 + 7 * r for r in range(rows)]))
    times: dict[str, list[float]] = {name: [] for name in (*runs, "mlxlm")}
    for index in range(steps + 2):  # the first two compile and warm up
        position = len(MOE_PROMPT) + index
        for name, (step, kv, tokens) in runs.items():
            began = time.perf_counter()
            # Handing the KV arrays over, as the runner does (LocalCompute): the step writes
            # the new keys and values in place instead of copying every layer's cache.
            mx.eval(kv.step_in_place(step, tokens, mx.full(tokens.shape, position)))
            times[name].append(time.perf_counter() - began)
        began = time.perf_counter()
        mx.eval(model(mx.array([[100]]), cache=cache))
        times["mlxlm"].append(time.perf_counter() - began)
    return {name: median(values[2:]) for name, values in times.items()}


async def _one_stream(runner: Any, rid: str, max_tokens: int, firsts: list[float],
                      after_all: list[int], index: int, streams: int) -> list[int]:
    """One greedy stream of MOE_PROMPT: its ids; stamps its first token in `firsts` and counts
    in `after_all[index]` the tokens it got once all `streams` had their first."""
    from agent.generation import GenerationRequest, SamplingParams, TokenChunk

    request = GenerationRequest(id=rid, model="moe", prompt_tokens=MOE_PROMPT,
                                sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))
    ids: list[int] = []
    async for event in runner.generate(request):
        if isinstance(event, TokenChunk) and event.token_ids:
            if not ids:
                firsts.append(time.perf_counter())
            elif len(firsts) == streams:
                after_all[index] += len(event.token_ids)
            ids += event.token_ids
    return ids


async def _runner_streams(directory: Path, tokens: int, counts: list[int],
                          env: dict[str, str]) -> dict[int, tuple[float, list[int]]]:
    """streams -> (aggregate decode tok/s, the first stream's ids) through one runner process:
    for each count, that many concurrent greedy streams (after a warm-up of as many), timed by
    the client from the moment every stream has its first token to the last one's end."""
    from agent.runtime.client import RunnerProcess
    from agent.runtime.protocol import RunnerConfig

    # Plain decode: drafting (its own bench, bench/speculative.py) would turn 8-row steps into
    # 8 x width verify steps, which is not the batched decode these figures are about.
    runner = RunnerProcess(RunnerConfig(model_name="moe", model_dir=str(directory),
                                        prompt_lookup=False), env)
    await runner.start(timeout=600)
    out: dict[int, tuple[float, list[int]]] = {}
    try:
        for streams in counts:
            firsts: list[float] = []
            after_all = [0] * streams
            await asyncio.gather(*(_one_stream(runner, f"w{streams}-{i}", MOE_WARMUP, [],
                                               [0] * streams, i, streams)
                                   for i in range(streams)))
            runs = await asyncio.gather(*(_one_stream(runner, f"r{streams}-{i}", tokens,
                                                      firsts, after_all, i, streams)
                                          for i in range(streams)))
            ended = time.perf_counter()
            out[streams] = (sum(after_all) / (ended - max(firsts)), runs[0])
    finally:
        await runner.stop()
    return out


def moe_figures(rounds: int, tokens: int, env: dict[str, str]) -> None:
    began = time.monotonic()
    directory = moe_dir()
    emit("moe_build_or_cache_s", time.monotonic() - began, 1)
    emit("moe_weight_mb", sum(f.stat().st_size for f in directory.glob("*.safetensors"))
         / 2**20, 0)
    flock: dict[int, list[float]] = {1: [], 8: []}
    mlxlm: list[float] = []
    want: list[int] = []
    flock_ids: list[int] = []
    same = True
    for round_index in range(rounds):
        for name in (["mlxlm", "flock"] if round_index % 2 == 0 else ["flock", "mlxlm"]):
            if name == "mlxlm":
                result = call_in_subprocess("bench.models:moe_mlxlm_worker",
                                            {"model_dir": str(directory), "tokens": tokens}, env)
                mlxlm.append(result["tok_s"])
                want = result["ids"]
            else:
                got = asyncio.run(_runner_streams(directory, tokens, [1, 8], env))
                for streams, (rate, _) in got.items():
                    flock[streams].append(rate)
                flock_ids = got[1][1]
        same = same and flock_ids == want
    emit("moe_decode_tok_s_flock", median(flock[1]), 1)
    emit("moe_decode_tok_s_mlxlm", median(mlxlm), 1)
    emit("moe_batch8_decode_tok_s_flock", median(flock[8]), 1)
    emit("moe_greedy_ids_identical", same)
    emit("moe_decode_vs_mlxlm", median(flock[1]) / median(mlxlm))
    emit("moe_batch8_vs_1", median(flock[8]) / median(flock[1]))
    step = call_in_subprocess("bench.models:moe_interleaved_worker",
                              {"model_dir": str(directory), "steps": tokens // 2}, env)
    emit("moe_step_ms_flock", 1000 * step["flock1"], 1)
    emit("moe_step_ms_mlxlm", 1000 * step["mlxlm"], 1)
    emit("moe_batch8_step_ms_flock", 1000 * step["flock8"], 1)
    emit("moe_step_vs_mlxlm_interleaved", step["mlxlm"] / step["flock1"])
    emit("moe_batch8_step_vs_1_interleaved", 8 * step["flock1"] / step["flock8"])


# ---- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each decode figure")
    parser.add_argument("--tokens", type=int, default=128, help="decoded tokens per run")
    parser.add_argument("--quick", action="store_true",
                        help="one round of 48 tokens per decode figure: a few minutes in all")
    parser.add_argument("--skip-moe", action="store_true",
                        help="leave out the MoE figures (a 1.8 GB model built and loaded twice)")
    parser.add_argument("--skip-pipeline", action="store_true",
                        help="leave out the 2-node cluster (archs_pipeline_identical)")
    parser.add_argument("--only", nargs="+", choices=("archs", "kept4bit", "generic", "moe"),
                        default=("archs", "kept4bit", "generic", "moe"),
                        help="which groups of figures to run")
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=ARCHS,
                        help="a subset of the architectures (archs_total stays 24)")
    args = parser.parse_args()
    rounds, tokens = (1, 48) if args.quick else (args.rounds, args.tokens)
    began = time.monotonic()
    warn_if_busy()
    env, threads = runner_env(gemv=True)
    emit("openblas_threads", threads)
    pressure = cpu_pressure()
    emit("cpu_pressure_avg60_start", pressure if pressure is not None else "n/a", 1)

    if "archs" in args.only:
        models = arch_models(tuple(args.archs))
        want = expected_texts(models)
        print("# compared: the API's completion text (32 tokens) against mlx-lm's greedy ids "
              "through mlx-lm's streaming detokenizer; the OpenAI API returns text, not ids",
              flush=True)
        single, times, statuses = single_node_figures(models, want, unknown_rounds=5)
        identical = [a for a in args.archs if not single[a]]
        emit("archs_total", len(ARCHS))
        emit("archs_identical", len(identical))
        emit("archs_failing", ",".join(a for a in args.archs if single[a]) or "none")
        emit("unknown_arch_status", ",".join(str(s) for s in sorted(set(statuses))))
        emit("unknown_arch_error_ms", statistics.median(times), 0)
        if args.skip_pipeline:
            print("# archs_pipeline_identical: skipped (--skip-pipeline)", flush=True)
        else:
            print("# archs_pipeline_identical: 2 loopback agents, POST /cluster/instances "
                  "strategy pipeline, of the single-node identical ones", flush=True)
            piped = pipeline_figures({a: models[a] for a in identical}, want)
            emit("archs_pipeline_identical", sum(1 for a in identical if not piped[a]))
            emit("archs_pipeline_failing",
                 ",".join(a for a in identical if piped[a]) or "none")
    if "kept4bit" in args.only:
        kept4bit_figures(rounds, tokens, env)
    if "generic" in args.only:
        generic_figures(rounds, tokens, env)
    if "moe" in args.only:
        if args.skip_moe:
            print("# moe figures skipped (--skip-moe): building the 1.8 GB model and loading "
                  "it in two processes does not fit this run", flush=True)
        else:
            moe_figures(rounds, tokens, env)
    pressure = cpu_pressure()
    emit("cpu_pressure_avg60_end", pressure if pressure is not None else "n/a", 1)
    emit("bench_seconds", time.monotonic() - began, 0)


if __name__ == "__main__":
    main()
