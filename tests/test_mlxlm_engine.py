"""The mlx-lm engine: architectures flock's decoder does not implement, served through mlx-lm's
own modules by the same scheduler, give mlx-lm's greedy ids and batch concurrent requests."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import msgspec
import pytest

from agent.generation import Finished, GenerationRequest, SamplingParams, TokenChunk
from agent.models import arch as arch_registry
from agent.runtime.client import RunnerProcess
from agent.runtime.environment import runner_environment
from agent.runtime.protocol import RunnerConfig
from agent.runtime.runner import choose_engine
from agent.settings import NodeSettings
from tests.conftest import TEST_CACHE
from tests.scheduler_tools import ending, finished, run_all, tokens_of
from tests.test_runner_process import collect
from tests.tiny_archs import BUILDERS, GREEDY_TOKENS, PROMPT, make_arch_model, mlxlm_greedy
from tests.tiny_models import make_tiny_model

# The tiny models of BUILDERS that the registry sends to mlx-lm's engine: gpt_oss (built there
# too, as mlx-lm's module makes it) runs on flock's own decoder now (tests/test_gpt_oss.py).
MLX_LM_ENGINE_ARCHS = sorted(a for a in BUILDERS
                             if a not in arch_registry.FLOCK_DECODER_ARCHITECTURES)
OTHER_PROMPT = [*PROMPT[3:], 77, 88, 99, 111, 222]  # another length: rows at other positions
_KEY = hashlib.sha256((Path(__file__).parent / "tiny_archs.py").read_bytes()
                      + mlx_lm.__version__.encode()).hexdigest()[:12]


def arch_dir(arch: str, smollm2_dir: Path) -> tuple[Path, list[int]]:
    """The tiny model of `arch` and mlx-lm's greedy ids for PROMPT (built once per machine)."""
    return make_arch_model(TEST_CACHE / "models" / f"tiny-{arch}-{_KEY}", arch, smollm2_dir)


def greedy(rid: str, prompt: list[int], max_tokens: int = GREEDY_TOKENS) -> GenerationRequest:
    return GenerationRequest(id=rid, model="m", prompt_tokens=prompt,
                             sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0))


def mlxlm_ids(model_dir: Path, prompt: list[int]) -> list[int]:
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    return mlxlm_greedy(model, prompt, GREEDY_TOKENS)[0]



async def assert_greedy_and_batched(head: RunnerProcess, expected: list[int],
                                    other_expected: list[int]) -> None:
    """mlx-lm's greedy ids alone and for two concurrent requests, which one decode step
    computed together (not one after the other)."""
    ids, end = await collect(head, greedy("solo", PROMPT))
    assert isinstance(end, Finished) and end.reason == "length"
    assert ids == expected
    (a, end_a), (b, end_b) = await asyncio.gather(
        collect(head, greedy("a", PROMPT)), collect(head, greedy("b", OTHER_PROMPT)))
    assert isinstance(end_a, Finished) and isinstance(end_b, Finished)
    assert a == expected and b == other_expected
    deadline = time.monotonic() + 10
    while head.last_stats.get("generated_tokens_total", 0) < 3 * GREEDY_TOKENS:
        assert time.monotonic() < deadline, head.last_stats
        await asyncio.sleep(0.05)
    assert head.last_stats["decode_rows_max"] == 2

def test_flock_families_stay_on_flocks_decoder() -> None:
    for arch in ("llama", "mistral", "qwen2", "qwen3"):
        assert choose_engine({"model_type": arch}) == "flock"
    for arch in MLX_LM_ENGINE_ARCHS:
        assert choose_engine({"model_type": arch}) == "mlx-lm", arch
    # mlx-lm's own remapping counts (kimi_k2 loads as deepseek_v3) ...
    assert choose_engine({"model_type": "kimi_k2"}) == "mlx-lm"
    # ... and what nobody runs goes to flock's decoder, whose refusal names what is supported.
    assert choose_engine({"model_type": "no_such_arch"}) == "flock"
    assert choose_engine({"model_type": "../etc"}) == "flock"


