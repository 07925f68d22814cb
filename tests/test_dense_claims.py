"""What flock's dense decoder claims for llama configs, it does: attention and MLP biases and
llama 3 rope scaling give mlx-lm's logits on tiny random weights (mlx-lm's own llama class)."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest

from agent.runtime.model import Dense, load_decoder
from tests import tiny_archs
from tests.conftest import TEST_CACHE
from tests.test_decoder import flock_logits, reference_logits

ATOL = 2e-4
VARIANTS: dict[str, dict[str, Any]] = {
    "llama_biases": {"attention_bias": True, "mlp_bias": True},
    "llama_rope3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}},
}


def _builder(fields: dict[str, Any]) -> Any:
    def build() -> Any:
        module = importlib.import_module("mlx_lm.models.llama")
        return module.ModelArgs.from_dict({
            "model_type": "llama", "vocab_size": tiny_archs.VOCAB, **tiny_archs.DENSE,
            "head_dim": 64, "rope_theta": 10000.0, **fields})
    return build


# make_arch_model builds what its tables name; these models are this file's own (keyed by its
# hash, so the shared tiny models keep theirs).
for _name, _fields in VARIANTS.items():
    tiny_archs.FLOCK_DECODER_BUILDERS.setdefault(_name, _builder(_fields))
    tiny_archs.FLOCK_DECODER_MODULES.setdefault(_name, "llama")
_KEY = hashlib.sha256(Path(__file__).read_bytes() + Path(tiny_archs.__file__).read_bytes()
                      + mlx_lm.__version__.encode()).hexdigest()[:12]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_llama_variant_logits_match_mlx_lm(variant: str, smollm2_dir: Path) -> None:
    model_dir, ids = tiny_archs.make_arch_model(
        TEST_CACHE / "models" / f"tiny-{variant}-{_KEY}", variant, smollm2_dir)
    dec = load_decoder(model_dir)
    if variant == "llama_biases":  # every projection carries its bias
        layer = dec.layers[0]
        assert isinstance(layer.mlp.down, Dense) and layer.mlp.down.bias is not None
        assert isinstance(layer.attn.o, Dense) and layer.attn.o.bias is not None
    else:
        assert type(dec.rope).__name__ == "Llama3RoPE"
    expected = reference_logits(model_dir, tiny_archs.PROMPT, ids[:12])
    got = flock_logits(model_dir, tiny_archs.PROMPT, ids[:12], fuse=True, compiled=True)
    for want, have in zip(expected, got, strict=True):
        assert mx.allclose(want, have, atol=ATOL).item()
    assert [int(mx.argmax(x)) for x in got[:12]] == ids[:12]
