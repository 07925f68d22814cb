"""Speculative decoding across processes: a 3-stage pipeline, a tensor group and tensor groups
inside pipeline stages verify drafts on every rank alike, and give what one process gives
without drafting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from agent.generation import Finished, GenerationRequest, SamplingParams, TokenChunk
from agent.runtime.client import RunnerProcess
from agent.runtime.protocol import RunnerConfig
from tests.test_pipeline import hybrid_configs, pipeline_configs, start_all
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

# Repeating prompts: a random model's output repeats too, so prompt lookup drafts and keeps.
PROMPTS = {"copy": [40, 41, 42, 43, 44] * 5, "loop": [7, 8, 9] * 6, "free": [100, 3, 77]}
# More streams than stages, edit-style ones that draft beside free ones: micro-batches in flight
# carry their drafts round the ring (verify micro-batches).
STREAMS = {**PROMPTS, "copy2": [60, 61, 62, 63] * 6, "free2": [5, 150, 33, 90]}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", layers=6)


async def generate(runner: RunnerProcess, prompts: dict[str, list[int]] = PROMPTS
                   ) -> dict[str, tuple[list[int], list[float]]]:
    """Each prompt's greedy ids and the logprobs of the chosen tokens, all in one batch."""

    async def one(rid: str, prompt: list[int]) -> tuple[list[int], list[float]]:
        request = GenerationRequest(id=rid, model="tiny", prompt_tokens=prompt,
                                    sampling=SamplingParams(max_tokens=24, temperature=0.0,
                                                            logprobs=True))
        ids: list[int] = []
        lps: list[float] = []
        async for event in runner.generate(request):
            if isinstance(event, TokenChunk):
                ids += event.token_ids
                lps += [lp.logprob for lp in event.logprobs or []]
            else:
                assert isinstance(event, Finished), event
        return ids, lps

    results = await asyncio.gather(*(one(k, p) for k, p in prompts.items()))
    return dict(zip(prompts, results, strict=True))


async def drafted_stats(runner: RunnerProcess) -> dict[str, float]:
    """The head's stats once they count this run's drafts (sent every stats interval)."""
    for _ in range(100):
        if runner.last_stats.get("accepted_draft_tokens_total", 0) > 0:
            return runner.last_stats
        await asyncio.sleep(0.1)
    raise AssertionError(f"no drafts counted: {runner.last_stats}")


# A 3-stage pipeline (stop-and-wait: every row drafts in the one step in the ring; and with
# micro-batches in flight, one stream alone: fewer streams than stages verify drafts instead),
# and 2 stages that are each a tensor group of 2 (a tensor head with peers, a pipeline follower
# leading its own tensor group); and 5 streams in micro-batches on 2 stages: every way a verify
# step travels.
@pytest.mark.parametrize("shape", ["pipeline3", "pipeline3_microbatch_one_stream", "hybrid2x2",
                                   "pipeline2_microbatch_streams", "hybrid2x2_microbatch_streams"])
def test_drafted_multi_process_decoding_matches_one_plain_process(
        shape: str, tiny_dir: Path, tmp_path: Path) -> None:
    prompts = {"copy": PROMPTS["copy"]} if "one_stream" in shape else \
        STREAMS if "streams" in shape else PROMPTS

    async def main() -> None:
        solo = (await start_all([RunnerConfig(model_name="tiny", model_dir=str(tiny_dir),
                                              prompt_lookup=False)], tmp_path))[0]
        try:
            expected = await generate(solo, prompts)
        finally:
            await solo.stop()
        splits = [(0, 2), (2, 4), (4, 6)]
        configs = {
            "pipeline3": lambda: pipeline_configs(tiny_dir, splits, stats_interval_s=0.2,
                                                  pipeline_microbatch=False),
            "pipeline3_microbatch_one_stream": lambda: pipeline_configs(
                tiny_dir, splits, stats_interval_s=0.2),
            "hybrid2x2": lambda: [msgspec.structs.replace(c, pipeline_microbatch=False)
                                  for c in hybrid_configs(tiny_dir, [(0, 3), (3, 6)], 2)],
            "pipeline2_microbatch_streams": lambda: pipeline_configs(
                tiny_dir, [(0, 3), (3, 6)], stats_interval_s=0.2),
            "hybrid2x2_microbatch_streams": lambda: hybrid_configs(
                tiny_dir, [(0, 3), (3, 6)], 2)}[shape]()
        runners = await start_all(configs, tmp_path)
        try:
            got = await generate(runners[0], prompts)
            stats = await drafted_stats(runners[0])
        finally:
            for r in runners:
                await r.stop()
        assert stats["verify_steps_total"] > 0
        if "streams" in shape:
            assert stats["verify_microbatches_total"] > 0
            assert stats["microbatches_in_flight_max"] == 2
        for rid, (ids, lps) in expected.items():
            assert got[rid][0] == ids, rid
            assert max(abs(a - b) for a, b in zip(got[rid][1], lps, strict=True)) < 1e-4

    asyncio.run(main())