@pytest.mark.parametrize("arch", MLX_LM_ENGINE_ARCHS)
def test_runner_serves_arch_with_mlxlm_greedy_ids_and_batches(
        arch: str, smollm2_dir: Path, tmp_path: Path) -> None:
    model_dir, expected = arch_dir(arch, smollm2_dir)
    other_expected = mlxlm_ids(model_dir, OTHER_PROMPT)
    env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state"))
    runner = RunnerProcess(RunnerConfig(model_name=arch, model_dir=str(model_dir),
                                        stats_interval_s=0.05), env)

    async def main() -> None:
        ready = await runner.start(timeout=180)
        assert ready.engine == "mlx-lm"
        assert ready.kv_bytes_per_token > 0
        try:
            await assert_greedy_and_batched(runner, expected, other_expected)
        finally:
            await runner.stop()

    asyncio.run(main())


def test_flock_decoder_says_so_in_ready(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "llama")
    env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state"))
    runner = RunnerProcess(RunnerConfig(model_name="tiny", model_dir=str(model_dir)), env)

    async def main() -> None:
        ready = await runner.start(timeout=120)
        await runner.stop()
        assert ready.engine == "flock"

    asyncio.run(main())


# ---- the scheduler driving the engine in this process -------------------------------------

def scheduler_for(model_dir: Path, *, budget: int = 64 << 20, prefix: bool = True,
                  max_batch: int = 16) -> tuple[object, list]:
    from agent.runtime.mlxlm_engine import load_for_runner
    from agent.runtime.scheduler import Scheduler

    config = RunnerConfig(model_name="m", model_dir=str(model_dir), kv_budget_bytes=budget,
                          max_batch=max_batch)
    (model, tokenizer, slots, limits, cache, compute), _ = load_for_runner(
        config, lambda *_: budget)
    events: list = []
    sched = Scheduler(model, tokenizer, slots, limits, events.append,
                      prefix_cache=cache if prefix else None, compute=compute)
    return sched, events


def test_prefix_cache_reuses_a_conversation_on_the_mlxlm_engine(smollm2_dir: Path) -> None:
    model_dir, expected = arch_dir("qwen3_moe", smollm2_dir)
    sched, events = scheduler_for(model_dir)
    assert sched.prefix is not None  # plain KV caches: reusable
    sched.submit(greedy("turn1", PROMPT))
    run_all(sched)
    assert tokens_of(events, "turn1") == expected
    turn2 = [*PROMPT, *expected, 500, 600, 700]
    sched.submit(greedy("turn2", turn2))
    run_all(sched)
    reused = finished(events, "turn2").usage.cached_tokens
    assert reused >= len(PROMPT) + len(expected) - 1
    fresh, fresh_events = scheduler_for(model_dir, prefix=False)
    fresh.submit(greedy("turn2", turn2))
    run_all(fresh)
    assert tokens_of(events, "turn2") == tokens_of(fresh_events, "turn2")


def test_recurrent_and_sliding_caches_skip_prefix_reuse(smollm2_dir: Path) -> None:
    for arch in ("lfm2", "gemma3_text"):
        sched, _ = scheduler_for(arch_dir(arch, smollm2_dir)[0])
        assert sched.prefix is None, arch


def test_kv_budget_counts_the_caches_real_bytes(smollm2_dir: Path) -> None:
    model_dir, expected = arch_dir("phi3", smollm2_dir)
    probe, _ = scheduler_for(model_dir)
    per_token = probe.kv.geometry.bytes_per_token  # type: ignore[attr-defined]
    # Room for one sequence of 48 tokens (and the cache's 256-position growth step), not two:
    # the second waits, then runs alone.
    budget = per_token * (48 + 256) * 3 // 2
    sched, events = scheduler_for(model_dir, budget=budget)
    sched.submit(greedy("a", PROMPT))
    sched.submit(greedy("b", PROMPT))
    peak = 0
    for _ in range(500):
        if sched.idle:
            break
        sched.step()
        peak = max(peak, sched.kv.allocated_bytes)
        caches = [c for s in sched.kv.solo if s for c in s] + (sched.kv.batch or [])
        assert sched.kv.allocated_bytes == sum(c.nbytes for c in caches)
    assert sched.idle and 0 < peak <= budget
    assert tokens_of(events, "a") == tokens_of(events, "b") == expected
    assert sched.stats.decode_rows_max == 1
    # A request that can never fit is refused at once.
    sched.submit(greedy("huge", PROMPT, max_tokens=1000))
    assert ending(events, "huge").code == "bad_request"  # type: ignore[union-attr]


