"""GGUF mixture-of-experts layouts -> mlx-lm's: qwen3moe, qwen2moe and mixtral (arch `llama`).

llama.cpp stores each layer's experts stacked, `blk.N.ffn_{gate,up,down}_exps` with GGUF dims
(in, out, experts), which MLX's reader returns as (experts, out, in): exactly mlx-lm's
`switch_mlp.{gate,up,down}_proj.weight` (and, for Q4_0/Q4_1/Q8_0, its quantized weight, scales
and biases), so experts move over unchanged. Older mixtral GGUFs hold one tensor per expert
(`blk.N.ffn_gate.E`); those are stacked here. The router is `ffn_gate_inp`; qwen2moe's shared
expert is `ffn_{gate,up,down}_shexp` with its sigmoid gate `ffn_gate_inp_shexp`.
`agent.models.gguf` does the rest (attention, norms, tokenizer, files) as for dense models.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from agent.models.gguf_header import GGUFImportError


@dataclass(frozen=True)
class MoeArch:
    """A GGUF MoE architecture: the dense attributes `agent.models.gguf` reads, plus the MLP's."""

    model_type: str
    hf_class: str
    permute_qk: bool
    block: str  # mlx-lm's MoE module in a layer: "mlp" or "block_sparse_moe"
    needs_qkv_bias: bool = False
    qk_norm: bool = False
    shared_expert: bool = False
    roles: dict[str, str] = field(default_factory=dict)

    def required(self) -> list[str]:
        """Per-layer modules (mlx-lm names) a complete checkpoint has."""
        names = [f"{self.block}.gate", *(f"{self.block}.switch_mlp.{p}" for p in _PROJ)]
        if self.shared_expert:
            names += [f"mlp.shared_expert.{p}" for p in _PROJ] + ["mlp.shared_expert_gate"]
        return names


_PROJ = ("gate_proj", "up_proj", "down_proj")


def _roles(block: str, shared: bool) -> dict[str, str]:
    roles = {f"ffn_{p[:-5]}_exps": f"{block}.switch_mlp.{p}" for p in _PROJ}
    roles["ffn_gate_inp"] = f"{block}.gate"
    if shared:
        roles |= {f"ffn_{p[:-5]}_shexp": f"{block}.shared_expert.{p}" for p in _PROJ}
        roles["ffn_gate_inp_shexp"] = f"{block}.shared_expert_gate"
    return roles


_QWEN3 = MoeArch("qwen3_moe", "Qwen3MoeForCausalLM", permute_qk=False, block="mlp",
                 qk_norm=True, roles=_roles("mlp", False))
_QWEN2 = MoeArch("qwen2_moe", "Qwen2MoeForCausalLM", permute_qk=False, block="mlp",
                 needs_qkv_bias=True, shared_expert=True, roles=_roles("mlp", True))
_MIXTRAL = MoeArch("mixtral", "MixtralForCausalLM", permute_qk=True, block="block_sparse_moe",
                   roles=_roles("block_sparse_moe", False))
MOE_ARCHS = {"qwen3moe": _QWEN3, "qwen2moe": _QWEN2}  # GGUF names; mixtral is "llama" + experts


def moe_arch(get: Callable[[str], Any], arch_name: str,
             weights: dict[str, mx.array]) -> MoeArch | None:
    """The MoE layout of this GGUF, or None for a dense model (`get` reads metadata)."""
    if arch_name in MOE_ARCHS:
        return MOE_ARCHS[arch_name]
    has_experts = any("_exps." in n or _LEGACY.match(n) for n in weights)
    if arch_name == "llama" and (int(get("llama.expert_count") or 0) > 0 or has_experts):
        return _MIXTRAL
    if has_experts:
        raise GGUFImportError(f"GGUF architecture {arch_name!r} has mixture-of-experts tensors; "
                              f"flock imports GGUF experts of qwen3moe, qwen2moe and mixtral")
    return None


