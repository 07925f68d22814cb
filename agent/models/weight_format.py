"""How a runner holds a model's weights, for sizing them: a float dtype, or quantized matrices
(MLX's affine 4/8-bit layout, or mxfp4: 4-bit values with one 8-bit scale per 32). Pure: it
reads config dicts. Split from models/arch.py, which re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class WeightFormat:
    """How weights are held in memory: a float dtype, or quantized ("affine") matrices.

    `mode` "mxfp4" stores one uint8 scale per group and no offset (affine: a float16 scale and
    offset). `experts_only` names OpenAI's gpt-oss layout, where only the routed experts are
    quantized: every other matrix stays at the float dtype `rest` as stored."""

    dtype: str  # float32, float16, bfloat16, or "affine"
    bits: int = 0  # affine only
    group_size: int = 0  # affine only
    mode: str = "affine"
    experts_only: bool = False
    rest: str = "bfloat16"  # experts_only: the stored dtype of what is not an expert

    def matrix_bytes(self, values: int, *, experts: bool = False) -> int:
        """Bytes of `values` matrix values (the routed experts' when `experts`)."""
        if self.dtype != "affine":
            return values * DTYPE_BYTES[self.dtype]
        if self.experts_only and not experts:
            return values * DTYPE_BYTES[self.rest]
        # Packed values plus, per group, a uint8 scale (mxfp4) or a float16 scale and offset.
        return values * self.bits // 8 + (values // self.group_size) * \
            (1 if self.mode == "mxfp4" else 4)

    def vector_bytes(self, values: int) -> int:
        # Norms and biases are never quantized: float16 beside quantized weights (or as stored).
        return values * self.element_bytes

    @property
    def element_bytes(self) -> int:
        """Bytes of one activation / KV element next to these weights."""
        if self.dtype != "affine":
            return DTYPE_BYTES[self.dtype]
        return DTYPE_BYTES[self.rest] if self.experts_only else 2


def quantization(config: dict[str, Any]) -> WeightFormat | None:
    """The checkpoint's quantization (mlx-community layout, or OpenAI's mxfp4 one), or None."""
    quant = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quant, dict):
        return None
    if quant.get("quant_method") == "mxfp4":
        # OpenAI's gpt-oss checkpoints: the experts' `_blocks` (two 4-bit values a byte) and
        # `_scales` (one uint8 exponent per 32 values); everything else as stored.
        stored = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
        return WeightFormat("affine", 4, 32, "mxfp4", experts_only=True,
                            rest=stored if stored in DTYPE_BYTES else "bfloat16")
    if not quant.get("bits"):
        return None
    return WeightFormat("affine", int(quant["bits"]), int(quant.get("group_size", 64)),
                        str(quant.get("mode", "affine")))
