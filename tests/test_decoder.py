"""flock's decoder against mlx-lm's reference models, on tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.model import LayerRange, UnsupportedModel, load_decoder
from agent.runtime.step import make_decode_fn, prefill
from tests.tiny_models import make_tiny_model

ATOL = 2e-4


def reference_logits(model_dir: Path, prompt: list[int], follow: list[int]) -> list[mx.array]:
    """mlx-lm's logits for the prompt's last position and each following token."""
    model, _ = load_model(model_dir)
    cache = make_prompt_cache(model)
    out = [model(mx.array([prompt]), cache=cache)[0, -1]]
    for token in follow:
        out.append(model(mx.array([[token]]), cache=cache)[0, -1])
    return out


def flock_logits(model_dir: Path, prompt: list[int], follow: list[int], *, fuse: bool,
                 compiled: bool, chunk: int = 1000) -> list[mx.array]:
    dec = load_decoder(model_dir, fuse=fuse)
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim), chunk=16)
    row = kv.acquire("seq", len(prompt) + len(follow) + 1)
    logits = None
    for start in range(0, len(prompt), chunk):
        part = prompt[start:start + chunk]
        logits = prefill(dec, mx.array(part), start, row, kv.keys, kv.values)
    assert logits is not None
    out = [logits[0]]
    step = make_decode_fn(dec, compiled=compiled)
    position = len(prompt)
    for token in follow:
        kv.ensure_capacity(position + 1)
        result = step(mx.array([token]), mx.array([position]), *kv.keys, *kv.values)
        n = len(kv.keys)
        kv.keys, kv.values = list(result[1:1 + n]), list(result[1 + n:])
        out.append(result[0][0])
        position += 1
    return out


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize(("fuse", "compiled"), [(True, True), (False, False)])
def test_decoder_logits_match_mlx_lm(tmp_path: Path, architecture: str, fuse: bool,
                                     compiled: bool) -> None:
    model_dir = make_tiny_model(tmp_path / architecture, architecture=architecture,
                                tie=architecture != "qwen2")
    prompt = [5, 17, 99, 42, 7, 250, 3, 64, 11]
    follow = [8, 120, 33, 71, 200, 19, 5, 5, 90, 14, 22, 61, 77, 101, 130, 140, 150, 160, 170]
    expected = reference_logits(model_dir, prompt, follow)
    got = flock_logits(model_dir, prompt, follow, fuse=fuse, compiled=compiled)
    for want, have in zip(expected, got, strict=True):
        assert mx.allclose(want, have, atol=ATOL).item()


def test_chunked_prefill_equals_one_pass(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m")
    prompt = list(range(3, 40))
    whole = flock_logits(model_dir, prompt, [9, 10], fuse=True, compiled=True)
    chunked = flock_logits(model_dir, prompt, [9, 10], fuse=True, compiled=True, chunk=7)
    for a, b in zip(whole, chunked, strict=True):
        assert mx.allclose(a, b, atol=ATOL).item()


def test_batched_rows_at_different_positions_match_single_rows(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m")
    dec = load_decoder(model_dir)
    prompts = [[5, 6, 7], list(range(10, 30)), [100, 101, 102, 103, 104, 105, 106]]
    nexts = [11, 12, 13]
    singles = [flock_logits(model_dir, p, [t], fuse=True, compiled=False)[1]
               for p, t in zip(prompts, nexts, strict=True)]
    kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim), chunk=16)
    rows = [kv.acquire(str(i), len(p) + 2) for i, p in enumerate(prompts)]
    for row, prompt in zip(rows, prompts, strict=True):
        prefill(dec, mx.array(prompt), 0, row, kv.keys, kv.values)
    tokens = [0] * kv.rows
    positions = [0] * kv.rows
    for row, prompt, token in zip(rows, prompts, nexts, strict=True):
        tokens[row], positions[row] = token, len(prompt)
    out = make_decode_fn(dec, compiled=True)(mx.array(tokens), mx.array(positions), *kv.keys,
                                             *kv.values)
    for row, single in zip(rows, singles, strict=True):
        assert mx.allclose(out[0][row], single, atol=ATOL).item()


def test_pipeline_stages_compose_to_the_whole_model(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", layers=4)
    prompt = [4, 8, 15, 16, 23, 42]
    whole = load_decoder(model_dir)
    first = load_decoder(model_dir, layers=LayerRange(0, 1))
    second = load_decoder(model_dir, layers=LayerRange(1, 4))
    assert first.lm_head is None and first.norm is None and second.embed is not None  # tied head

    def fresh(dec):
        kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
        return kv, kv.acquire("s", len(prompt) + 1)

    kv_w, row_w = fresh(whole)
    expected = prefill(whole, mx.array(prompt), 0, row_w, kv_w.keys, kv_w.values)
    kv_a, row_a = fresh(first)
    hidden = prefill(first, mx.array(prompt), 0, row_a, kv_a.keys, kv_a.values)
    kv_b, row_b = fresh(second)
    got = prefill(second, hidden, 0, row_b, kv_b.keys, kv_b.values)
    assert mx.allclose(expected, got, atol=ATOL).item()


def test_unsupported_architecture_is_refused_clearly(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m")
    config = (model_dir / "config.json").read_text().replace('"llama"', '"mamba"')
    (model_dir / "config.json").write_text(config)
    with pytest.raises(UnsupportedModel, match="mamba"):
        load_decoder(model_dir)
