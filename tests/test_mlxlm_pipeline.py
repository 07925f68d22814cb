"""Pipeline stages on the mlx-lm engine: two runner processes on loopback, each holding a slice of
an mlx-lm model's layer list, give mlx-lm's own greedy ids, alone and for concurrent requests."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import shutil
import signal
import time
from pathlib import Path

import mlx.core as mx
import msgspec
import pytest
from mlx.utils import tree_flatten

from agent.generation import Failed, Finished, TokenChunk
from agent.models import arch
from agent.runtime.client import RunnerProcess
from agent.runtime.environment import runner_environment
from agent.runtime.mlxlm_pipeline import SLICEABLE_MODULES, check_sliceable
from agent.runtime.model import UnsupportedModel
from agent.settings import NodeSettings
from tests.conftest import TEST_CACHE
from tests.test_mlxlm_engine import (
    _KEY,
    MLX_LM_ENGINE_ARCHS,
    OTHER_PROMPT,
    arch_dir,
    assert_greedy_and_batched,
    greedy,
)
from tests.test_pipeline import pipeline_configs
from tests.test_runner_process import collect
from tests.tiny_archs import (
    BUILDERS,
    GREEDY_TOKENS,
    MIN_DISTINCT,
    MIN_GAP,
    PERTURB,
    PROMPT,
    SPECIAL_IDS,
    TOKENIZER_FILES,
    mlxlm_greedy,
)


def test_every_tiny_architecture_is_sliceable_and_others_are_refused_by_name() -> None:
    assert set(BUILDERS) <= SLICEABLE_MODULES  # all 20 pass the test below
    for name in BUILDERS:
        assert "pipeline" in arch.architecture({"model_type": name}).strategies, name
    with pytest.raises(UnsupportedModel, match=r"'mamba'.*supported: cohere"):
        check_sliceable({"model_type": "mamba"}, "mamba")
    assert "pipeline" not in arch.architecture({"model_type": "mamba"}).strategies


def make_gemma3_wrapper(smollm2_dir: Path) -> tuple[Path, list[int]]:
    """gemma3_text's tiny model inside mlx-lm's gemma3 module: a config with its dimensions
    under `text_config` (built once per machine, like tiny_archs' models)."""
    from mlx_lm.models import gemma3
    from mlx_lm.utils import save_config, save_model

    directory = TEST_CACHE / "models" / f"tiny-gemma3-wrapper-{_KEY}"
    done = directory / "flock-expected.json"
    if done.exists():
        return directory, json.loads(done.read_text())["ids"]
    text = {k: v for k, v in dataclasses.asdict(BUILDERS["gemma3_text"]()).items()
            if v is not None}
    config = {"model_type": "gemma3", "vocab_size": text["vocab_size"], "text_config": text}
    mx.random.seed(3)
    model = gemma3.Model(gemma3.ModelArgs.from_dict(config))
    model.load_weights([(k, v + PERTURB * mx.random.normal(v.shape).astype(v.dtype))
                        for k, v in tree_flatten(model.parameters())], strict=False)
    mx.eval(model.parameters())
    ids, gap = mlxlm_greedy(model, PROMPT, GREEDY_TOKENS)
    assert gap > MIN_GAP and not set(ids) & SPECIAL_IDS and len(set(ids)) >= MIN_DISTINCT
    save_model(directory, model)
    save_config({**config, "eos_token_id": 2}, directory / "config.json")
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, directory / name)
    done.write_text(json.dumps({"ids": ids}))
    return directory, ids


def run_pipeline(name: str, smollm2_dir: Path, tmp_path: Path,
                 cuts: list[float] | None = None) -> None:
    """Serve `name` split at `cuts` (shares of its layers; default one cut in the middle) and
    check mlx-lm's greedy ids, alone and for two concurrent requests."""
    from mlx_lm.utils import load_model

    if name == "gemma3":
        model_dir, expected = make_gemma3_wrapper(smollm2_dir)
    else:
        model_dir, expected = arch_dir(name, smollm2_dir)
    model, _ = load_model(model_dir)
    other_expected = mlxlm_greedy(model, OTHER_PROMPT, GREEDY_TOKENS)[0]
    whole = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    layers = len(model.layers)
    del model
    bounds = [0, *(round(c * layers) for c in cuts or [0.5]), layers]
    splits = list(itertools.pairwise(bounds))
    configs = pipeline_configs(model_dir, splits, stats_interval_s=0.05)
    env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state", blas_threads=1))
    runners = [RunnerProcess(c, env) for c in configs]

    async def main() -> None:
        try:
            readies = await asyncio.gather(*(r.start(timeout=180) for r in runners))
            # Each stage holds its slice only: together, the whole model once.
            assert {r.engine for r in readies} == {"mlx-lm"}
            assert all(r.weight_bytes < whole / 2 for r in readies[1:])
            assert sum(r.weight_bytes for r in readies) == whole
            head = runners[0]
            await assert_greedy_and_batched(head, expected, other_expected)
        finally:
            for runner in runners:
                await runner.stop()

    asyncio.run(main())


@pytest.mark.parametrize("name", [*MLX_LM_ENGINE_ARCHS, "gemma3"])
def test_two_stage_pipeline_gives_mlxlm_greedy_ids(name: str, smollm2_dir: Path,
                                                   tmp_path: Path) -> None:
    run_pipeline(name, smollm2_dir, tmp_path)


