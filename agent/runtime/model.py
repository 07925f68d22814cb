"""The decoder flock runs: llama-family weights as plain arrays, projections fused at load time.

One implementation covers llama, mistral, qwen2 (q/k/v bias) and qwen3 (q/k norms). Keeping the
math here, rather than calling mlx-lm's modules, lets the runner batch rows with different
positions, write a preallocated KV cache, compile the whole decode step, hold only a layer range
(pipeline stages) and shard heads (tensor parallel). Checkpoints stay as they are on disk; a
quantized one is served quantized (`mx.quantized_matmul`) or dequantized to a float dtype at load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.rope_utils import initialize_rope

from agent.models.arch import read_config
from agent.models.tensors import LayerRange, safetensor_files, stage_wants

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModel(ValueError):
    """The checkpoint's architecture or layout is one flock's decoder does not run."""


@dataclass(frozen=True)
class DecoderConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_traditional: bool
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> DecoderConfig:
        arch = cfg.get("model_type", "")
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(SUPPORTED_ARCHITECTURES)
            raise UnsupportedModel(
                f"architecture '{arch}' is not supported (supported: {supported})"
            )
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            architecture=arch,
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_traditional=bool(cfg.get("rope_traditional", False)),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch != "qwen2")),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            qk_norm=arch == "qwen3",
        )


@dataclass
class Dense:
    """A projection's weight (out, in), with its bias when the model has one."""

    weight: mx.array
    bias: mx.array | None = None


@dataclass
class Quantized:
    """A projection kept as MLX stores it quantized (mlx-community's layout): `weight` packs
    `bits`-bit codes into uint32, with a scale (and, in affine mode, an offset) per
    `group_size` inputs; `bias` is the layer's own additive bias, as with Dense."""

    weight: mx.array
    scales: mx.array
    biases: mx.array | None
    group_size: int
    bits: int
    mode: str = "affine"
    bias: mx.array | None = None

    @property
    def params(self) -> tuple[int, int, str]:
        return self.group_size, self.bits, self.mode


Linear = Dense | Quantized


@dataclass
class FusedQKV:
    """[q; k; v] rows in one matrix: one matmul instead of three (the input is read once, and
    at batch 1 the per-call overhead of small matmuls dominates on CPU)."""

    qkv: Linear


@dataclass
class SplitQKV:
    q: Linear
    k: Linear
    v: Linear


@dataclass
class Attention:
    qkv: FusedQKV | SplitQKV
    o: Linear
    q_norm: mx.array | None = None  # qwen3 normalises q and k per head
    k_norm: mx.array | None = None


@dataclass
class FusedGateUp:
    """[gate; up] rows in one matrix, for the same reason as FusedQKV."""

    gate_up: Linear


@dataclass
class SplitGateUp:
    gate: Linear
    up: Linear


@dataclass
class Mlp:
    gate_up: FusedGateUp | SplitGateUp
    down: Linear


@dataclass
class Layer:
    attn_norm: mx.array
    ffn_norm: mx.array
    attn: Attention
    mlp: Mlp


def arrays_of(value: object) -> list[mx.array]:
    """Every array held by `value` (a weight type of this module, or a list of them)."""
    if isinstance(value, mx.array):
        return [value]
    if isinstance(value, list | tuple):
        return [a for item in value for a in arrays_of(item)]
    if hasattr(value, "__dataclass_fields__"):
        return [a for item in vars(value).values() for a in arrays_of(item)]
    return []


@dataclass
class Decoder:
    """Weights of one stage: embedding when first, norm and head when last, and its layers."""

    config: DecoderConfig
    layers_range: LayerRange
    layers: list[Layer]
    embed: Linear | None
    norm: mx.array | None
    lm_head: Linear | None  # None with tied embeddings: the embedding is used instead
    rope: Any
    dtype: mx.Dtype  # of hidden states, the KV cache and the links' activations
    # Heads held by this rank (tensor parallel divides them).
    local_heads: int = 0
    local_kv_heads: int = 0
    group: Any = None  # mx.distributed group for tensor parallel, None when alone
    # Whether this stage turns token ids into hidden states, and hidden states into logits.
    # A pipeline's head does both: the last stage hands its hidden states back to the head,
    # so sampling, stop strings and the scheduler live in one process.
    embeds: bool = True
    projects: bool = True

    @property
    def head(self) -> Linear:
        head = self.lm_head if self.lm_head is not None else self.embed
        assert head is not None
        return head

    def weight_bytes(self) -> int:
        return sum(a.nbytes for a in arrays_of([self.layers, self.embed, self.norm,
                                                self.lm_head]))


