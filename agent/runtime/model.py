"""The decoder flock runs: llama-family weights as plain arrays, projections fused at load time.

One implementation covers llama, mistral, qwen2 (q/k/v bias) and qwen3 (q/k norms). Keeping the
math here, rather than calling mlx-lm's modules, lets the runner batch rows with different
positions, write a preallocated KV cache, compile the whole decode step, hold only a layer range
(pipeline stages) and shard heads (tensor parallel). Checkpoints stay as they are on disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.rope_utils import initialize_rope

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


@dataclass(frozen=True)
class LayerRange:
    """Layers [start, stop) of a model held by one pipeline stage."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"bad layer range [{self.start}, {self.stop})")

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class Dense:
    """A projection's weight (out, in), with its bias when the model has one."""

    weight: mx.array
    bias: mx.array | None = None


Linear = Dense


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


def _concat_rows(parts: list[Dense]) -> Dense:
    """One projection computing `parts`' outputs side by side."""
    biases = [p.bias for p in parts]
    bias = None
    if all(b is not None for b in biases):
        bias = mx.concatenate(biases, axis=0)  # type: ignore[arg-type]
    return Dense(mx.concatenate([p.weight for p in parts], axis=0), bias)


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"no .safetensors weights in {model_dir}")
    return files


def stage_wants(name: str, layers: LayerRange, embeds: bool, projects: bool, tied: bool) -> bool:
    """Whether a stage holding `layers` (and the embedding / the head) needs tensor `name`."""
    if name.startswith("model.layers."):
        index = int(name.split(".")[2])
        return layers.start <= index < layers.stop
    if name.startswith("model.embed_tokens."):
        return embeds or (projects and tied)
    if name.startswith("model.norm."):
        return projects
    if name.startswith("lm_head."):
        return projects and not tied
    return False


def load_weights(model_dir: Path, config: DecoderConfig, layers: LayerRange, *, embeds: bool,
                 projects: bool) -> dict[str, mx.array]:
    """Only the tensors this stage needs; mx.load maps lazily, so others are never read."""
    weights: dict[str, mx.array] = {}
    for path in safetensor_files(model_dir):
        for name, value in mx.load(str(path)).items():
            if stage_wants(name, layers, embeds, projects, config.tie_word_embeddings):
                weights[name] = value
    return weights


def _dequantized(weights: dict[str, mx.array], prefix: str, quant: dict[str, Any] | None,
                 dtype: mx.Dtype) -> mx.array:
    w = weights[prefix + ".weight"]
    scales = weights.get(prefix + ".scales")
    if scales is not None:
        assert quant is not None
        w = mx.dequantize(w, scales, weights.get(prefix + ".biases"),
                          group_size=int(quant["group_size"]), bits=int(quant["bits"]))
    return w.astype(dtype)


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

    Quantized checkpoints are dequantized to `dtype` (float32 on CPU, where MLX runs quantized
    matmuls ~50x slower than float32).
    """
    raw = read_config(model_dir)
    config = DecoderConfig.from_hf(raw)
    layers = layers or LayerRange(0, config.num_layers)
    if layers.stop > config.num_layers:
        raise ValueError(f"layer range {layers} exceeds the model's {config.num_layers} layers")
    dtype = dtype or mx.float32
    quant = raw.get("quantization") or raw.get("quantization_config")
    embeds = layers.start == 0 if embeds is None else embeds
    projects = layers.stop == config.num_layers if projects is None else projects
    weights = load_weights(model_dir, config, layers, embeds=embeds, projects=projects)

    tp = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    if config.num_heads % tp or config.num_kv_heads % tp or config.intermediate_size % tp:
        raise UnsupportedModel(
            f"tensor parallel over {tp} ranks needs {tp} to divide heads ({config.num_heads}), "
            f"KV heads ({config.num_kv_heads}) and the MLP width ({config.intermediate_size})"
        )
    hd = config.head_dim

    def rows(w: mx.array, parts: int) -> mx.array:
        # The slice of output rows this rank owns ("all-to-sharded").
        size = w.shape[0] // parts
        return w[rank * size:(rank + 1) * size] if parts > 1 else w

    def cols(w: mx.array, parts: int) -> mx.array:
        # The slice of input columns this rank owns ("sharded-to-all").
        size = w.shape[1] // parts
        return w[:, rank * size:(rank + 1) * size] if parts > 1 else w

    # Tensors are popped as they are used and each layer is evaluated at once, so the
    # checkpoint's copy is freed as we go and peak memory stays near the final size.
    def get(name: str) -> mx.array:
        value = _dequantized(weights, name, quant, dtype)
        for suffix in (".weight", ".scales", ".biases"):
            weights.pop(name + suffix, None)
        return value

    def maybe(name: str) -> mx.array | None:
        return weights.pop(name).astype(dtype) if name in weights else None

    def linear(name: str, split: Callable[[mx.array, int], mx.array]) -> Dense:
        bias = maybe(name + ".bias")
        if bias is not None and split is rows:
            bias = rows(bias, tp)
        elif bias is not None and rank > 0:
            bias = None  # a column-split output is summed over the ranks: add its bias once
        return Dense(split(get(name), tp), bias)

    built: list[Layer] = []
    for index in range(layers.start, layers.stop):
        p = f"model.layers.{index}."
        q, k, v = (linear(p + f"self_attn.{n}_proj", rows) for n in "qkv")
        gate, up = linear(p + "mlp.gate_proj", rows), linear(p + "mlp.up_proj", rows)
        qkv: FusedQKV | SplitQKV = SplitQKV(q, k, v)
        gate_up: FusedGateUp | SplitGateUp = SplitGateUp(gate, up)
        if fuse:
            qkv = FusedQKV(_concat_rows([q, k, v]))
            gate_up = FusedGateUp(_concat_rows([gate, up]))
        layer = Layer(
            attn_norm=weights.pop(p + "input_layernorm.weight").astype(dtype),
            ffn_norm=weights.pop(p + "post_attention_layernorm.weight").astype(dtype),
            attn=Attention(qkv=qkv, o=linear(p + "self_attn.o_proj", cols),
                           q_norm=maybe(p + "self_attn.q_norm.weight"),
                           k_norm=maybe(p + "self_attn.k_norm.weight")),
            mlp=Mlp(gate_up=gate_up, down=linear(p + "mlp.down_proj", cols)),
        )
        mx.eval(arrays_of(layer))
        built.append(layer)

    embed = None
    if embeds or (projects and config.tie_word_embeddings):
        embed = Dense(get("model.embed_tokens"))
    decoder = Decoder(
        config=config,
        layers_range=layers,
        layers=built,
        embed=embed,
        norm=weights.pop("model.norm.weight").astype(dtype) if projects else None,
        lm_head=Dense(get("lm_head")) if projects and not config.tie_word_embeddings else None,
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
