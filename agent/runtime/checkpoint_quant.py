"""What a checkpoint's quantization is and what it takes in memory: its `quantization` entry
(per-module overrides, OpenAI's mxfp4 as mlx-lm reads it), its size dequantized to float32, and
the dtype a runner serves it at. Split from runtime/model.py (the decoder's load), which
re-exports these names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from agent.models.arch import read_config
from agent.models.tensors import safetensor_files
from agent.runtime import gpt_oss


def quantization_of(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's quantization entry (mlx-lm's `quantization`, or the older key)."""
    quant = raw.get("quantization") or raw.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "mxfp4":
        return dict(gpt_oss.MXFP4)  # OpenAI's gpt_oss checkpoints, as mlx-lm reads them
    return quant if isinstance(quant, dict) else None


def module_quantization(quant: dict[str, Any] | None, module: str) -> tuple[int, int, str]:
    """(group size, bits, mode) of `module` as stored: the common entry, or the module's own
    override (mlx-lm writes per-module entries keyed by the module's path)."""
    quant = quant or {}
    params = {"group_size": quant.get("group_size", 64), "bits": quant.get("bits", 4),
              "mode": quant.get("mode", "affine")}
    override = quant.get(module)
    if isinstance(override, dict):
        # mlx-lm quantizes a module with its override's fields alone (the others default):
        # an override without a mode is affine even in an mxfp4 model (gpt_oss's 8-bit router).
        params.update({"mode": "affine", **override})
    return int(params["group_size"]), int(params["bits"]), str(params["mode"])


FLOAT_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
SERVING_DTYPES = ("keep", "auto", *FLOAT_DTYPES)


def float32_bytes(model_dir: Path) -> int:
    """What the checkpoint's weights take dequantized to float32 (headers only: mx.load maps
    lazily)."""
    quant = quantization_of(read_config(model_dir))
    total = 0
    for path in safetensor_files(model_dir):
        tensors = mx.load(str(path))
        for name, value in tensors.items():
            module, _, kind = name.rpartition(".")
            quantized = module + ".scales" in tensors
            if (quantized and kind in ("scales", "biases")) or (
                    name.endswith("_scales") and name[:-7] + "_blocks" in tensors):
                continue
            # OpenAI's mxfp4 `_blocks` hold two 4-bit codes a byte.
            elements = value.size * 2 if name.endswith("_blocks") else value.size
            if quantized and kind == "weight":
                elements = value.size * 32 // module_quantization(quant, module)[1]
            total += 4 * elements
    return total


def serving_dtype(name: str, model_dir: Path, available_bytes: int) -> mx.Dtype | None:
    """The dtype to load: None keeps the checkpoint as stored ("keep"); a float dtype
    dequantizes and casts to it. "auto" keeps on Metal and CUDA; on CPU, where float32 matmuls
    are the fastest, it picks float32 when the model fits in `available_bytes` at float32."""
    if name == "keep":
        return None
    if name in FLOAT_DTYPES:
        return FLOAT_DTYPES[name]
    if name != "auto":
        raise ValueError(f"dtype must be one of {', '.join(SERVING_DTYPES)}, not {name!r}")
    if mx.default_device() != mx.cpu:
        return None
    return mx.float32 if float32_bytes(model_dir) <= available_bytes else None