def moe_config(get: Callable[[str], Any], arch_name: str, arch: MoeArch, config: dict) -> dict:
    """mlx-lm config entries for the experts (added to the dense config of the same model)."""
    def need(key: str) -> int:
        value = get(f"{arch_name}.{key}")
        if value is None:
            raise GGUFImportError(f"GGUF metadata lacks {arch_name}.{key!r}")
        return int(value)

    experts, used = need("expert_count"), need("expert_used_count")
    if not 0 < used <= experts:
        raise GGUFImportError(f"expert_used_count {used} does not fit expert_count {experts}")
    if arch.model_type != "qwen3_moe" and config["head_dim"] * config[
            "num_attention_heads"] != config["hidden_size"]:
        raise GGUFImportError(f"{arch.model_type} with head_dim * heads != hidden size is not "
                              "supported")
    # llama.cpp normalises the top-k weights for qwen3moe and mixtral and not for qwen2moe,
    # unless the file says otherwise; mlx-lm's qwen2_moe has no switch, so a file asking for
    # something else is refused rather than run differently.
    norm = get(f"{arch_name}.expert_weights_norm")
    out: dict[str, Any] = {"architectures": [arch.hf_class]}
    if arch.model_type == "mixtral":
        if norm is not None and not norm:
            raise GGUFImportError("mixtral without top-k weight normalisation is not supported")
        width = get(f"{arch_name}.expert_feed_forward_length")  # else feed_forward_length
        if width is not None:
            out["intermediate_size"] = int(width)
        return out | {"num_local_experts": experts, "num_experts_per_tok": used}
    out |= {"num_experts": experts, "num_experts_per_tok": used,
            "moe_intermediate_size": need("expert_feed_forward_length")}
    if arch.model_type == "qwen2_moe":
        if norm:
            raise GGUFImportError("qwen2moe with normalised top-k weights is not supported")
        return out | {"shared_expert_intermediate_size":
                      need("expert_shared_feed_forward_length")}
    return out | {"decoder_sparse_step": 1, "mlp_only_layers": [],
                  "norm_topk_prob": True if norm is None else bool(norm)}


_LEGACY = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.(weight|scales|biases)$")


def stack_legacy_experts(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Old mixtral GGUFs' per-expert `blk.N.ffn_gate.E` tensors as stacked `ffn_gate_exps`."""
    groups: dict[str, dict[int, mx.array]] = {}
    out: dict[str, mx.array] = {}
    for name, tensor in weights.items():
        m = _LEGACY.match(name)
        if m is None:
            out[name] = tensor
            continue
        layer, proj, expert, kind = m.groups()
        groups.setdefault(f"blk.{layer}.ffn_{proj}_exps.{kind}", {})[int(expert)] = tensor
    for name, by_expert in groups.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise GGUFImportError(f"GGUF lacks some experts of {name}")
        out[name] = mx.stack([by_expert[e] for e in range(len(by_expert))])
    return out


def finish_moe(tensors: dict[str, mx.array], config: dict, arch: MoeArch) -> dict[str, mx.array]:
    """Shape fixes and the completeness check for the expert tensors (after conversion)."""
    layers = config["num_hidden_layers"]
    if arch.model_type == "mixtral" and any(n.endswith(".bias") for n in tensors):
        raise GGUFImportError("mixtral with bias tensors is not supported (mlx-lm has none)")
    for i in range(layers):
        gate = f"model.layers.{i}.{arch.block}.shared_expert_gate.weight"
        if gate in tensors and tensors[gate].ndim == 1:
            tensors[gate] = tensors[gate][None]  # llama.cpp may store the (1, hidden) gate flat
    experts = config.get("num_experts", config.get("num_local_experts"))
    missing = [f"model.layers.{i}.{m}.weight" for i in range(layers) for m in arch.required()
               if f"model.layers.{i}.{m}.weight" not in tensors]
    if missing:
        raise GGUFImportError(f"GGUF lacks tensors for {', '.join(missing[:4])}"
                              + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    for i in range(layers):
        router = tensors[f"model.layers.{i}.{arch.block}.gate.weight"]
        stacked = tensors[f"model.layers.{i}.{arch.block}.switch_mlp.up_proj.weight"]
        if router.shape[0] != experts or stacked.shape[0] != experts:
            raise GGUFImportError(f"layer {i} has {stacked.shape[0]} experts and a router for "
                                  f"{router.shape[0]}; the metadata says {experts}")
    return tensors
