"""The fused CPU attention kernels (agent.runtime.kernels) compute what MLX's own ops compute:
prefill against `mx.fast.scaled_dot_product_attention` (causal, with an offset into the cache),
decode against step.py's grouped matmul path, over head dims 64/128, grouped and ungrouped
heads, odd lengths, block and chunk boundaries, rows at different positions, 1 and 2 threads;
and SmolLM2's greedy ids are identical with the kernels on and off."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import pytest

from agent.generation import Finished, GenerationRequest, SamplingParams, TokenChunk
from agent.runtime import kernels
from agent.runtime.client import RunnerProcess
from agent.runtime.environment import runner_environment
from agent.runtime.protocol import RunnerConfig
from agent.runtime.step import NEG_INF
from agent.settings import NodeSettings

ATOL = 2e-5

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not (kernels.NATIVE_DIR / kernels.kernel_filename()).is_file(),
    reason="the kernels are built on Linux by `make native`")


@pytest.fixture(autouse=True, scope="module")
def loaded() -> Iterator[None]:
    assert kernels.set_enabled(True)
    yield
    kernels.set_threads(kernels._default_threads())


def reference_prefill(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    n = q.shape[2]
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale,
                                               mask="causal" if n > 1 else None)
    return out.transpose(0, 2, 1, 3).reshape(q.shape[0], n, -1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 128), (8, 2, 128),
                                                             (6, 1, 64)])
@pytest.mark.parametrize(("offset", "n"), [(0, 1), (0, 7), (0, 64), (0, 129), (5, 1),
                                           (128, 64), (63, 66), (200, 257)])
def test_prefill_matches_mlx_sdpa(threads: int, heads: int, kv_heads: int, head_dim: int,
                                  offset: int, n: int) -> None:
    kernels.set_threads(threads)
    key = mx.random.key(heads * 1000 + offset + n)
    kq, kk, kv = mx.random.split(key, 3)
    q = mx.random.normal((1, heads, n, head_dim), key=kq)
    k = mx.random.normal((1, kv_heads, offset + n, head_dim), key=kk)
    v = mx.random.normal((1, kv_heads, offset + n, head_dim), key=kv)
    scale = head_dim**-0.5
    got = kernels.prefill_attention(q, k, v, scale=scale, offset=offset)
    assert got.shape == (1, n, heads * head_dim)
    assert mx.allclose(got, reference_prefill(q, k, v, scale), atol=ATOL).item()


def test_prefill_reads_views_of_a_cache_as_step_py_passes_them() -> None:
    """q as a transposed view of (1, n, heads, hd) and keys as a slice of a larger cache."""
    heads, kv_heads, hd, n, start = 9, 3, 64, 70, 30
    q = mx.random.normal((1, n, heads, hd)).transpose(0, 2, 1, 3)
    cache_k = mx.random.normal((2, kv_heads, 512, hd))
    cache_v = mx.random.normal((2, kv_heads, 512, hd))
    k, v = cache_k[1:2, :, :start + n], cache_v[1:2, :, :start + n]
    got = kernels.prefill_attention(q, k, v, scale=0.125, offset=start)
    assert mx.allclose(got, reference_prefill(q, k, v, 0.125), atol=ATOL).item()


def test_chunked_prefill_over_the_cache_equals_one_pass() -> None:
    heads, kv_heads, hd, n = 9, 3, 64, 300
    q = mx.random.normal((1, heads, n, hd))
    k, v = mx.random.normal((1, kv_heads, n, hd)), mx.random.normal((1, kv_heads, n, hd))
    whole = kernels.prefill_attention(q, k, v, scale=0.125, offset=0)
    parts = [kernels.prefill_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], scale=0.125,
                                       offset=a) for a, b in ((0, 7), (7, 100), (100, 229),
                                                              (229, 300))]
    # Bit-identical, not just close: the kernel's block layout follows absolute positions.
    assert mx.array_equal(mx.concatenate(parts, axis=1), whole).item()


def reference_decode(q: mx.array, k: mx.array, v: mx.array, positions: mx.array,
                     scale: float) -> mx.array:
    """step.py's own decode attention (the path the kernel replaces)."""
    rows, heads, _, hd = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    visible = mx.arange(capacity)[None, :] <= positions[:, None]
    mask = mx.where(visible, 0.0, NEG_INF).astype(q.dtype)[:, None, None, :]
    qg = q.reshape(rows, kv_heads, heads // kv_heads, hd) * scale
    scores = qg @ k.transpose(0, 1, 3, 2) + mask
    return (mx.softmax(scores, axis=-1, precise=True) @ v).reshape(rows, 1, heads * hd)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 128), (8, 2, 128)])