@pytest.mark.parametrize("arch", ["gemma3_text", "lfm2", "deepseek_v3"])
def test_rows_join_and_leave_the_batch_without_disturbing_others(
        arch: str, smollm2_dir: Path) -> None:
    """Sliding-window, recurrent and latent-attention caches: a row cancelled mid-batch leaves
    (filter), a later one joins the shrunk batch (extend), and every survivor's ids stay
    mlx-lm's own."""
    model_dir, expected = arch_dir(arch, smollm2_dir)
    third = [*PROMPT[:9], 4321, 1234]
    want_b, want_c = mlxlm_ids(model_dir, OTHER_PROMPT), mlxlm_ids(model_dir, third)
    sched, events = scheduler_for(model_dir)
    sched.submit(greedy("a", PROMPT))
    sched.submit(greedy("gone", PROMPT))
    for _ in range(4):
        sched.step()
    sched.submit(greedy("b", OTHER_PROMPT))
    for _ in range(4):
        sched.step()
    sched.cancel("gone")
    for _ in range(3):
        sched.step()
    sched.submit(greedy("c", third))
    run_all(sched)
    assert finished(events, "gone").reason == "cancelled"
    assert tokens_of(events, "a") == expected
    assert tokens_of(events, "b") == want_b
    assert tokens_of(events, "c") == want_c
    assert sched.stats.decode_rows_max == 3


def test_sampling_logprobs_and_stop_ids_work_on_the_mlxlm_engine(smollm2_dir: Path) -> None:
    model_dir, expected = arch_dir("mixtral", smollm2_dir)
    sampled = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.8, top_k=40, seed=7)
    cut = next(i for i in range(3, GREEDY_TOKENS) if expected[i] not in expected[:i])
    runs = []
    for _ in range(2):
        sched, events = scheduler_for(model_dir)
        sched.submit(GenerationRequest(id="s", model="m", prompt_tokens=PROMPT,
                                       sampling=sampled))
        sched.submit(GenerationRequest(id="g", model="m", prompt_tokens=PROMPT, sampling=(
            SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, logprobs=True,
                           top_logprobs=2, stop_token_ids=(expected[cut],)))))
        run_all(sched)
        runs.append(tokens_of(events, "s"))
        # Greedy with logprobs: the chosen token is the top one; the stop id ends it there.
        assert tokens_of(events, "g") == expected[:cut]
        assert finished(events, "g").reason == "stop"
        chunks = [e for e in events if isinstance(e, TokenChunk) and e.id == "g" and e.logprobs]
        assert chunks and all(c.logprobs[0].top[0].token_id == c.token_ids[-1] for c in chunks)
    assert runs[0] == runs[1] and len(runs[0]) == GREEDY_TOKENS  # seeded: reproducible


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_tensor_parallel_through_the_models_own_shard(
        arch: str, smollm2_dir: Path, tmp_path: Path) -> None:
    """Two ranks, each with the model cut by mlx-lm's shard(): mlx-lm's greedy ids, and two
    concurrent requests still decode in one step on both ranks."""
    from tests.test_pipeline import start_all, tensor_configs

    model_dir, expected = arch_dir(arch, smollm2_dir)
    other_expected = mlxlm_ids(model_dir, OTHER_PROMPT)

    async def main() -> None:
        configs = [msgspec.structs.replace(c, stats_interval_s=0.05)
                   for c in tensor_configs(model_dir, 2)]
        runners = await start_all(configs, tmp_path)
        head = runners[0]
        try:
            # Each rank holds its shard: the layers' heads and experts are split in two (the
            # embedding and the head, most of a tiny model, are not).
            tensors = mx.load(str(model_dir / "model.safetensors"))
            whole = sum(a.nbytes for a in tensors.values())
            layers = sum(a.nbytes for k, a in tensors.items() if k.startswith("model.layers."))
            assert all(r.ready and r.ready.weight_bytes < whole - layers // 4 for r in runners)
            assert all(r.ready and r.ready.engine == "mlx-lm" for r in runners)
            await assert_greedy_and_batched(head, expected, other_expected)
        finally:
            for runner in runners:
                await runner.stop()

    asyncio.run(main())


def test_tensor_parallel_is_refused_by_name_without_shard(smollm2_dir: Path,
                                                          tmp_path: Path) -> None:
    from agent.runtime.client import RunnerStartError
    from tests.test_pipeline import start_all, tensor_configs

    model_dir, _ = arch_dir("phi3", smollm2_dir)

    async def main() -> None:
        with pytest.raises(RunnerStartError, match=r"phi3.*shard"):
            await start_all(tensor_configs(model_dir, 2), tmp_path)

    asyncio.run(main())
