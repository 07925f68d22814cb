"""The optimised BLAS changes speed, not answers: greedy SmolLM2 output is identical with the
shim interposed (sgemv fast path on) and with MLX's own reference BLAS."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from agent.generation import Finished, GenerationRequest, SamplingParams, TokenChunk
from agent.runtime.client import RunnerProcess
from agent.runtime.environment import runner_environment
from agent.runtime.protocol import RunnerConfig
from agent.settings import NodeSettings

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux", reason="the shim is Linux-only")]

PROMPTS = [
    [1, 9690, 198, 2683, 314, 253, 5356, 28, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282,
     4649, 47, 2, 198, 1, 520, 9531, 198],
    list(range(500, 756)),  # a long prompt: prefill takes the sgemm path, decode the sgemv one
]


async def greedy_ids(model_dir: Path, env: dict[str, str]) -> tuple[list[list[int]], str]:
    runner = RunnerProcess(RunnerConfig(model_name="smol", model_dir=str(model_dir)), env)
    ready = await runner.start(timeout=300)
    try:
        out = []
        for i, prompt in enumerate(PROMPTS):
            request = GenerationRequest(id=str(i), model="smol", prompt_tokens=prompt,
                                        sampling=SamplingParams(max_tokens=24, temperature=0))
            ids: list[int] = []
            async for event in runner.generate(request):
                if isinstance(event, TokenChunk):
                    ids += event.token_ids
                else:
                    assert isinstance(event, Finished)
            out.append(ids)
        return out, ready.blas
    finally:
        await runner.stop()


def test_greedy_output_is_identical_with_and_without_the_blas_shim(
        smollm2_dir: Path, tmp_path: Path) -> None:
    fast_env, warning = runner_environment(NodeSettings(state_dir=tmp_path, blas="auto"))
    assert warning is None, warning
    plain_env, _ = runner_environment(NodeSettings(state_dir=tmp_path, blas="off"))

    async def both() -> list[tuple[list[list[int]], str]]:
        # The two runners are separate processes with one BLAS thread each: run them side by
        # side (two cores halve the wait; the answers do not depend on it).
        return list(await asyncio.gather(greedy_ids(smollm2_dir, fast_env),
                                         greedy_ids(smollm2_dir, plain_env)))

    (fast, fast_blas), (plain, plain_blas) = asyncio.run(both())
    assert "OpenBLAS" in fast_blas and "OpenBLAS" not in plain_blas
    assert all(len(ids) > 0 for ids in fast)
    assert fast == plain
