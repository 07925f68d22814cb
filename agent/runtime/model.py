"""The decoder flock runs: llama-family weights as plain arrays, projections fused at load time.

One implementation covers llama, mistral (sliding-window layers where `layer_types` marks
them, runtime/attention_window.py), qwen2 (q/k/v bias), qwen3 (q/k norms) and the
mixture-of-experts families qwen3_moe, qwen2_moe (shared expert) and mixtral, whose experts are
stacked tensors computed by `runtime/moe.py`, and gpt_oss (attention sinks, biased router and
experts, runtime/gpt_oss.py). Keeping the
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
from agent.models.tensors import LayerRange, holds_head, safetensor_files, stage_wants
from agent.runtime import gpt_oss
from agent.runtime.attention_window import sliding_layers
from agent.runtime.checkpoint_quant import (  # noqa: F401  (the dtype names are re-exported)
    FLOAT_DTYPES,
    SERVING_DTYPES,
    float32_bytes,
    module_quantization,
    quantization_of,
    serving_dtype,
)

DENSE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
MOE_ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss")
SUPPORTED_ARCHITECTURES = (*DENSE_ARCHITECTURES, *MOE_ARCHITECTURES)
# mlx-lm's defaults where a family's config is silent (its ModelArgs).
_ROPE_THETA = {"qwen2_moe": 1e6, "mixtral": 1e6, "gpt_oss": gpt_oss.ROPE_THETA}
_EPS = {"mixtral": 1e-5, "gpt_oss": gpt_oss.RMS_NORM_EPS}


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
    # Mixture of experts (0 experts: every layer is dense).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_size: int = 0  # qwen2_moe's always-on expert, gated by a sigmoid
    dense_layers: frozenset[int] = frozenset()  # MoE models' layers that keep a dense MLP
    # Sliding-window attention (runtime/attention_window.py): the window, and which layers.
    sliding_window: int = 0
    sliding_layers: frozenset[int] = frozenset()

    @property
    def moe_module(self) -> str:
        """The layer's submodule holding router and experts, as mlx-lm names it."""
        return "block_sparse_moe" if self.architecture == "mixtral" else "mlp"

    def is_sparse(self, index: int) -> bool:
        return self.num_experts > 0 and index not in self.dense_layers

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
        layers = int(cfg["num_hidden_layers"])
        experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) \
            if arch in MOE_ARCHITECTURES else 0
        dense: frozenset[int] = frozenset()
        if arch == "qwen3_moe":  # as Qwen3MoeDecoderLayer picks (qwen2_moe: every layer)
            step = int(cfg.get("decoder_sparse_step") or 1)
            dense = frozenset(i for i in range(layers) if (i + 1) % step or
                              i in set(cfg.get("mlp_only_layers") or ()))
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        window, sliding = sliding_layers(cfg, arch, layers)
        if arch == "mixtral":
            head_dim = hidden // heads  # mlx-lm's mixtral ignores head_dim
        return cls(
            architecture=arch,
            hidden_size=hidden,
            num_layers=layers,
            intermediate_size=int(cfg.get("intermediate_size") or 0),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", _EPS.get(arch, 1e-6))),
            rope_theta=float(cfg.get("rope_theta", _ROPE_THETA.get(arch, 10000.0))),
            rope_traditional=bool(cfg.get("rope_traditional", False)),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
            # mlx-lm's gpt_oss always has its own head.
            tie_word_embeddings=arch != "gpt_oss" and bool(cfg.get(
                "tie_word_embeddings", arch not in ("qwen2", "qwen2_moe", "mixtral"))),
            # mlx-lm's qwen2_moe and gpt_oss always have q/k/v biases, mixtral, qwen3_moe never.
            attention_bias=arch in ("qwen2_moe", "gpt_oss") or (
                arch not in MOE_ARCHITECTURES and bool(cfg.get("attention_bias", arch == "qwen2"))),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            num_experts=experts,
            experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
            # mixtral's experts are intermediate_size wide; the qwen families name their own.
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or
                                      cfg.get("intermediate_size") or 0) if experts else 0,
            norm_topk_prob=arch == "qwen3_moe" and bool(cfg.get("norm_topk_prob", False)),
            shared_expert_size=int(cfg.get("shared_expert_intermediate_size") or 0)
            if arch == "qwen2_moe" else 0,
            dense_layers=dense,
            sliding_window=window,
            sliding_layers=sliding,
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
    sinks: mx.array | None = None  # gpt_oss: a softmax sink logit per head (attention_sinks.py)


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
class SparseMoe:
    """A mixture-of-experts MLP (runtime/moe.py computes it). The experts' projections are
    stacked Linears with a leading expert axis: gate_up (experts, 2 x width, hidden) fused like
    FusedGateUp, down (experts, hidden, width) when quantized (kept for `mx.gather_qmm`) but
    (experts, width, hidden) when dense: transposed at load (`experts_down`), because on CPU a
    token's product with an expert's down matrix streams faster along rows of the hidden width
    (8 layers of 4 experts here: 3.4 ms against 3.9 ms a step). `routing` is how the family
    picks and weighs its experts:
    "softmax_topk" (qwen3_moe, qwen2_moe: softmax over all experts, then the top k,
    renormalised when `norm_topk`) or "topk_softmax" (mixtral: top k logits, then softmax)."""

    router: Linear
    gate_up: FusedGateUp | SplitGateUp
    down: Linear
    top_k: int
    routing: str
    norm_topk: bool = False
    # mlx-lm's families differ in how they take the top k: qwen3_moe partitions the
    # probabilities (`argpartition(p, -k)[-k:]`), the others their negation; the order of the
    # k experts changes the order of the weighted sum, so each is taken as its family does.
    top_from_negated: bool = True
    shared: Mlp | None = None  # qwen2_moe's shared expert, weighted by sigmoid(shared_gate)
    shared_gate: Linear | None = None
    activation: str = "swiglu"  # or "swiglu_oai" (gpt_oss's clamped one, runtime/gpt_oss.py)


