"""Sliding-window attention on flock's decoder: a tiny random mistral whose `layer_types` mark
sliding layers (a window of 8 under a 16-token prompt and 12 more tokens) gives mlx-lm's logits
in one-pass and chunked prefill, compiled or not; a runner serves mlx-lm's greedy ids alone,
batched with a row at other positions, and from the prefix cache."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest

from agent.generation import Finished
from agent.models.arch import read_config
from agent.runtime.attention_window import sliding_layers, visible
from agent.runtime.client import RunnerProcess
from agent.runtime.environment import runner_environment
from agent.runtime.model import DecoderConfig, load_decoder
from agent.runtime.protocol import RunnerConfig
from agent.settings import NodeSettings
from tests import tiny_archs
from tests.conftest import TEST_CACHE
from tests.test_decoder import flock_logits, reference_logits
from tests.test_mlxlm_engine import OTHER_PROMPT, assert_greedy_and_batched, greedy, mlxlm_ids
from tests.test_runner_process import collect

WINDOW = 8
ARCH = "mistral_sliding"
ATOL = 2e-4


def mistral_sliding() -> Any:
    """mistral as mlx-lm's llama module loads it, with sliding and full layers alternating."""
    import importlib

    module = importlib.import_module("mlx_lm.models.llama")
    return module.ModelArgs.from_dict({
        "model_type": "mistral", "vocab_size": tiny_archs.VOCAB, **tiny_archs.DENSE,
        "num_hidden_layers": 4, "head_dim": 64, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"] * 2})


# make_arch_model builds what its tables name; this model is this file's own (its cache key
# is this file's hash, so the 24 shared tiny models keep theirs).
tiny_archs.FLOCK_DECODER_BUILDERS.setdefault(ARCH, mistral_sliding)
tiny_archs.FLOCK_DECODER_MODULES.setdefault(ARCH, "llama")
_KEY = hashlib.sha256(Path(__file__).read_bytes() + (Path(tiny_archs.__file__).read_bytes())
                      + mlx_lm.__version__.encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def sliding_model(smollm2_dir: Path) -> tuple[Path, list[int]]:
    return tiny_archs.make_arch_model(TEST_CACHE / "models" / f"tiny-{ARCH}-{_KEY}", ARCH,
                                      smollm2_dir)


def test_which_layers_slide_follows_mlx_lm() -> None:
    types = ["sliding_attention", "full_attention"] * 2
    cfg = {"sliding_window": 8, "layer_types": types}
    assert sliding_layers(cfg, "mistral", 4) == (8, frozenset({0, 2}))
    assert sliding_layers(cfg, "llama", 4) == (8, frozenset({0, 2}))
    # mlx-lm's llama without layer_types, and its qwen2 / qwen3, attend over everything.
    assert sliding_layers({"sliding_window": 4096}, "mistral", 4) == (0, frozenset())
    assert sliding_layers({"sliding_window": 64, "use_sliding_window": True,
                           "max_window_layers": 1, "layer_types": types}, "qwen2", 4) == \
        (0, frozenset())
    # Key j is seen from position p when p - window < j <= p.
    assert visible(mx.array([5]), 8, 3).tolist() == [[False, False, False, True, True, True,
                                                       False, False]]


@pytest.mark.parametrize(("fuse", "compiled", "chunk"), [(True, True, 1000), (False, False, 5)])
def test_sliding_window_logits_match_mlx_lm(sliding_model: tuple[Path, list[int]], fuse: bool,
                                            compiled: bool, chunk: int) -> None:
    model_dir, ids = sliding_model
    config = DecoderConfig.from_hf(read_config(model_dir))
    assert config.sliding_window == WINDOW and config.sliding_layers == frozenset({0, 2})
    assert len(tiny_archs.PROMPT) > WINDOW
    expected = reference_logits(model_dir, tiny_archs.PROMPT, ids[:12])
    got = flock_logits(model_dir, tiny_archs.PROMPT, ids[:12], fuse=fuse, compiled=compiled,
                       chunk=chunk)
    for want, have in zip(expected, got, strict=True):
        assert mx.allclose(want, have, atol=ATOL).item()
    assert [int(mx.argmax(x)) for x in got[:12]] == ids[:12]


def test_runner_serves_sliding_window_batched_and_from_the_prefix_cache(
        sliding_model: tuple[Path, list[int]], tmp_path: Path) -> None:
    model_dir, expected = sliding_model
    other_expected = mlxlm_ids(model_dir, OTHER_PROMPT)
    turn2 = [*tiny_archs.PROMPT, *expected, 500, 600, 700]
    turn2_expected = mlxlm_ids(model_dir, turn2)
    env, _ = runner_environment(NodeSettings(state_dir=tmp_path / "state"))
    runner = RunnerProcess(RunnerConfig(model_name=ARCH, model_dir=str(model_dir),
                                        stats_interval_s=0.05), env)

    async def main() -> None:
        ready = await runner.start(timeout=180)
        assert ready.engine == "flock"
        try:
            await assert_greedy_and_batched(runner, expected, other_expected)
            ids, end = await collect(runner, greedy("turn2", turn2))
            assert ids == turn2_expected
            assert isinstance(end, Finished)
            assert end.usage.cached_tokens >= len(tiny_archs.PROMPT) + len(expected) - 1
        finally:
            await runner.stop()

    asyncio.run(main())


def test_verify_and_row_range_steps_keep_the_window(sliding_model: tuple[Path, list[int]]
                                                    ) -> None:
    """The speculative verify step (12 positions at once) and the micro-batch row-range step
    (row 1 of 2) give mlx-lm's logits past the window too."""
    from agent.runtime.kv import KvGeometry, KvSlots
    from agent.runtime.rowstep import RowsDecode
    from agent.runtime.step import prefill
    from agent.runtime.verify import make_verify_fn

    model_dir, ids = sliding_model
    prompt, follow = tiny_archs.PROMPT, ids[:12]
    expected = reference_logits(model_dir, prompt, follow)
    dec = load_decoder(model_dir)
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim), chunk=16)
    for name in ("other", "seq"):
        kv.acquire(name, len(prompt) + len(follow) + 1)
    prefill(dec, mx.array(prompt[:5]), 0, 0, kv.keys, kv.values)  # row 0 elsewhere
    prefill(dec, mx.array(prompt), 0, 1, kv.keys, kv.values)
    keys, values = list(kv.keys), list(kv.values)
    # Verify: the last prompt token and 11 followers in one step, from position 15.
    out = make_verify_fn(dec, compiled=False)(
        mx.array([[prompt[-1], *follow[:11]]] * 2), mx.array([4, len(prompt) - 1]),
        *keys, *values)
    for j in range(12):
        assert mx.allclose(out[0][1, j], expected[j], atol=ATOL).item()
    # Row-range step over row 1 alone, token by token.
    n = len(kv.keys)
    step = RowsDecode(dec, compiled=False)(1)
    position = len(prompt)
    for j, token in enumerate(follow[:-1]):
        result = step(mx.array([token]), mx.array([position + j]), *kv.keys, *kv.values)
        kv.keys, kv.values = list(result[1:1 + n]), list(result[1 + n:])
        assert mx.allclose(result[0][0], expected[j + 1], atol=ATOL).item()
