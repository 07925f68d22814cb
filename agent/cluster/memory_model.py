"""What a share of a model costs a node, for placement. Pure arithmetic, no I/O.

Per node: a fixed runner overhead, plus its share of the layers' weights and of their KV
headroom (a tensor group of n divides both by n), plus the embedding on the first stage and the
head on the last (a tied embedding serves as the head, so both ends hold it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from math import ceil

from agent.cluster.state import ModelShape, Placement

# One runner process's own memory (Python, MLX, buffers), measured at about 100 MB.
RUNTIME_OVERHEAD_BYTES = 100 * 1024 * 1024
# Tokens of KV cache reserved per layer at placement time (capped by the model's context).
DEFAULT_KV_HEADROOM_TOKENS = 4096
# Group size of MLX's quantized KV cache: each group adds a scale and a bias at the dtype.
_KV_QUANT_GROUP = 64


class PlacementError(ValueError):
    """No placement satisfies the request; `per_node` maps node id -> (needed, available)."""

    def __init__(self, message: str, per_node: dict[str, tuple[int, int]] | None = None) -> None:
        super().__init__(message)
        self.per_node = per_node or {}


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# --- memory model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryModel:
    """What a share of a model costs a node."""

    layer_bytes: int  # one whole layer's weights plus its KV headroom (a tensor group splits it)
    first_end_bytes: int  # the embedding, held by the first stage
    last_end_bytes: int  # the head, held by the last stage (the embedding again when tied)
    whole_end_bytes: int  # both, when one stage is first and last

    def need(self, layers: int, tp: int = 1, *, first: bool, last: bool) -> int:
        """Bytes a node needs for `layers` layers in a tensor group of `tp`."""
        return RUNTIME_OVERHEAD_BYTES + self._ends(first, last) + ceil(layers * self.layer_bytes
                                                                        / tp)

    def capacity(self, room: int, tp: int = 1, *, first: bool, last: bool) -> int:
        """How many layers fit in `room` bytes on a node of a tensor group of `tp`."""
        free = room - RUNTIME_OVERHEAD_BYTES - self._ends(first, last)
        return free * tp // self.layer_bytes if free > 0 else 0

    def _ends(self, first: bool, last: bool) -> int:
        if first and last:
            return self.whole_end_bytes
        return self.first_end_bytes * first + self.last_end_bytes * last

    def for_node(self, node_id: str) -> MemoryModel:
        """What a share costs this node (one model for all, unless nodes run their own dtype)."""
        return self


@dataclass(frozen=True)
class PerNode(MemoryModel):
    """Costs when some nodes run the model at their own dtype (a mixed pipeline): those nodes'
    shares are counted at their dtype, everyone else's at the placement's (this model's)."""

    own: dict[str, MemoryModel] = field(default_factory=dict)

    def __init__(self, default: MemoryModel, own: dict[str, MemoryModel]) -> None:
        super().__init__(default.layer_bytes, default.first_end_bytes, default.last_end_bytes,
                         default.whole_end_bytes)
        object.__setattr__(self, "own", dict(own))

    def for_node(self, node_id: str) -> MemoryModel:
        return self.own.get(node_id, MemoryModel(self.layer_bytes, self.first_end_bytes,
                                                 self.last_end_bytes, self.whole_end_bytes))


def memory_model(model: ModelShape, *, kv_headroom_tokens: int = DEFAULT_KV_HEADROOM_TOKENS,
                 kv_bits: int | None = None) -> MemoryModel:
    tokens = min(kv_headroom_tokens, model.context_length)
    layer = model.layer_bytes + tokens * kv_bytes_per_token_per_layer(model, kv_bits)
    # Untied: the embedding and the head are the same size, one at each end.
    first = model.embedding_bytes if model.tie_word_embeddings else model.embedding_bytes // 2
    last = model.embedding_bytes if model.tie_word_embeddings else model.embedding_bytes - first
    return MemoryModel(layer_bytes=max(1, layer), first_end_bytes=first, last_end_bytes=last,
                       whole_end_bytes=model.embedding_bytes)


def kv_bytes_per_token_per_layer(model: ModelShape, kv_bits: int | None = None) -> int:
    """KV bytes per token per layer, at the serving dtype or quantized to `kv_bits`."""
    if kv_bits is None:
        return model.kv_bytes_per_token_per_layer
    elements = model.kv_bytes_per_token_per_layer // model.dtype_bytes
    per_element = Fraction(kv_bits, 8) + Fraction(2 * model.dtype_bytes, _KV_QUANT_GROUP)
    return ceil(elements * per_element)


def memory_needed(model: ModelShape, placement: Placement, *,
                  kv_headroom_tokens: int = DEFAULT_KV_HEADROOM_TOKENS,
                  kv_bits: int | None = None,
                  shapes: dict[str, ModelShape] | None = None) -> dict[str, int]:
    """Bytes each node of `placement` needs (summed if a node appears in several stages).

    A stage with its own dtype is counted at `shapes[its dtype]` when given (a mixed pipeline).
    """
    costs = memory_model(model, kv_headroom_tokens=kv_headroom_tokens, kv_bits=kv_bits)
    needed: dict[str, int] = {}
    last_index = len(placement.stages) - 1
    for i, stage in enumerate(placement.stages):
        own = (shapes or {}).get(stage.dtype or "")
        stage_costs = costs if own is None else memory_model(
            own, kv_headroom_tokens=kv_headroom_tokens, kv_bits=kv_bits)
        share = stage_costs.need(stage.layer_stop - stage.layer_start, len(stage.nodes),
                           first=i == 0, last=i == last_index)
        for node_id in stage.nodes:
            needed[node_id] = needed.get(node_id, 0) + share
    return needed


def tensor_sizes(model: ModelShape, max_size: int) -> list[int]:
    """Tensor group sizes up to `max_size` that split heads, KV heads and the MLP evenly."""
    return [n for n in range(1, max_size + 1)
            if model.num_heads % n == 0 and model.num_kv_heads % n == 0
            and model.intermediate_size % n == 0]
