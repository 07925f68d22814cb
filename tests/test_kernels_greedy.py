"""The fused CPU attention kernels change speed, not answers, wherever runners compute: SmolLM2's
greedy ids with the kernels on equal those of a single runner with them off (MLX's own attention),
for a batch of 8 and a second turn that reuses the first's cached prefix, on one runner and on a
2-stage pipeline (micro-batched row ranges), and for two prompts together on a
3-rank tensor-parallel group.

Real runner processes with the environment the agent gives them (FLOCK_KERNELS_LIB set from the
`kernels` setting); each says in its Ready message which attention it loaded, so a kernel that
silently failed to load cannot pass for one that matches."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.generation import Finished, GenerationRequest, SamplingParams, TokenChunk
from agent.runtime import kernels
from agent.runtime.client import RunnerProcess
from agent.runtime.environment import runner_environment
from agent.runtime.protocol import RunnerConfig
from agent.settings import NodeSettings
from tests.test_pipeline import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux" or not (kernels.NATIVE_DIR
                                                       / kernels.kernel_filename()).is_file(),
                       reason="the kernels are built on Linux by `make native`"),
]

TOKENS = 10
CHAT = [1, 9690, 198, 2683, 314, 253, 5356, 28, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282,
        4649, 47, 2, 198, 1, 520, 9531, 198]
# A batch of 8 at different lengths; the last prefills over three chunks of 96.
PROMPTS = [CHAT] + [list(range(600 + 11 * i, 600 + 11 * i + 3 + 19 * i)) for i in range(6)] + [
    list(range(2000, 2230))]
FOLLOW_UP = [2, 198, 1, 4093, 198, 26590, 2]  # "<|im_end|>\n<|im_start|>user\n...": a 2nd turn
LAYERS = 30  # SmolLM2-135M; 9 query heads over 3 KV heads, so tensor parallel takes 3 ranks


def request(rid: str, prompt: list[int]) -> GenerationRequest:
    return GenerationRequest(id=rid, model="smol", prompt_tokens=prompt,
                             sampling=SamplingParams(max_tokens=TOKENS, temperature=0))


async def greedy(runner: RunnerProcess, rid: str, prompt: list[int]) -> tuple[list[int], int]:
    """The ids, and how many prompt tokens came from the prefix cache."""
    ids: list[int] = []
    async for event in runner.generate(request(rid, prompt)):
        if isinstance(event, TokenChunk):
            ids += event.token_ids
        else:
            assert isinstance(event, Finished), event
            return ids, event.usage.cached_tokens
    raise AssertionError("the stream ended without a final event")


async def conversation(runner: RunnerProcess, prompts: Sequence[list[int]], *,
                       together: bool = True) -> dict[str, object]:
    """All prompts at once (a batch) or one after another, then a second turn on the first
    one's conversation."""
    if together:
        batch = await asyncio.gather(*(greedy(runner, str(i), p) for i, p in enumerate(prompts)))
    else:
        batch = [await greedy(runner, str(i), p) for i, p in enumerate(prompts)]
    turn2, cached = await greedy(runner, "turn2", prompts[0] + batch[0][0] + FOLLOW_UP)
    return {"batch": [ids for ids, _ in batch], "turn2": turn2, "turn2_cached": cached}


async def serve(configs: list[RunnerConfig], env: dict[str, str], prompts: Sequence[list[int]],
                *, together: bool = True) -> tuple[dict[str, object], list[str]]:
    """Start the runners (the first is the head), hold the conversation, stop them."""
    runners = [RunnerProcess(c, env) for c in configs]
    try:
        ready = await asyncio.gather(*(r.start(timeout=300) for r in runners))
        got = await conversation(runners[0], prompts, together=together)
        return got, [r.kernels for r in ready]
    finally:
        await asyncio.gather(*(r.stop() for r in runners))