@dataclass
class Layer:
    attn_norm: mx.array
    ffn_norm: mx.array
    attn: Attention
    mlp: Mlp | SparseMoe


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
    Stacked experts (a leading expert axis) are joined along their rows, axis -2.
    """
    axis = parts[0].weight.ndim - 2
    biases = [p.bias for p in parts]
    if any(b is not None for b in biases) and not all(b is not None for b in biases):
        return None
    bias = None
    if biases[0] is not None:
        bias = mx.concatenate(biases, axis=-1)  # type: ignore[arg-type]
    if all(isinstance(p, Dense) for p in parts):
        return Dense(mx.concatenate([p.weight for p in parts], axis=axis), bias)
    quantized = [p for p in parts if isinstance(p, Quantized)]
    if len(quantized) < len(parts) or len({p.params for p in quantized}) > 1:
        return None
    first = quantized[0]
    weight = mx.concatenate([p.weight for p in quantized], axis=axis)
    scales = mx.concatenate([p.scales for p in quantized], axis=axis)
    offsets = None
    if first.biases is not None:
        offsets = mx.concatenate([p.biases for p in quantized], axis=axis)  # type: ignore[misc]
    return Quantized(weight, scales, offsets, first.group_size, first.bits, first.mode, bias)


# HF mixtral checkpoints name each expert's projections w1 (gate), w2 (down), w3 (up).
_MIXTRAL_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def experts_down(down: Linear) -> Linear:
    """The experts' down projections as SparseMoe holds them: dense ones transposed to
    (experts, width, hidden), contiguous (the same numbers, read along the hidden axis)."""
    if not isinstance(down, Dense):
        return down
    return Dense(mx.contiguous(down.weight.swapaxes(-1, -2)), down.bias)


def _stack(experts: list[Linear]) -> Linear:
    """Per-expert projections as one stacked Linear (a leading expert axis), as mlx-lm's
    sanitize stacks them into switch_mlp."""
    first = experts[0]
    bias = None if first.bias is None else mx.stack([e.bias for e in experts])  # type: ignore
    if isinstance(first, Dense):
        return Dense(mx.stack([e.weight for e in experts]), bias)
    quantized = [e for e in experts if isinstance(e, Quantized)]
    if len(quantized) < len(experts) or len({e.params for e in quantized}) > 1:
        raise UnsupportedModel("a MoE layer's experts are not all quantized alike")
    offsets = None if first.biases is None else mx.stack([e.biases for e in quantized])  # type: ignore
    return Quantized(mx.stack([e.weight for e in quantized]),
                     mx.stack([e.scales for e in quantized]), offsets, first.group_size,
                     first.bits, first.mode, bias)


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
    auto_projects = projects is None
    projects = layers.stop == config.num_layers if projects is None else projects
    weights = load_weights(model_dir, config, layers, embeds=embeds, projects=projects)
    if auto_projects and projects and not holds_head(weights, config.tie_word_embeddings):
        # A last stage's shard fetched without the head weights: it does not project (the
        # head projects the whole vocabulary, as before `vocab_split.py`).
        projects = False
        weights = {name: value for name, value in weights.items()
                   if stage_wants(name, layers, embeds, False, config.tie_word_embeddings)}
    if config.architecture == gpt_oss.ARCHITECTURE:
        weights = gpt_oss.sanitize(weights)
    # The dtype hidden states are computed in. Kept on CPU it is float32 whatever the checkpoint
    # stores (MLX's CPU kernels are several times slower in float16/bfloat16; widening norms and
    # quantization scales is exact); elsewhere it is what the checkpoint stores.
    compute = dtype
    if compute is None:
        stored = weights[f"model.layers.{layers.start}.input_layernorm.weight"].dtype
        compute = mx.float32 if mx.default_device() == mx.cpu else stored

    tp = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    widths = {"heads": config.num_heads, "KV heads": config.num_kv_heads}
    if any(not config.is_sparse(i) for i in range(config.num_layers)):
        widths["the MLP width"] = config.intermediate_size
    if config.num_experts:  # each rank holds a slice of every expert's width
        widths["the experts' width"] = config.moe_intermediate_size
    if config.shared_expert_size:
        widths["the shared expert's width"] = config.shared_expert_size
    bad = [f"{name} ({value})" for name, value in widths.items() if value % tp]
    if bad:
        raise UnsupportedModel(
            f"tensor parallel over {tp} ranks needs {tp} to divide {', '.join(bad)}")
    hd = config.head_dim

    def part(w: mx.array, axis: int) -> mx.array:
        size = w.shape[axis] // tp
        index = [slice(None)] * w.ndim
        index[axis] = slice(rank * size, (rank + 1) * size)
        return w[tuple(index)]

    # Axes from the end, so stacked experts (a leading expert axis) split like matrices.
    def rows(w: mx.array) -> mx.array:
        # The slice of output rows this rank owns ("all-to-sharded").
        return part(w, w.ndim - 2) if tp > 1 else w

    def cols(w: mx.array) -> mx.array:
        # The slice of input columns this rank owns ("sharded-to-all").
        return part(w, w.ndim - 1) if tp > 1 else w

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
        if bias is not None and split is rows and tp > 1:
            bias = part(bias, bias.ndim - 1)
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
            inputs = weight.shape[-1] * 32 // bits
            if (inputs // tp) % group_size:
                raise UnsupportedModel(
                    f"tensor parallel over {tp} ranks splits {name}'s {inputs} inputs into "
                    f"parts that are not whole quantization groups of {group_size}")
        if split is not None:
            q = Quantized(split(weight), split(scales), None if offsets is None else
                          split(offsets), group_size, bits, mode, bias)
        return q

    def gate_up_of(gate: Linear, up: Linear) -> FusedGateUp | SplitGateUp:
        fused = _concat_rows([gate, up]) if fuse else None
        return FusedGateUp(fused) if fused is not None else SplitGateUp(gate, up)

    def dense_mlp(prefix: str) -> Mlp:
        gate, up = linear(prefix + "gate_proj", rows), linear(prefix + "up_proj", rows)
        return Mlp(gate_up=gate_up_of(gate, up), down=linear(prefix + "down_proj", cols))

    def experts(prefix: str, name: str, split: Callable[[mx.array], mx.array]) -> Linear:
        # mlx-lm's layout (switch_mlp, experts stacked), else the checkpoint's per-expert one.
        for stacked in ("switch_mlp", "experts"):  # experts: gpt_oss's name for them
            if f"{prefix}{stacked}.{name}.weight" in weights:
                return linear(f"{prefix}{stacked}.{name}", split)
        own = _MIXTRAL_EXPERT_NAMES[name] if config.architecture == "mixtral" else name
        return _stack([linear(f"{prefix}experts.{e}.{own}", split)
                       for e in range(config.num_experts)])

    def sparse_moe(prefix: str) -> SparseMoe:
        gate, up = experts(prefix, "gate_proj", rows), experts(prefix, "up_proj", rows)
        shared = dense_mlp(prefix + "shared_expert.") if config.shared_expert_size else None
        oss = config.architecture == gpt_oss.ARCHITECTURE
        return SparseMoe(
            router=linear(prefix + ("router" if oss else "gate")), gate_up=gate_up_of(gate, up),
            down=experts_down(experts(prefix, "down_proj", cols)), top_k=config.experts_per_token,
            routing="topk_softmax" if config.architecture in ("mixtral", "gpt_oss") else
            "softmax_topk", norm_topk=config.norm_topk_prob,
            top_from_negated=config.architecture not in ("qwen3_moe", "gpt_oss"), shared=shared,
            shared_gate=linear(prefix + "shared_expert_gate") if shared else None,
            activation="swiglu_oai" if oss else "swiglu")

    built: list[Layer] = []
    for index in range(layers.start, layers.stop):
        p = f"model.layers.{index}."
        q, k, v = (linear(p + f"self_attn.{n}_proj", rows) for n in "qkv")
        qkv: FusedQKV | SplitQKV = SplitQKV(q, k, v)
        fused_qkv = _concat_rows([q, k, v]) if fuse else None
        if fused_qkv is not None:
            qkv = FusedQKV(fused_qkv)
        mlp = sparse_moe(p + config.moe_module + ".") if config.is_sparse(index) else \
            dense_mlp(p + "mlp.")
        sinks = maybe(p + "self_attn.sinks")  # a head's sink goes with the head
        sinks = part(sinks, 0) if sinks is not None and tp > 1 else sinks
        layer = Layer(
            attn_norm=cast(weights.pop(p + "input_layernorm.weight")),
            ffn_norm=cast(weights.pop(p + "post_attention_layernorm.weight")),
            attn=Attention(qkv=qkv, o=linear(p + "self_attn.o_proj", cols),
                           q_norm=maybe(p + "self_attn.q_norm.weight"),
                           k_norm=maybe(p + "self_attn.k_norm.weight"), sinks=sinks),
            mlp=mlp,
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