def _concat_rows(parts: list[Linear]) -> Linear | None:
    """One projection computing `parts`' outputs side by side, or None when that would not be
    exact. Quantization groups run along each row's inputs, so stacking the rows of projections
    quantized alike (same group size, bits and mode) gives the same codes and the same products.
    """
    biases = [p.bias for p in parts]
    if any(b is not None for b in biases) and not all(b is not None for b in biases):
        return None
    bias = None
    if biases[0] is not None:
        bias = mx.concatenate(biases, axis=0)  # type: ignore[arg-type]
    if all(isinstance(p, Dense) for p in parts):
        return Dense(mx.concatenate([p.weight for p in parts], axis=0), bias)
    quantized = [p for p in parts if isinstance(p, Quantized)]
    if len(quantized) < len(parts) or len({p.params for p in quantized}) > 1:
        return None
    first = quantized[0]
    weight = mx.concatenate([p.weight for p in quantized], axis=0)
    scales = mx.concatenate([p.scales for p in quantized], axis=0)
    offsets = None
    if first.biases is not None:
        offsets = mx.concatenate([p.biases for p in quantized], axis=0)  # type: ignore[misc]
    return Quantized(weight, scales, offsets, first.group_size, first.bits, first.mode, bias)


def quantization_of(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's quantization entry (mlx-lm's `quantization`, or the older key)."""
    quant = raw.get("quantization") or raw.get("quantization_config")
    return quant if isinstance(quant, dict) else None


def module_quantization(quant: dict[str, Any] | None, module: str) -> tuple[int, int, str]:
    """(group size, bits, mode) of `module` as stored: the common entry, or the module's own
    override (mlx-lm writes per-module entries keyed by the module's path)."""
    quant = quant or {}
    params = {"group_size": quant.get("group_size", 64), "bits": quant.get("bits", 4),
              "mode": quant.get("mode", "affine")}
    override = quant.get(module)
    if isinstance(override, dict):
        params.update(override)
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
            if quantized and kind in ("scales", "biases"):
                continue
            elements = value.size
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


def load_weights(model_dir: Path, config: DecoderConfig, layers: LayerRange, *, embeds: bool,
                 projects: bool) -> dict[str, mx.array]:
    """Only the tensors this stage needs; mx.load maps lazily, so others are never read."""
    weights: dict[str, mx.array] = {}
    for path in safetensor_files(model_dir):
        for name, value in mx.load(str(path)).items():
            if stage_wants(name, layers, embeds, projects, config.tie_word_embeddings):
                weights[name] = value
    return weights


def _dequantized(q: Quantized, dtype: mx.Dtype) -> mx.array:
    # In float32 first, so a float32 load carries no rounding from the scales' own dtype.
    scales = q.scales.astype(mx.float32) if mx.issubdtype(q.scales.dtype, mx.floating) else \
        q.scales
    biases = None if q.biases is None else q.biases.astype(mx.float32)
    return mx.dequantize(q.weight, scales, biases, group_size=q.group_size, bits=q.bits,
                         mode=q.mode).astype(dtype)


def load_decoder(
    model_dir: Path,
    *,
    layers: LayerRange | None = None,
    dtype: mx.Dtype | None = None,
    fuse: bool = True,
    group: Any = None,
    embeds: bool | None = None,
    projects: bool | None = None,
) -> Decoder:
    """Load a stage of the model at `model_dir`, optionally sharded over a tensor-parallel group.

    `dtype` None keeps the checkpoint as stored: quantized projections (and the embedding) stay
    quantized, served with `mx.quantized_matmul`, and the other tensors keep their stored dtype
    (widened to float32 on CPU, see `compute` below). A float `dtype` dequantizes and casts
    everything to it (float32 is fastest on CPU when it fits).
    """
    raw = read_config(model_dir)
    config = DecoderConfig.from_hf(raw)
    layers = layers or LayerRange(0, config.num_layers)
    if layers.stop > config.num_layers:
        raise ValueError(f"layer range {layers} exceeds the model's {config.num_layers} layers")
    keep = dtype is None
    quant = quantization_of(raw)
    embeds = layers.start == 0 if embeds is None else embeds
    projects = layers.stop == config.num_layers if projects is None else projects
    weights = load_weights(model_dir, config, layers, embeds=embeds, projects=projects)
    # The dtype hidden states are computed in. Kept on CPU it is float32 whatever the checkpoint
    # stores (MLX's CPU kernels are several times slower in float16/bfloat16; widening norms and
    # quantization scales is exact); elsewhere it is what the checkpoint stores.
    compute = dtype
    if compute is None:
        stored = weights[f"model.layers.{layers.start}.input_layernorm.weight"].dtype
        compute = mx.float32 if mx.default_device() == mx.cpu else stored

    tp = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    if config.num_heads % tp or config.num_kv_heads % tp or config.intermediate_size % tp:
        raise UnsupportedModel(
            f"tensor parallel over {tp} ranks needs {tp} to divide heads ({config.num_heads}), "
            f"KV heads ({config.num_kv_heads}) and the MLP width ({config.intermediate_size})"
        )
    hd = config.head_dim

    def rows(w: mx.array) -> mx.array:
        # The slice of output rows this rank owns ("all-to-sharded").
        size = w.shape[0] // tp
        return w[rank * size:(rank + 1) * size] if tp > 1 else w

    def cols(w: mx.array) -> mx.array:
        # The slice of input columns this rank owns ("sharded-to-all").
        size = w.shape[1] // tp
        return w[:, rank * size:(rank + 1) * size] if tp > 1 else w

    def cast(a: mx.array) -> mx.array:
        return a.astype(compute) if mx.issubdtype(a.dtype, mx.floating) else a

    def maybe(name: str) -> mx.array | None:
        return cast(weights.pop(name)) if name in weights else None

    # Tensors are popped as they are used and each layer is evaluated at once, so the
    # checkpoint's copy is freed as we go and peak memory stays near the final size.
    def linear(name: str, split: Callable[[mx.array], mx.array] | None = None) -> Linear:
        weight = weights.pop(name + ".weight")
        scales = weights.pop(name + ".scales", None)
        offsets = weights.pop(name + ".biases", None)
        bias = maybe(name + ".bias")
        if bias is not None and split is rows:
            bias = rows(bias)
        elif bias is not None and split is cols and rank > 0:
            bias = None  # a column-split output is summed over the ranks: add its bias once
        if scales is None:
            return Dense(cast(weight) if split is None else split(cast(weight)), bias)
        group_size, bits, mode = module_quantization(quant, name)
        q = Quantized(weight, cast(scales), None if offsets is None else cast(offsets),
                      group_size, bits, mode, bias)
        if not keep:
            w = _dequantized(q, compute)
            return Dense(w if split is None else split(w), bias)
        if split is cols and tp > 1:
            inputs = weight.shape[1] * 32 // bits
            if (inputs // tp) % group_size:
                raise UnsupportedModel(
                    f"tensor parallel over {tp} ranks splits {name}'s {inputs} inputs into "
                    f"parts that are not whole quantization groups of {group_size}")
        if split is not None:
            q = Quantized(split(weight), split(scales), None if offsets is None else
                          split(offsets), group_size, bits, mode, bias)
        return q

    built: list[Layer] = []
    for index in range(layers.start, layers.stop):
        p = f"model.layers.{index}."
        q, k, v = (linear(p + f"self_attn.{n}_proj", rows) for n in "qkv")
        gate, up = linear(p + "mlp.gate_proj", rows), linear(p + "mlp.up_proj", rows)
        qkv: FusedQKV | SplitQKV = SplitQKV(q, k, v)
        gate_up: FusedGateUp | SplitGateUp = SplitGateUp(gate, up)
        fused_qkv = _concat_rows([q, k, v]) if fuse else None
        fused_gate_up = _concat_rows([gate, up]) if fuse else None
        if fused_qkv is not None:
            qkv = FusedQKV(fused_qkv)
        if fused_gate_up is not None:
            gate_up = FusedGateUp(fused_gate_up)
        layer = Layer(
            attn_norm=cast(weights.pop(p + "input_layernorm.weight")),
            ffn_norm=cast(weights.pop(p + "post_attention_layernorm.weight")),
            attn=Attention(qkv=qkv, o=linear(p + "self_attn.o_proj", cols),
                           q_norm=maybe(p + "self_attn.q_norm.weight"),
                           k_norm=maybe(p + "self_attn.k_norm.weight")),
            mlp=Mlp(gate_up=gate_up, down=linear(p + "mlp.down_proj", cols)),
        )
        mx.eval(arrays_of(layer))
        built.append(layer)

    embed = None
    if embeds or (projects and config.tie_word_embeddings):
        embed = linear("model.embed_tokens")
    decoder = Decoder(
        config=config,
        layers_range=layers,
        layers=built,
        embed=embed,
        norm=cast(weights.pop("model.norm.weight")) if projects else None,
        lm_head=linear("lm_head") if projects and not config.tie_word_embeddings else None,
        dtype=compute,
        rope=initialize_rope(hd, config.rope_theta, config.rope_traditional,
                             config.rope_scaling, config.max_position_embeddings),
        local_heads=config.num_heads // tp,
        local_kv_heads=config.num_kv_heads // tp,
        group=group,
        embeds=embeds,
        projects=projects,
    )
    mx.eval(arrays_of([decoder.embed, decoder.norm, decoder.lm_head]))
    return decoder
