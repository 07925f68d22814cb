"""Quantized test checkpoints made with mlx-lm's own convert, as mlx-community publishes them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def mixed_predicate(path: str, module: Any) -> bool | dict[str, Any]:
    """Per-module overrides as mlx-lm's mixed recipes write them: layer 0's MLP at 8 bits,
    layer 1's v_proj left in float (so q, k and v cannot be fused), the rest at the default."""
    if not hasattr(module, "to_quantized"):
        return False
    if path.startswith("model.layers.0.mlp."):
        return {"group_size": 64, "bits": 8}
    return path != "model.layers.1.self_attn.v_proj"


def convert_quantized(source: Path, out: Path, *, bits: int = 4, group_size: int = 64,
                      mixed: bool = False, dtype: str | None = None) -> Path:
    """`mlx_lm.convert -q` of `source` into `out` (cached: made once, then reused)."""
    if (out / "config.json").exists():
        return out
    from mlx_lm import convert

    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    convert(str(source), str(tmp), quantize=True, q_bits=bits, q_group_size=group_size,
            dtype=dtype, quant_predicate=mixed_predicate if mixed else None)
    tmp.replace(out)
    return out
