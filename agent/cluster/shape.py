"""A model's shape for placement: layer count, heads and bytes, read from its directory.

Dimensions come from the architecture registry (agent/models/arch.py), which reads any
config.json, nested `text_config` included. Sizes come from the safetensors headers (only the
JSON header of each file is read) when the weights are there, else from the dimensions. Bytes
are what a runner holds at the serving format: parameter counts times `dtype_bytes` for a float
dtype (runners dequantize), or the stored bytes for `dtype="keep"` (quantization kept).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

from agent.cluster.state import ModelShape, NodeProfile
from agent.models import arch

_HEADER_LIMIT = 100 << 20  # a sane bound for the JSON header; guards against garbage files
_FLOAT_BYTES = {4: "float32", 2: "float16"}
SERVING_DTYPES = ("keep", *arch.WEIGHT_DTYPES)  # what runners can load


def model_shape(model_dir: Path, name: str, dtype_bytes: int = 4, *,
                dtype: str | None = None) -> ModelShape:
    """The placement facts of the model in `model_dir`, sized for `dtype_bytes` per value, or
    for `dtype` ("float32", "float16", "bfloat16", "keep") when given.

    Raises UnsupportedArchitecture (a ValueError) for a model nothing here can run, or whose
    config.json lacks the dimensions placement needs: placing it would only start runners
    that fail.
    """
    config = arch.read_config(Path(model_dir))
    found = arch.check(config)
    dims = arch.shape(config)
    fmt = arch.weight_format(config, dtype or _FLOAT_BYTES.get(dtype_bytes, "float32"))
    element = fmt.element_bytes if dtype else dtype_bytes
    tensors = _tensor_shapes(Path(model_dir))
    counted = _counted_bytes(tensors, dims.quantization, element,
                             keep=dtype in ("keep", "native")) if tensors else None
    if counted is None:
        layer_bytes = max((dims.layer_bytes(i, fmt) for i in range(dims.layers)), default=0)
        embedding_bytes = fmt.matrix_bytes(dims.embedding_params())
        if not dtype:  # the historical rule: every value at dtype_bytes
            layer_bytes = max((sum(dims.layer_params(i)) for i in range(dims.layers)),
                              default=0) * dtype_bytes
            embedding_bytes = dims.embedding_params() * dtype_bytes
    else:
        layer_bytes, embedding_bytes = counted
        if embedding_bytes == 0:
            embedding_bytes = dims.embedding_params() * element
    return ModelShape(
        name=name,
        num_layers=dims.layers,
        num_heads=dims.heads,
        num_kv_heads=dims.kv_heads,
        hidden_size=dims.hidden,
        intermediate_size=dims.moe_intermediate if dims.experts else dims.intermediate,
        vocab_size=dims.vocab,
        tie_word_embeddings=dims.tied,
        layer_bytes=layer_bytes,
        embedding_bytes=embedding_bytes,
        # The largest layer's cache per token: full attention keeps keys and values of
        # kv_heads x head_dim, latent attention one compressed row, recurrent layers nothing.
        kv_bytes_per_token_per_layer=dims.max_kv_bytes_per_token(element),
        context_length=dims.context,
        dtype_bytes=element,
        strategies=found.strategies,
        architecture=found.model_type,
        dtype=dtype if dtype in ("keep", *arch.WEIGHT_DTYPES) else "float32",
    )


def model_bytes(shape: ModelShape) -> int:
    """Every layer and the embedding, at the shape's serving format."""
    return shape.num_layers * shape.layer_bytes + shape.embedding_bytes


def serving_dtype(requested: str, *, float32_bytes: int, nodes: list[NodeProfile]) -> str:
    """What an instance's runners load, decided once by the leader for every rank.

    An explicit choice stands. "auto" keeps a checkpoint as stored on Metal and CUDA; on MLX's
    CPU backend, where float32 is the fast format (float16 decodes ~3x slower there), the
    checkpoint is widened to float32 when that fits the node with the most usable memory, and
    kept as stored otherwise (pooling memory is why a cluster exists).
    """
    if requested != "auto":
        return requested
    if nodes and any(n.backend != "cpu" for n in nodes):
        return "keep"
    largest = max((n.usable_memory_bytes for n in nodes), default=0)
    return "float32" if float32_bytes <= largest else "keep"


def resolved_shape(requested: str, nodes: list[NodeProfile],
                   read: Callable[[str], ModelShape | None]) -> ModelShape | None:
    """The shape at the dtype `requested` resolves to on these nodes, from `read` (the shape at
    one concrete dtype, or None when it cannot be had): the float32 shape decides "auto"."""
    f32 = read("float32")
    if f32 is None:
        return None
    chosen = serving_dtype(requested, float32_bytes=model_bytes(f32), nodes=nodes)
    return f32 if chosen == "float32" else read(chosen)


def shape_for_dtype(model_dir: Path, name: str, requested: str,
                    nodes: list[NodeProfile]) -> ModelShape:
    """The placement shape at the dtype `requested` resolves to on these nodes."""
    shape = resolved_shape(requested, nodes,
                           lambda dtype: model_shape(model_dir, name, dtype=dtype))
    assert shape is not None  # model_shape raises rather than answering None
    return shape


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


def _counted_bytes(tensors: dict[str, tuple[str, list[int]]],
                   quant: arch.WeightFormat | None, element: int, *,
                   keep: bool) -> tuple[int, int] | None:
    """(largest layer's bytes, embedding + head bytes) as the runner will hold them, or None
    when the names show no layers. Kept: the bytes as stored; else parameters x `element`."""
    per_layer: dict[int, int] = {}
    embedding = 0
    for tensor, (dtype, shape) in tensors.items():
        count = 1
        for extent in shape:
            count *= extent
        if keep:
            size = count * arch.SAFETENSORS_BYTES.get(dtype, 4)
        elif tensor.endswith((".scales", ".biases")) and _is_quant_side(tensor, tensors):
            continue  # dropped once the weight is dequantized
        elif tensor.endswith("_scales") and tensor[:-7] + "_blocks" in tensors:
            continue  # OpenAI's mxfp4 scales, likewise
        else:
            if tensor.endswith("_blocks") and dtype == "U8":
                count *= 2  # OpenAI's mxfp4 blocks: two 4-bit values a byte
            if quant is not None and dtype == "U32" and _stem(tensor) + ".scales" in tensors:
                count = count * 32 // quant.bits  # packed: 32 / bits values per uint32
            size = count * element
        index = arch.layer_index(tensor)
        if index is not None:
            per_layer[index] = per_layer.get(index, 0) + size
        elif arch.is_embedding(tensor) or arch.is_head(tensor):
            embedding += size
    if not per_layer:
        return None
    # Placement plans with one size per layer; the largest never under-reserves.
    return max(per_layer.values()), embedding


def _stem(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0]


def _is_quant_side(tensor: str, tensors: dict[str, tuple[str, list[int]]]) -> bool:
    return _stem(tensor) + ".weight" in tensors and tensors[_stem(tensor) + ".weight"][0] == "U32"