def environment(tmp_path: Path, *, on: bool, threads: int = 1, ranks: int = 1
                ) -> dict[str, str]:
    settings = NodeSettings(state_dir=tmp_path / "state", blas_threads=threads,
                            kernels="auto" if on else "off")
    env, warning = runner_environment(settings, ranks_on_this_machine=ranks)
    assert warning is None, warning
    return env


def solo(model_dir: Path) -> list[RunnerConfig]:
    return [RunnerConfig(model_name="smol", model_dir=str(model_dir), prefill_chunk=96,
                         prefill_gap_steps=0)]


def pipeline(model_dir: Path, splits: list[tuple[int, int]]) -> list[RunnerConfig]:
    ports = [free_port() for _ in splits]
    return [RunnerConfig(model_name="smol", model_dir=str(model_dir), prefill_chunk=96,
                         prefill_gap_steps=0, role="head" if i == 0 else "follower",
                         layer_start=start, layer_stop=stop, listen=f"127.0.0.1:{ports[i]}",
                         downstream=f"127.0.0.1:{ports[(i + 1) % len(splits)]}")
            for i, (start, stop) in enumerate(splits)]


def tensor(model_dir: Path, ranks: int) -> list[RunnerConfig]:
    ring = [f"127.0.0.1:{free_port()}" for _ in range(ranks)]
    links = [f"127.0.0.1:{free_port()}" for _ in range(ranks)]
    return [RunnerConfig(model_name="smol", model_dir=str(model_dir), prefill_chunk=96,
                         prefill_gap_steps=0, role="solo" if rank == 0 else "tp_follower",
                         tp_rank=rank, tp_hosts=ring, tp_peers=links[1:] if rank == 0 else [],
                         listen=links[rank])
            for rank in range(ranks)]


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One runner with MLX's own attention."""
    tmp = tmp_path_factory.mktemp("reference")
    got, attention = asyncio.run(serve(solo(smollm2_dir), environment(tmp, on=False), PROMPTS))
    assert attention == ["pure MLX"], attention
    assert all(ids for ids in got["batch"])  # type: ignore[union-attr]
    # The second turn really reused the first: past its prompt, into the generated tokens.
    assert got["turn2_cached"] > len(PROMPTS[0])  # type: ignore[operator]
    return got


def on_kernels(attention: list[str]) -> bool:
    return all(a.startswith("flockattn") for a in attention)


def test_one_runner(smollm2_dir: Path, tmp_path: Path, reference: dict[str, object]) -> None:
    got, attention = asyncio.run(serve(solo(smollm2_dir), environment(tmp_path, on=True),
                                       PROMPTS))
    assert on_kernels(attention), attention
    assert got == reference


def test_a_two_stage_pipeline(smollm2_dir: Path, tmp_path: Path,
                              reference: dict[str, object]) -> None:
    got, attention = asyncio.run(serve(pipeline(smollm2_dir, [(0, 13), (13, LAYERS)]),
                                       environment(tmp_path, on=True, ranks=2), PROMPTS))
    assert on_kernels(attention) and len(attention) == 2, attention
    assert got == reference


def test_a_three_rank_tensor_group(smollm2_dir: Path, tmp_path: Path,
                                   reference: dict[str, object]) -> None:
    # Two prompts of the batch (the chat, and the one prefilled in three chunks: the ring's
    # collectives crawl on a 2-core machine), together, so one prompt's chunks are prefilled
    # while the other decodes (what rank 0 once got wrong by dropping a chunk's collectives).
    prompts = [PROMPTS[0], PROMPTS[7]]
    got, attention = asyncio.run(serve(tensor(smollm2_dir, 3),
                                       environment(tmp_path, on=True, ranks=3), prompts))
    assert on_kernels(attention) and len(attention) == 3, attention
    batch: list[list[int]] = reference["batch"]  # type: ignore[assignment]
    assert got == {**reference, "batch": [batch[0], batch[7]]}
