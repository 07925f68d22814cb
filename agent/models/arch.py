"""The architecture registry: what a model's config.json means, for every part that must know.

Pull, import, the store, spec validation, placement and shard transfer ask this one module which
engine runs a model, which strategies it allows, its dimensions, its bytes per layer at a dtype,
its KV bytes per token and where its layers' tensors live. It is pure: it reads dicts and source
text (mlx-lm's model list and remappings are read from mlx-lm's files, never imported), so the
control plane stays free of MLX.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# Where each layer's tensors live, for shard transfer: offered here, kept in tensors.py.
from agent.models.tensors import (  # noqa: F401 - re-exported as the registry's answer
    LayerRange,
    is_embedding,
    is_final_norm,
    is_head,
    layer_index,
    layer_prefix,
    safetensor_files,
    stage_wants,
)

# How weights are held (float dtypes, affine and mxfp4 quantization): kept in weight_format.py.
from agent.models.weight_format import (
    WEIGHT_DTYPES,
    WeightFormat,
    quantization,
)

Engine = Literal["flock", "mlx-lm"]
Strategy = Literal["single", "pipeline", "tensor"]
LayerKind = Literal["full", "sliding", "latent", "recurrent", "none"]

# What flock's own decoder (runtime/model.py, MoE layers in runtime/moe.py) runs, by
# config.json model_type; mlx-lm's modules run every other architecture mlx-lm ships.
FLOCK_DECODER_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe",
                               "mixtral", "gpt_oss")
# The engine that runs architectures through mlx-lm's own modules is not built yet: until it
# lands nothing may be routed to it, so its architectures are refused with a message saying so.
MLX_LM_ENGINE_AVAILABLE = True
# Pipeline stages of mlx-lm modules slice their layer list (runtime/mlxlm_pipeline.py); offered
# for the modules whose 2-stage slicing is checked against mlx-lm's own generation
# (tests/test_mlxlm_pipeline.py). Others with a layer list are refused by name until covered.
MLX_LM_PIPELINE_AVAILABLE = True
MLX_LM_PIPELINE_MODULES = frozenset({
    "cohere", "deepseek_v2", "deepseek_v3", "gemma2", "gemma3", "gemma3_text", "glm4_moe",
    "gpt_oss", "granite", "lfm2", "minimax", "ministral3", "mixtral", "nemotron_h", "olmo2",
    "phi3", "qwen2_moe", "qwen3_moe", "qwen3_next", "smollm3", "starcoder2",
})

# Safetensors element sizes, for the bytes a checkpoint holds as stored.
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4,
                     "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

class UnsupportedArchitecture(ValueError):
    """A model nothing in flock can run, or a strategy its architecture cannot do."""


# --- mlx-lm's registry, read from its source ------------------------------------------------


@functools.cache
def mlx_lm_root() -> Path | None:
    """mlx-lm's package directory, found without importing it (importing it loads MLX)."""
    try:
        spec = importlib.util.find_spec("mlx_lm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _mlx_lm_constants() -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """(MODEL_REMAPPING, MODEL_ARCHITECTURE_REMAPPING) as mlx_lm/utils.py spells them."""
    root = mlx_lm_root()
    if root is None or not (root / "utils.py").is_file():
        return {}, {}
    found: dict[str, Any] = {}
    for node in ast.parse((root / "utils.py").read_text(encoding="utf-8")).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id in ("MODEL_REMAPPING",
                                                         "MODEL_ARCHITECTURE_REMAPPING"):
            try:
                found[target.id] = ast.literal_eval(node.value)  # type: ignore[union-attr]
            except ValueError:
                continue
    return found.get("MODEL_REMAPPING", {}), found.get("MODEL_ARCHITECTURE_REMAPPING", {})


def model_remapping() -> dict[str, str]:
    """mlx-lm's model_type aliases (e.g. kimi_k2 -> deepseek_v3, mistral -> llama)."""
    return dict(_mlx_lm_constants()[0])


@dataclass(frozen=True)
class MlxLmModule:
    """What an mlx-lm model module offers, read from its source text."""

    name: str
    layer_list: bool  # a `layers` list the pipeline slices (PipelineMixin or a `layers` property)
    shard: bool  # the model's own `shard()` for tensor parallel


@functools.cache
def mlx_lm_module(name: str) -> MlxLmModule | None:
    """mlx-lm's module for `name` (an already remapped model_type), or None if it has none."""
    root = mlx_lm_root()
    if root is None or not re.fullmatch(r"[A-Za-z0-9_]+", name):
        return None
    path = root / "models" / f"{name}.py"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if "class Model(" not in text or "class ModelArgs" not in text:
        return None  # a helper module (cache, rope_utils, switch_layers...)
    return MlxLmModule(name=name, layer_list="def layers" in text or "self.layers" in text,
                       shard="def shard(" in text)


@functools.cache
def mlx_lm_architectures() -> tuple[str, ...]:
    """Every model_type mlx-lm has a module for, aliases included (sorted)."""
    root = mlx_lm_root()
    if root is None:
        return ()
    names = {p.stem for p in (root / "models").glob("*.py") if mlx_lm_module(p.stem)}
    names |= {alias for alias, target in model_remapping().items() if target in names}
    return tuple(sorted(names))


# --- the architecture and its engine ---------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """Which engine runs a model_type and how it may be spread over nodes."""

    model_type: str  # as config.json says
    mlx_lm_module: str | None  # the mlx-lm module that loads it (after remapping), if any
    engine: Engine | None  # flock's decoder, mlx-lm's modules, or None: nothing can
    strategies: tuple[Strategy, ...]  # "single" always when engine is set

    @property
    def runnable(self) -> bool:
        """Whether this flock can serve it now (an engine that exists here)."""
        return self.engine == "flock" or (self.engine == "mlx-lm" and MLX_LM_ENGINE_AVAILABLE)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's settings: `text_config` (vision-language wrappers such as gemma3) merged
    over the top level, the top-level model_type kept (it names the module that loads it)."""
    nested = config.get("text_config")
    if not isinstance(nested, dict):
        return config
    merged = {**config, **nested}
    merged["model_type"] = config.get("model_type", nested.get("model_type"))
    for key in ("quantization", "quantization_config"):  # mlx-community puts these on top
        if key in config:
            merged[key] = config[key]
    return merged


def module_name(config: dict[str, Any]) -> str:
    """The mlx-lm module name mlx-lm's `_get_classes` would pick for this config."""
    model_type = str(config.get("model_type") or "")
    remap, by_class = _mlx_lm_constants()
    classes = config.get("architectures") or ()
    for cls in (classes,) if isinstance(classes, str) else classes:
        if (model_type, cls) in by_class:
            return by_class[(model_type, cls)]
    return remap.get(model_type, model_type)


def architecture(config: dict[str, Any]) -> Architecture:
    """The registry's answer for a config.json (nested text_config allowed)."""
    model_type = str(config.get("model_type") or "")
    module = mlx_lm_module(module_name(config)) if model_type else None
    if model_type in FLOCK_DECODER_ARCHITECTURES:
        return Architecture(model_type, module.name if module else None, "flock",
                            ("single", "pipeline", "tensor"))
    if module is not None:
        strategies: list[Strategy] = ["single"]
        if module.layer_list and MLX_LM_PIPELINE_AVAILABLE and \
                module.name in MLX_LM_PIPELINE_MODULES:
            strategies.append("pipeline")
        if module.shard:
            strategies.append("tensor")
        return Architecture(model_type, module.name, "mlx-lm", tuple(strategies))
    return Architecture(model_type, None, None, ())


def supported_summary() -> str:
    """One sentence on what this flock runs, for refusals."""
    flock = ", ".join(FLOCK_DECODER_ARCHITECTURES)
    count = len(mlx_lm_architectures())
    if MLX_LM_ENGINE_AVAILABLE:
        return f"flock runs {flock} on its own decoder and {count} more through mlx-lm"
    return f"flock runs {flock} (its own decoder) until its mlx-lm engine lands"


def markdown_table() -> str:
    """The supported architectures and engines, as the README shows them."""
    rows = ["| architecture | engine | strategies | available |", "|---|---|---|---|"]
    for model_type in sorted({*FLOCK_DECODER_ARCHITECTURES, *mlx_lm_architectures()}):
        found = architecture({"model_type": model_type})
        rows.append(f"| {model_type} | {found.engine} | {', '.join(found.strategies)} | "
                    f"{'yes' if found.runnable else 'not yet'} |")
    return "\n".join(rows) + "\n"


def refusal(config: dict[str, Any], strategy: str | None = None, ranks: int = 1) -> str | None:
    """Why this model (or this strategy over `ranks` nodes) cannot run here, or None if it can.

    The one check every caller makes before storing, placing or routing a model.
    """
    model_type = config.get("model_type")
    if not model_type:
        return "config.json has no model_type, so flock cannot tell which architecture it is"
    arch = architecture(config)
    if arch.engine is None:
        return f"architecture '{model_type}' is not supported: {supported_summary()}"
    if not arch.runnable:
        return (f"architecture '{model_type}' needs the mlx-lm engine, which this flock does "
                f"not have yet: {supported_summary()}")
    if strategy in ("pipeline", "tensor", "hybrid"):
        wanted: list[Strategy] = ["pipeline", "tensor"] if strategy == "hybrid" else [strategy]
        for need in wanted:
            if need not in arch.strategies:
                allowed = ", ".join(arch.strategies)
                return (f"architecture '{model_type}' cannot run as {need} parallel on the "
                        f"{arch.engine} engine (it allows: {allowed})")
    if strategy == "hybrid" and arch.engine == "mlx-lm":
        return (f"architecture '{model_type}' cannot run tensor groups inside pipeline stages "
                "on the mlx-lm engine (it allows pipeline or tensor parallel, not both)")
    if strategy in ("tensor", "hybrid") and ranks > 1 and arch.engine == "flock":
        try:
            dims = shape(config)
        except UnsupportedArchitecture as exc:
            return str(exc)
        widths = {"heads": dims.heads, "KV heads": dims.kv_heads,
                  "the MLP width": dims.intermediate}
        if dims.experts:
            widths["the experts' width"] = dims.moe_intermediate
        bad = [f"{name} ({value})" for name, value in widths.items() if value % ranks]
        if bad:
            return (f"tensor parallel over {ranks} ranks needs {ranks} to divide "
                    f"{', '.join(bad)} of this '{model_type}' model")
    return None


def refusal_of_dir(model_dir: Path, strategy: str | None = None, ranks: int = 1) -> str | None:
    """`refusal` for a model directory; an unreadable config.json is a refusal too."""
    try:
        config = read_config(model_dir)
    except (OSError, ValueError) as exc:
        return f"{model_dir}/config.json cannot be read: {exc}"
    return refusal(config, strategy, ranks)


def check(config: dict[str, Any], strategy: str | None = None, ranks: int = 1) -> Architecture:
    """`architecture(config)`, raising UnsupportedArchitecture with `refusal`'s message."""
    reason = refusal(config, strategy, ranks)
    if reason is not None:
        raise UnsupportedArchitecture(reason)
    return architecture(config)


DEFAULT_CONTEXT = 4096  # a config that names no context length (mlx-lm's default for them)


def context_length(config: dict[str, Any]) -> int:
    """The model's context window, as its config names it (nested text_config too)."""
    c = text_config(config)
    return int(c.get("max_position_embeddings") or c.get("n_positions") or DEFAULT_CONTEXT)


def read_config(model_dir: Path) -> dict[str, Any]:
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{model_dir}/config.json is not a JSON object")
    return config


# --- weights: formats and names ---------------------------------------------------------------


def weight_format(config: dict[str, Any], dtype: str) -> WeightFormat:
    """What a runner holds for `dtype`: a float dtype, or "keep"/"native" (as stored)."""
    if dtype in WEIGHT_DTYPES:
        return WeightFormat(dtype)
    if dtype in ("keep", "native"):
        kept = quantization(config)
        if kept is not None:
            return kept
        stored = str(text_config(config).get("torch_dtype") or config.get("dtype") or "")
        return WeightFormat(stored if stored in WEIGHT_DTYPES else "float16")
    raise ValueError(f"dtype must be one of {', '.join((*WEIGHT_DTYPES, 'keep'))}, "
                     f"not {dtype!r}")


# --- shape: the dimensions placement needs ---------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A model's dimensions, with the defaults mlx-lm's modules assume where config is silent."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    context: int
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    experts: int = 0  # routed experts per MoE layer (0: dense)
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_experts: int = 0
    shared_intermediate: int = 0
    dense_layers: frozenset[int] = frozenset()  # MoE models' layers that keep a dense MLP
    kinds: tuple[LayerKind, ...] = ()  # per layer
    sliding_window: int | None = None
    kv_lora_rank: int = 0  # latent attention (deepseek_v2/v3): the cached latent's width
    qk_rope_head_dim: int = 0
    recurrent_state_bytes: int = 0  # per recurrent layer at float32, independent of tokens
    quantization: WeightFormat | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def kind(self, index: int) -> LayerKind:
        return self.kinds[index] if index < len(self.kinds) else "full"

    def kv_bytes_per_token(self, index: int, element_bytes: int) -> int:
        """KV bytes layer `index` keeps per token (0 for recurrent layers: fixed state)."""
        kind = self.kind(index)
        if kind == "latent":
            return (self.kv_lora_rank + self.qk_rope_head_dim) * element_bytes
        if kind in ("recurrent", "none"):
            return 0
        return 2 * self.kv_heads * self.head_dim * element_bytes

    def kv_tokens(self, index: int, context: int) -> int:
        """How many tokens' KV layer `index` holds for a `context`-token sequence."""
        if self.kind(index) == "sliding" and self.sliding_window:
            return min(context, self.sliding_window)
        return context if self.kind(index) in ("full", "latent") else 0

    def max_kv_bytes_per_token(self, element_bytes: int) -> int:
        return max((self.kv_bytes_per_token(i, element_bytes) for i in range(self.layers)),
                   default=0)

    def layer_params(self, index: int) -> tuple[int, int]:
        """(matrix values, vector values) of layer `index`, from the dimensions."""
        h = self.hidden
        vectors = 2 * h  # the two norms
        kind = self.kind(index)
        block = self.extra.get("blocks", "")[index:index + 1]
        if block:  # nemotron_h: each layer is one block (mamba, attention, MLP or experts)
            return _single_block_params(self, block), h
        if kind == "recurrent":
            matrices = _recurrent_params(self)
        elif kind == "latent":
            matrices = _latent_params(self)
        else:
            q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            matrices = h * q + 2 * h * kv + q * h
            matrices += h * q if self.model_type == "qwen3_next" else 0  # its gated queries
            vectors += (q + 2 * kv) if self.attention_bias else 0
            vectors += 2 * self.head_dim if self.qk_norm else 0
        if self.experts and index not in self.dense_layers:
            matrices += self.experts * 3 * h * self.moe_intermediate + h * self.experts
            matrices += self.shared_experts * 3 * h * self.shared_intermediate
            # qwen2_moe and qwen3_next weigh their shared expert by a learned sigmoid gate.
            matrices += h if self.model_type in ("qwen2_moe", "qwen3_next") and \
                self.shared_experts else 0
        elif self.intermediate:
            matrices += 3 * h * self.intermediate
            vectors += (2 * self.intermediate + h) if self.mlp_bias else 0
        return matrices, vectors

    def routed_expert_params(self, index: int) -> int:
        """The values of layer `index`'s routed experts' matrices (part of `layer_params`)."""
        if not self.experts or index in self.dense_layers or self.extra.get("blocks"):
            return 0
        return self.experts * 3 * self.hidden * self.moe_intermediate

    def layer_bytes(self, index: int, fmt: WeightFormat) -> int:
        matrices, vectors = self.layer_params(index)
        # OpenAI's mxfp4 layout quantizes the routed experts alone.
        experts = self.routed_expert_params(index) if fmt.experts_only else 0
        return fmt.matrix_bytes(matrices - experts) + fmt.matrix_bytes(experts, experts=True) \
            + fmt.vector_bytes(vectors)

    def embedding_params(self) -> int:
        embed = self.vocab * self.hidden
        return embed if self.tied else 2 * embed


def _single_block_params(s: Shape, block: str) -> int:
    h = s.hidden
    if block == "M":
        return _recurrent_params(s)
    if block == "*":
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        return 2 * h * q + 2 * h * kv
    if block == "E":
        width = s.moe_intermediate
        return s.experts * 2 * h * width + h * s.experts \
            + s.shared_experts * 2 * h * s.shared_intermediate
    return 2 * h * s.intermediate  # "-": a non-gated MLP (up, down)


def _latent_params(s: Shape) -> int:
    e = s.extra
    nope, rope, v = int(e.get("qk_nope_head_dim", 128)), s.qk_rope_head_dim, \
        int(e.get("v_head_dim", 128))
    q_rank = e.get("q_lora_rank")
    q = s.hidden * s.heads * (nope + rope) if not q_rank else \
        s.hidden * int(q_rank) + int(q_rank) * s.heads * (nope + rope)
    kv = s.hidden * (s.kv_lora_rank + rope) + s.kv_lora_rank * s.heads * (nope + v)
    return q + kv + s.heads * v * s.hidden


def _recurrent_params(s: Shape) -> int:
    return int(s.extra.get("recurrent_params", 3 * s.hidden * s.hidden))


def shape(config: dict[str, Any]) -> Shape:
    """The dimensions of any config.json (nested text_config included)."""
    c = text_config(config)
    model_type = str(config.get("model_type") or c.get("model_type") or "")
    hidden = int(_first(c, "hidden_size", "d_model", "n_embd", "dim"))
    heads = int(_first(c, "num_attention_heads", "n_head", "n_heads", default=1))
    kinds = _layer_kinds(c, model_type)
    layers = int(_first(c, "num_hidden_layers", "n_layer", "n_layers", "num_layers",
                        default=len(kinds)))
    if model_type == "nemotron_h":
        layers = len(kinds)  # mlx-lm counts the block pattern, not num_hidden_layers
    experts = int(_first(c, "num_local_experts", "num_experts", "n_routed_experts", default=0))
    extra: dict[str, Any] = {k: c[k] for k in ("qk_nope_head_dim", "v_head_dim", "q_lora_rank")
                             if k in c}
    state = 0
    if "recurrent" in kinds:
        state, extra["recurrent_params"] = _recurrent_state(c, hidden)
    first_dense = int(c.get("first_k_dense_replace", 0) or 0)
    freq = int(c.get("moe_layer_freq", 1) or 1)
    dense = frozenset(i for i in range(layers) if i < first_dense or i % freq)
    dense |= frozenset(int(i) for i in c.get("mlp_only_layers") or ())
    if model_type == "qwen3_moe":  # every step-th layer is sparse (qwen2_moe's: all)
        step = int(c.get("decoder_sparse_step", 1) or 1)
        dense |= frozenset(i for i in range(layers) if (i + 1) % step)
    if model_type == "nemotron_h":
        extra["blocks"] = "".join(_nemotron_pattern(c))
        dense = frozenset(i for i, ch in enumerate(extra["blocks"]) if ch != "E")
    return Shape(
        model_type=model_type,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=int(_first(c, "num_key_value_heads", "n_head_kv", default=0) or heads),
        head_dim=int(c.get("head_dim") or hidden // heads),
        intermediate=int(_first(c, "intermediate_size", "ffn_dim", "n_inner", default=0) or 0),
        vocab=int(_first(c, "vocab_size", "padded_vocab_size")),
        tied=bool(c.get("tie_word_embeddings", model_type not in ("qwen2",))),
        context=context_length(c),
        attention_bias=bool(c.get("attention_bias", model_type in ("qwen2", "qwen2_moe"))),
        mlp_bias=bool(c.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "qwen3_next", "olmo2", "gemma3",
                               "gemma3_text"),
        experts=experts,
        experts_per_token=int(_first(c, "num_experts_per_tok", "experts_per_token",
                                     "num_experts_per_token", default=0) or 0),
        moe_intermediate=int(_first(c, "moe_intermediate_size", "expert_intermediate_size",
                                    "intermediate_size", default=0) or 0) if experts else 0,
        shared_experts=int(c.get("n_shared_experts") or (1 if c.get(
            "shared_expert_intermediate_size") else 0)),
        shared_intermediate=int(_first(c, "shared_expert_intermediate_size",
                                       "moe_shared_expert_intermediate_size",
                                       "moe_intermediate_size", default=0) or 0),
        dense_layers=dense if experts else frozenset(),
        kinds=tuple(kinds[:layers]) if kinds else (),
        sliding_window=int(c["sliding_window"]) if c.get("sliding_window") else None,
        kv_lora_rank=int(c.get("kv_lora_rank") or 0),
        qk_rope_head_dim=int(c.get("qk_rope_head_dim") or 0),
        recurrent_state_bytes=state,
        quantization=quantization(config),
        extra=extra,
    )


def _first(c: dict[str, Any], *keys: str, default: Any = KeyError) -> Any:
    for key in keys:
        if c.get(key) is not None:
            return c[key]
    if default is KeyError:
        raise UnsupportedArchitecture(f"config.json of this '{c.get('model_type')}' model gives "
                                      f"none of {', '.join(keys)}")
    return default


def _nemotron_pattern(c: dict[str, Any]) -> list[str]:
    pattern = c.get("hybrid_override_pattern")
    if pattern:
        return list(pattern)
    chars = {"full_attention": "*", "attention": "*", "linear_attention": "M", "mamba": "M",
             "conv": "M", "moe": "E", "mlp": "-"}
    return [chars.get(t, "-") for t in c.get("layers_block_type") or c.get("layer_types") or []]


def _layer_kinds(c: dict[str, Any], model_type: str) -> list[LayerKind]:
    """Per layer: full or sliding attention, latent attention, a recurrent state, or no cache."""
    n = int(_first(c, "num_hidden_layers", "n_layer", "n_layers", "num_layers", default=0))
    if model_type == "nemotron_h":
        table: dict[str, LayerKind] = {"*": "full", "M": "recurrent", "-": "none", "E": "none"}
        return [table.get(ch, "none") for ch in _nemotron_pattern(c)]
    if c.get("kv_lora_rank"):
        return ["latent"] * n
    types = c.get("layer_types")
    if isinstance(types, list) and types:
        table = {"full_attention": "full", "sliding_attention": "sliding",
                 "linear_attention": "recurrent", "conv": "recurrent", "mamba": "recurrent",
                 "attention": "full"}
        return [table.get(str(t), "full") for t in types]
    if model_type == "qwen3_next":
        every = int(c.get("full_attention_interval", 4))
        return ["full" if (i + 1) % every == 0 else "recurrent" for i in range(n)]
    if model_type == "lfm2" and c.get("full_attn_idxs") is not None:
        full = set(c["full_attn_idxs"])
        return ["full" if i in full else "recurrent" for i in range(n)]
    # gemma2 alternates local and global layers; gemma3 keeps one global layer in six.
    defaults = {"gemma2": 2, "gemma3": 6, "gemma3_text": 6}
    pattern = c.get("sliding_window_pattern") or defaults.get(model_type)
    if pattern and c.get("sliding_window"):
        return ["full" if (i + 1) % int(pattern) == 0 else "sliding" for i in range(n)]
    if c.get("sliding_window") and c.get("use_sliding_window", True):
        if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
            # HF's Qwen2 applies the window from max_window_layers on, and only when asked.
            if not c.get("use_sliding_window"):
                return ["full"] * n
            start = int(c.get("max_window_layers", n))
            return ["full" if i < start else "sliding" for i in range(n)]
        return ["sliding"] * n
    return ["full"] * n


def _recurrent_state(c: dict[str, Any], hidden: int) -> tuple[int, int]:
    """(float32 bytes of one recurrent layer's state, its mixer's parameters)."""
    if c.get("mamba_num_heads"):  # nemotron_h / mamba2: conv state + SSM state
        heads, dim = int(c["mamba_num_heads"]), int(c.get("mamba_head_dim", 64))
        inner, n_state = heads * dim, int(c.get("ssm_state_size", 128))
        groups, kernel = int(c.get("n_groups", 1)), int(c.get("conv_kernel", 4))
        conv_width = inner + 2 * groups * n_state
        params = hidden * (inner + conv_width + heads) + conv_width * kernel + inner * hidden
        return 4 * ((kernel - 1) * conv_width + heads * dim * n_state), params
    if c.get("linear_num_value_heads"):  # qwen3_next gated delta net
        vh, kh = int(c["linear_num_value_heads"]), int(c["linear_num_key_heads"])
        kd, vd = int(c["linear_key_head_dim"]), int(c["linear_value_head_dim"])
        kernel = int(c.get("linear_conv_kernel_dim", 4))
        conv_width = 2 * kh * kd + vh * vd
        params = hidden * (conv_width + vh * vd + 2 * vh) + conv_width * kernel + vh * vd * hidden
        return 4 * ((kernel - 1) * conv_width + vh * kd * vd), params
    kernel = int(c.get("conv_L_cache", c.get("conv_kernel", 3)))  # lfm2 short convolutions
    return 4 * (kernel - 1) * hidden, 4 * hidden * hidden + kernel * hidden
