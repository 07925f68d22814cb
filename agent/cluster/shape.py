"""A model's shape for placement: layer count, heads and bytes, read from its directory.

Sizes come from the safetensors headers (only the JSON header of each file is read) when the
weights are there, else from config.json's dimensions. Runners dequantize checkpoints to the
serving dtype at load, so bytes here are parameter counts times `dtype_bytes`, not file sizes.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from agent.cluster.state import ModelShape

_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.")
_HEADER_LIMIT = 100 << 20  # a sane bound for the JSON header; guards against garbage files


def model_shape(model_dir: Path, name: str, dtype_bytes: int = 4) -> ModelShape:
    """The placement facts of the model in `model_dir`, sized for `dtype_bytes` per value."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dims = _Dims(config)
    tensors = _tensor_shapes(Path(model_dir))
    if tensors:
        layer_params, embedding_params = _counted_params(tensors, config, dims)
    else:
        layer_params, embedding_params = dims.layer_params(), dims.embedding_params()
    return ModelShape(
        name=name,
        num_layers=dims.layers,
        num_heads=dims.heads,
        num_kv_heads=dims.kv_heads,
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        vocab_size=dims.vocab,
        tie_word_embeddings=dims.tied,
        layer_bytes=layer_params * dtype_bytes,
        embedding_bytes=embedding_params * dtype_bytes,
        # Keys and values: kv_heads x head_dim each, per token, per layer.
        kv_bytes_per_token_per_layer=2 * dims.kv_heads * dims.head_dim * dtype_bytes,
        context_length=dims.context,
        dtype_bytes=dtype_bytes,
    )


class _Dims:
    """The dimensions config.json states, with the defaults mlx-lm's llama family assumes."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads") or self.heads)
        self.hidden = int(config["hidden_size"])
        self.intermediate = int(config["intermediate_size"])
        self.vocab = int(config["vocab_size"])
        self.head_dim = int(config.get("head_dim") or self.hidden // self.heads)
        arch = config.get("model_type", "")
        self.tied = bool(config.get("tie_word_embeddings", arch != "qwen2"))
        self.bias = bool(config.get("attention_bias", arch == "qwen2"))
        self.qk_norm = arch == "qwen3"
        self.context = int(config.get("max_position_embeddings") or 4096)

    def layer_params(self) -> int:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        attention = self.hidden * q + 2 * self.hidden * kv + q * self.hidden
        if self.bias:
            attention += q + 2 * kv
        if self.qk_norm:
            attention += 2 * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden
        return attention + mlp + norms

    def embedding_params(self) -> int:
        embed = self.vocab * self.hidden
        return embed if self.tied else 2 * embed


def _tensor_shapes(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) over every safetensors file, from the headers alone."""
    tensors: dict[str, tuple[str, list[int]]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _HEADER_LIMIT:
                raise ValueError(f"{path}: safetensors header of {size} bytes is not plausible")
            header = json.loads(f.read(size))
        for tensor, info in header.items():
            if tensor != "__metadata__":
                tensors[tensor] = (info["dtype"], list(info["shape"]))
    return tensors


def _counted_params(tensors: dict[str, tuple[str, list[int]]], config: dict[str, Any],
                    dims: _Dims) -> tuple[int, int]:
    """(largest layer's parameters, embedding + head parameters) as the runner will hold them."""
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = int(quant.get("bits", 0)) if isinstance(quant, dict) else 0
    per_layer: dict[int, int] = {}
    embedding = 0
    for tensor, (dtype, shape) in tensors.items():
        if tensor.endswith((".scales", ".biases")) and _is_quant_side(tensor, tensors):
            continue  # dropped once the weight is dequantized
        count = 1
        for extent in shape:
            count *= extent
        if bits and dtype == "U32" and _stem(tensor) + ".scales" in tensors:
            count = count * 32 // bits  # packed: 32 / bits values per stored uint32
        match = _LAYER_TENSOR.match(tensor)
        if match:
            per_layer[int(match.group(1))] = per_layer.get(int(match.group(1)), 0) + count
        elif tensor.startswith(("model.embed_tokens.", "lm_head.")):
            embedding += count
    if not per_layer:
        return dims.layer_params(), dims.embedding_params()
    if embedding == 0:
        embedding = dims.embedding_params()
    # Placement plans with one size per layer; the largest never under-reserves.
    return max(per_layer.values()), embedding


def _stem(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0]


def _is_quant_side(tensor: str, tensors: dict[str, tuple[str, list[int]]]) -> bool:
    return _stem(tensor) + ".weight" in tensors and tensors[_stem(tensor) + ".weight"][0] == "U32"
