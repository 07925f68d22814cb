"""Pipeline stages on the mlx-lm engine: two runner processes on loopback, each holding a slice of
an mlx-lm model's layer list, give mlx-lm's own greedy ids, alone and for concurrent requests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

from agent.generation import Finished
from agent.models import arch
from agent.runtime.client import RunnerProcess
from agent.runtime.environment import runner_environment
from agent.runtime.mlxlm_pipeline import SLICEABLE_MODULES, check_sliceable
from agent.runtime.model import UnsupportedModel
from agent.settings import NodeSettings
from tests.test_mlxlm_engine import OTHER_PROMPT, arch_dir, greedy
from tests.test_pipeline import pipeline_configs
from tests.test_runner_process import collect
from tests.tiny_archs import BUILDERS, GREEDY_TOKENS, PROMPT, mlxlm_greedy


def test_every_tiny_architecture_is_sliceable_and_others_are_refused_by_name() -> None:
    assert set(BUILDERS) <= SLICEABLE_MODULES  # all 20 pass the test below
    for name in BUILDERS:
        assert "pipeline" in arch.architecture({"model_type": name}).strategies, name
    with pytest.raises(UnsupportedModel, match=r"'mamba'.*supported: cohere"):
        check_sliceable({"model_type": "mamba"}, "mamba")
    assert "pipeline" not in arch.architecture({"model_type": "mamba"}).strategies


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_two_stage_pipeline_gives_mlxlm_greedy_ids(name: str, smollm2_dir: Path,
                                                   tmp_path: Path) -> None:
    from mlx_lm.utils import load_model

    model_dir, expected = arch_dir(name, smollm2_dir)
    model, _ = load_model(model_dir)
    other_expected = mlxlm_greedy(model, OTHER_PROMPT, GREEDY_TOKENS)[0]
    whole = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    layers = len(model.layers)
    del model
    configs = pipeline_configs(model_dir, [(0, layers // 2), (layers // 2, layers)],
                               stats_interval_s=0.05)
    env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state", blas_threads=1))
    runners = [RunnerProcess(c, env) for c in configs]

    async def main() -> None:
        try:
            head_ready, follower_ready = await asyncio.gather(
                *(r.start(timeout=180) for r in runners))
            # Each stage holds its slice only: together, the whole model once.
            assert head_ready.engine == follower_ready.engine == "mlx-lm"
            assert follower_ready.weight_bytes < whole / 2
            assert head_ready.weight_bytes + follower_ready.weight_bytes == whole
            head = runners[0]
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
            # Both sequences were computed in one decode step (not one after the other).
            assert head.last_stats["decode_rows_max"] == 2
        finally:
            for runner in runners:
                await runner.stop()

    asyncio.run(main())