@pytest.mark.parametrize("name", ["qwen3_next", "nemotron_h"])
def test_three_stages_of_mixed_layer_kinds(name: str, smollm2_dir: Path,
                                           tmp_path: Path) -> None:
    """A middle stage, and one-layer stages (nemotron_h's last holds a MoE block only: no cache
    of its own, its masks come from the stand-ins' caches)."""
    run_pipeline(name, smollm2_dir, tmp_path, cuts=[0.25, 0.75])


def test_killing_a_follower_fails_the_stream_within_seconds(smollm2_dir: Path,
                                                            tmp_path: Path) -> None:
    model_dir, _ = arch_dir("olmo2", smollm2_dir)
    configs = pipeline_configs(model_dir, [(0, 1), (1, 2)], link_timeout_s=3.0)
    env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state", blas_threads=1))
    runners = [RunnerProcess(c, env) for c in configs]

    async def main() -> None:
        try:
            await asyncio.gather(*(r.start(timeout=180) for r in runners))
            head, follower = runners
            stream = head.generate(greedy("long", PROMPT, 1500))
            assert isinstance(await anext(stream), TokenChunk)
            assert follower.pid is not None
            os.kill(follower.pid, signal.SIGKILL)
            killed = time.monotonic()
            last = None
            async for event in stream:
                last = event
            assert isinstance(last, Failed) and "stage" in last.message
            assert time.monotonic() - killed < 5.0
        finally:
            for runner in runners:
                await runner.stop()

    asyncio.run(main())


@pytest.mark.parametrize("name", ["gemma3_text", "lfm2", "deepseek_v3"])
def test_rows_join_and_leave_the_pipelines_batch(name: str, smollm2_dir: Path,
                                                 tmp_path: Path) -> None:
    """Sliding-window, recurrent and latent-attention caches on both stages: a row cancelled
    mid-stream leaves the batch (filter), later ones join it (extend), and every survivor's ids
    stay mlx-lm's own (the followers replayed the same merges and filters)."""
    from mlx_lm.utils import load_model

    model_dir, expected = arch_dir(name, smollm2_dir)
    third = [*PROMPT[:9], 4321, 1234]
    model, _ = load_model(model_dir)
    want_b = mlxlm_greedy(model, OTHER_PROMPT, GREEDY_TOKENS)[0]
    want_c = mlxlm_greedy(model, third, GREEDY_TOKENS)[0]
    layers = len(model.layers)
    del model
    configs = pipeline_configs(model_dir, [(0, layers // 2), (layers // 2, layers)])
    env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state", blas_threads=1))
    runners = [RunnerProcess(c, env) for c in configs]

    async def main() -> None:
        try:
            await asyncio.gather(*(r.start(timeout=180) for r in runners))
            head = runners[0]
            gone = head.generate(greedy("gone", PROMPT))
            assert isinstance(await anext(gone), TokenChunk)
            a_ids: list[int] = []
            later: list[asyncio.Task[tuple[list[int], object]]] = []
            async for event in head.generate(greedy("a", PROMPT)):
                if not isinstance(event, TokenChunk):
                    assert isinstance(event, Finished)
                    break
                a_ids += event.token_ids
                if len(a_ids) >= 2 and not later:
                    later.append(asyncio.create_task(collect(head, greedy("b", OTHER_PROMPT))))
                elif len(a_ids) >= 6 and len(later) == 1:
                    await gone.aclose()  # cancels it in the runner: its row leaves the batch
                    later.append(asyncio.create_task(collect(head, greedy("c", third))))
            (b_ids, end_b), (c_ids, end_c) = await asyncio.gather(*later)
            assert isinstance(end_b, Finished) and isinstance(end_c, Finished)
            assert a_ids == expected and b_ids == want_b and c_ids == want_c
        finally:
            for runner in runners:
                await runner.stop()

    asyncio.run(main())


def test_the_head_admits_by_the_tightest_stage(smollm2_dir: Path, tmp_path: Path) -> None:
    """A follower whose budget holds one sequence (with mlx-lm's 256-position growth step) but
    not two: the head learns it at start-up, so the second request waits instead of the
    follower's caches outgrowing its budget; both still get mlx-lm's ids."""
    model_dir, expected = arch_dir("olmo2", smollm2_dir)
    configs = pipeline_configs(model_dir, [(0, 1), (1, 2)], stats_interval_s=0.05)
    configs[1] = msgspec.structs.replace(configs[1], kv_budget_bytes=200_000)
    env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state", blas_threads=1))
    runners = [RunnerProcess(c, env) for c in configs]

    async def main() -> None:
        try:
            head_ready, follower_ready = await asyncio.gather(
                *(r.start(timeout=180) for r in runners))
            assert follower_ready.kv_budget_bytes == 200_000
            # The head counts the follower's bytes scaled to its own budget.
            scale = head_ready.kv_budget_bytes / 200_000
            assert head_ready.kv_bytes_per_token >= follower_ready.kv_bytes_per_token * scale
            head = runners[0]
            (a, end_a), (b, end_b) = await asyncio.gather(
                collect(head, greedy("a", PROMPT)), collect(head, greedy("b", PROMPT)))
            assert isinstance(end_a, Finished) and isinstance(end_b, Finished)
            assert a == b == expected
            deadline = time.monotonic() + 10
            while head.last_stats.get("generated_tokens_total", 0) < 2 * GREEDY_TOKENS:
                assert time.monotonic() < deadline, head.last_stats
                await asyncio.sleep(0.05)
            assert head.last_stats["decode_rows_max"] == 1
        finally:
            for runner in runners:
                await runner.stop()

    asyncio.run(main())
