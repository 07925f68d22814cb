"""A verification step's attention (the decode-attention kernel, one call per position) gives
what decoding its tokens one by one gives, with a float and a quantized KV cache."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from agent.runtime.compute import LocalCompute
from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.model import load_decoder
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # head_dim 32: a quantized cache needs a multiple of 32.
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden=128)


@pytest.mark.parametrize("bits", [None, 8])
def test_verify_logits_are_sequential_decodes(tiny_dir: Path, bits: int | None) -> None:
    dec = load_decoder(tiny_dir)
    prompts = [[3, 9, 4, 1, 7, 2], [5, 6, 8, 10]]
    drafts = [[11, 12, 13, 14], [15, 16, 17, 18]]

    def compute() -> LocalCompute:
        kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim,
                                bits=bits))
        for i in range(len(prompts)):
            kv.acquire(f"r{i}", 32, rows=len(prompts))
        c = LocalCompute(dec, kv, compiled=False)
        for row, p in enumerate(prompts):
            c.prefill(row, 0, p)
        return c

    starts = [len(p) for p in prompts]
    verify = compute().verify([[1, *d] for d in drafts], starts)
    plain = compute()
    for i in range(1 + len(drafts[0])):
        tokens = [1 if i == 0 else d[i - 1] for d in drafts]
        logits = plain.decode(tokens, [s + i for s in starts])
        assert mx.allclose(verify[:, i, :], logits, atol=1e-4), i
