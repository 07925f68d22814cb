"""Where a checkpoint's tensors live: layer N's prefix, the embedding, the head, the norm.

Shard transfer picks a stage's tensors by these names (agent/models/shards.py); the registry
(agent/models/arch.py) offers them as its answer for any architecture mlx-lm loads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Where layer N's tensors live in the checkpoints of the families mlx-lm loads.
_LAYER_NAME = re.compile(
    r"^((?:model\.language_model|language_model\.model|model|backbone|transformer)"
    r"\.(?:layers|h|blocks)\.)(\d+)\."
)
_PREFIX_BY_TYPE = {"nemotron_h": "backbone.layers.", "mamba": "backbone.layers.",
                   "mamba2": "backbone.layers.", "falcon_mamba": "backbone.layers.",
                   "gemma3": "language_model.model.layers.", "gpt2": "transformer.h.",
                   "gpt_bigcode": "transformer.h."}


def layer_index(tensor: str) -> int | None:
    """The decoder layer a checkpoint tensor belongs to, or None (embedding, norm, head...)."""
    match = _LAYER_NAME.match(tensor)
    return int(match.group(2)) if match else None


def layer_prefix(config: dict[str, Any], index: int, tensors: list[str] | None = None) -> str:
    """Where layer `index`'s tensors live ("model.layers.3."), from the checkpoint's names
    when given, else from the architecture's usual layout."""
    for name in tensors or ():
        match = _LAYER_NAME.match(name)
        if match:
            return f"{match.group(1)}{index}."
    return f"{_PREFIX_BY_TYPE.get(str(config.get('model_type')), 'model.layers.')}{index}."


def is_embedding(tensor: str) -> bool:
    return bool(re.match(r"^(?:model\.(?:language_model\.)?|language_model\.model\.|backbone\.|"
                         r"transformer\.)(?:embed_tokens|embeddings|wte)\.", tensor))


def is_head(tensor: str) -> bool:
    return tensor.startswith(("lm_head.", "language_model.lm_head.", "output."))


def is_final_norm(tensor: str) -> bool:
    return bool(re.match(r"^(?:model\.(?:language_model\.)?|language_model\.model\.|backbone\.)"
                         r"(?:norm|norm_f|final_layernorm)\.", tensor))


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


def holds_head(names: Iterable[str], tied: bool) -> bool:
    """Whether tensors `names` include the head's projection (the embedding, when tied)."""
    wanted = is_embedding if tied else is_head
    return any(wanted(name) for name in names)


def stage_wants(name: str, layers: LayerRange, embeds: bool, projects: bool, tied: bool) -> bool:
    """Whether a stage holding `layers` (and the embedding / the head) needs tensor `name`."""
    index = layer_index(name)
    if index is not None:
        return layers.start <= index < layers.stop
    if is_embedding(name):
        return embeds or (projects and tied)
    if is_final_norm(name):
        return projects
    if is_head(name):
        return projects and not tied
    return False


def safetensor_files(model_dir: Path) -> list[Path]:
    """The weight files of a model directory (its index's list when it has one)."""
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [Path(model_dir) / f for f in files]
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weights in {model_dir}")  # as the decoder says
    return files
