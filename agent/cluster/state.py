"""The cluster's shared vocabulary: nodes as observed, placements as decided, runners as running.

Frozen pydantic models, so every component (discovery, membership, placement, reconcile, the
admin API) exchanges the same explicit data and decisions stay pure functions over it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.spec import Strategy as Strategy  # one definition, with the spec schema

Backend = Literal["cpu", "metal", "cuda"]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Link(Frozen):
    """A link from the node whose profile carries it to a peer, as that node measured it."""

    rtt_ms: float  # smoothed round trip (beacon or static probe)
    mbps: float = 0.0  # measured transfer rate in megabits/s; 0 = not measured


class NodeProfile(Frozen):
    """What a node says about itself in its beacons and heartbeats."""

    node_id: str  # persistent, unique (state_dir/node_id)
    name: str  # human name (hostname by default)
    version: str  # flock version; incompatible versions never share an instance
    addresses: list[str]  # IPs peers can reach it on
    api_port: int
    backend: Backend = "cpu"
    memory_total_bytes: int
    memory_available_bytes: int
    memory_cap_bytes: int | None = None  # from settings or cluster.toml [[nodes]] memory_cap
    compute_gflops: float = 0.0  # measured matmul (prefill-shaped) GFLOP/s at float32
    decode_gflops: float = 0.0  # measured matrix-vector (decode-shaped, memory-bound) GFLOP/s
    probe_key: str = ""  # what the speeds were measured under (hardware, backend, cores, quota)
    links: dict[str, Link] = Field(default_factory=dict)  # peer node id -> link as measured here
    blas: str = ""  # the BLAS its runners use (Linux: OpenBLAS through flock's shim)
    kernels: str = ""  # the attention its runners use (flockattn on Linux CPUs, or pure MLX)
    labels: dict[str, str] = Field(default_factory=dict)
    spec_generation: int = 0
    spec_hash: str = ""
    models: list[str] = Field(default_factory=list)  # store names it holds locally
    data_port: int = 52500  # base of the ports its runners' links use (4 per instance slot)

    @property
    def usable_memory_bytes(self) -> int:
        """Memory placement may plan with: the cap when set, else what is available."""
        if self.memory_cap_bytes is not None:
            return min(self.memory_cap_bytes, self.memory_available_bytes)
        return self.memory_available_bytes


class ModelShape(Frozen):
    """The facts of a model that placement needs (from its config.json)."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    layer_bytes: int  # weights of one decoder layer at the serving dtype
    embedding_bytes: int  # embedding (and the head when untied) at the serving dtype
    kv_bytes_per_token_per_layer: int
    context_length: int
    dtype_bytes: int = 4  # bytes per weight and KV element at the serving dtype (kv_bits rescales)
    # How its engine may spread it (the architecture registry's answer): "single" always,
    # "pipeline" (stages of its layer list), "tensor" (heads sharded over a group).
    strategies: tuple[str, ...] = ("single", "pipeline", "tensor")
    architecture: str = ""
    dtype: str = "float32"  # what runners load: "keep" (as stored) or a float dtype's name


class Stage(Frozen):
    """Layers [layer_start, layer_stop) computed by `nodes` (one node, or a tensor group)."""

    layer_start: int
    layer_stop: int
    nodes: list[str]  # node ids; len > 1 means tensor parallel inside this stage
    dtype: str | None = None  # what this stage's runners load, when not the placement's dtype


class Placement(Frozen):
    instance_id: str
    model: str
    strategy: Literal["single", "pipeline", "tensor", "hybrid"]
    stages: list[Stage]
    owner: Literal["spec", "api", "auto"] = "auto"
    reason: str = ""  # why placement chose this shape (shown in status), e.g. what `auto` decided
    left_out: dict[str, str] = Field(default_factory=dict)  # node id -> why it serves no stage
    dtype: str = "float32"  # what every rank loads (the leader resolved it; bytes counted at it)

    @property
    def head_node(self) -> str:
        """The node whose runner rank 0 receives requests (first node of the first stage)."""
        return self.stages[0].nodes[0]

    def nodes(self) -> list[str]:
        return [n for stage in self.stages for n in stage.nodes]

    def stage_dtype(self, index: int) -> str:
        """What stage `index` loads: its own dtype (a mixed pipeline) or the placement's."""
        return self.stages[index].dtype or self.dtype


class RunnerStatus(Frozen):
    instance_id: str
    node_id: str
    rank: int
    state: Literal["starting", "ready", "failed", "stopped"]
    detail: str = ""