def test_decode_matches_the_grouped_matmul_path(threads: int, heads: int, kv_heads: int,
                                                head_dim: int) -> None:
    kernels.set_threads(threads)
    rows, capacity = 5, 300
    q = mx.random.normal((rows, heads, 1, head_dim))
    k = mx.random.normal((rows, kv_heads, capacity, head_dim))
    v = mx.random.normal((rows, kv_heads, capacity, head_dim))
    positions = mx.array([0, 1, 63, 200, 299], dtype=mx.int32)
    got = kernels.decode_attention(q, k, v, positions, scale=head_dim**-0.5)
    assert got is not None and got.shape == (rows, 1, heads * head_dim)
    want = reference_decode(q, k, v, positions, head_dim**-0.5)
    assert mx.allclose(got, want, atol=ATOL).item()
    compiled = mx.compile(lambda *a: kernels.decode_attention(*a, scale=head_dim**-0.5))
    assert mx.allclose(compiled(q, k, v, positions), want, atol=ATOL).item()


def test_the_setting_turns_the_kernels_off_for_runners() -> None:
    env, warning = kernels.kernels_env(NodeSettings(kernels="off"))
    assert env == {kernels.ENV: "off"} and warning is None
    env, warning = kernels.kernels_env(NodeSettings())
    assert warning is None and Path(env[kernels.ENV]).is_file()
    assert kernels.describe_kernels(NodeSettings(kernels="off")).startswith("off")
    assert kernels.describe_kernels().startswith("flockattn")


async def greedy(model_dir: Path, env: dict[str, str], prompts: list[list[int]]
                 ) -> list[list[int]]:
    """Greedy ids of all prompts submitted at once to one real runner (a batch)."""
    config = RunnerConfig(model_name="smol", model_dir=str(model_dir), prefill_chunk=96,
                          prefill_gap_steps=0)
    runner = RunnerProcess(config, env)
    await runner.start(timeout=300)

    async def one(i: int, prompt: list[int]) -> list[int]:
        request = GenerationRequest(id=str(i), model="smol", prompt_tokens=prompt,
                                    sampling=SamplingParams(max_tokens=12, temperature=0))
        ids: list[int] = []
        async for event in runner.generate(request):
            if isinstance(event, TokenChunk):
                ids += event.token_ids
            else:
                assert isinstance(event, Finished), event
        return ids

    try:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    finally:
        await runner.stop()


@pytest.mark.slow
def test_smollm2_greedy_ids_are_identical_with_the_kernels_on_and_off(
        smollm2_dir: Path, tmp_path: Path) -> None:
    """Real runners (the BLAS shim preloaded, FLOCK_KERNELS_LIB as the agent sets it): a batch of 8
    at different lengths, one prompt prefilled over three chunks."""
    chat = [1, 9690, 198, 2683, 314, 253, 5356, 28, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575,
            282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    prompts = [chat] + [list(range(500 + 7 * i, 500 + 7 * i + 5 + 23 * i)) for i in range(6)]
    prompts.append(list(range(1000, 1250)))  # 250 tokens: three prefill chunks of 96
    on_env, warning = runner_environment(NodeSettings(state_dir=tmp_path, blas_threads=1))
    assert warning is None, warning
    assert Path(on_env[kernels.ENV]).is_file()
    off_env, _ = runner_environment(NodeSettings(state_dir=tmp_path, blas_threads=1,
                                                 kernels="off"))
    on = asyncio.run(greedy(smollm2_dir, on_env, prompts))
    off = asyncio.run(greedy(smollm2_dir, off_env, prompts))
    assert all(len(ids) > 0 for ids in on)
    assert on == off
