"""Messages between an agent and its runner process, and their framing on a byte stream.

Frames are a 4-byte big-endian length followed by a msgpack body. The runner's stdin carries
agent -> runner messages and a private copy of its stdout carries runner -> agent messages
(the runner points fd 1 at stderr so stray prints from libraries cannot corrupt the stream).
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import msgspec

from agent.generation import Failed, Finished, GenerationRequest, TokenChunk

HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024


class RunnerRole(enum.StrEnum):
    """What a runner does in its instance (a str, so it compares equal to its value)."""

    SOLO = "solo"  # the whole model here, or rank 0 driving one tensor group
    HEAD = "head"  # the first pipeline stage: scheduler, sampling, embedding and head
    FOLLOWER = "follower"  # a later pipeline stage (or the leader of its stage's tensor group)
    TP_FOLLOWER = "tp_follower"  # a tensor-parallel peer: computes its shard of its stage
    DRAFT = "draft"  # a draft model serving a head's proposal requests (`draft_remote.py`)


class RunnerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a runner needs, passed explicitly (runners read no settings of their own)."""

    model_name: str
    model_dir: str
    # What the weights are served as: "keep" (as stored: a quantized checkpoint stays quantized,
    # other tensors keep their dtype), "float32" / "float16" / "bfloat16" (dequantized and cast
    # at load), or "auto" (keep on Metal/CUDA; on CPU float32 when it fits in memory, else keep).
    dtype: str = "float32"
    max_batch: int = 16
    max_queue: int = 64
    prefill_chunk: int = 512  # most tokens per prefill slice while others decode
    prefill_gap_steps: float = 6.0  # a slice takes at most this many decode steps (0: off)
    context_length: int | None = None  # cap; None means the model's own
    kv_budget_bytes: int | None = None  # None: computed from free memory after weights
    memory_cap_bytes: int | None = None
    prefix_cache_bytes: int | None = None  # None: a quarter of the KV budget
    kv_bits: int | None = None  # quantized KV cache (4 or 8); None keeps the weights' dtype
    compile_step: bool = True
    fuse_projections: bool = True
    prompt_lookup: bool = True  # speculative decoding from prompt-lookup drafts
    # A draft model for speculative decoding (same tokenizer; loaded by the head beside the
    # target): its name, and its directory (the pool fills it in, like `model_dir`).
    draft_name: str | None = None
    draft_dir: str | None = None
    # Or the head asks a draft runner (role "draft", listening there) for its proposals.
    draft_remote: str | None = None
    stats_interval_s: float = 1.0
    # Role in the instance. SOLO: the whole model here (or the whole stage, leading a tensor
    # group). HEAD: layers [layer_start, layer_stop) plus the embedding, the final norm and the
    # head; it connects to `downstream` and accepts the last stage's link back on `listen`.
    # FOLLOWER: accepts its upstream on `listen` and connects to `downstream` (the next
    # follower, or the head's `listen` when it is last). TP_FOLLOWER: a tensor-parallel peer
    # that accepts its group leader's link on `listen` and computes its shard of each step.
    role: RunnerRole = RunnerRole.SOLO
    layer_start: int | None = None
    layer_stop: int | None = None
    listen: str | None = None
    downstream: str | None = None
    link_timeout_s: float = 30.0
    # A pipeline head keeps up to one micro-batch per stage in flight around the ring (False:
    # stop-and-wait, one step in the ring at a time).
    pipeline_microbatch: bool = True
    # Tensor parallel: this runner is rank `tp_rank` of `tp_hosts` (one "ip:port" per rank, the
    # mx.distributed ring's hostfile). Rank 0 leads: it sends each step's inputs to the other
    # ranks over plain links (`tp_peers`, their `listen` addresses), so they wait for work in a
    # blocking receive rather than in the ring's busy-polling receive.
    tp_rank: int = 0
    tp_hosts: list[str] = []
    tp_peers: list[str] = []
    tp_backend: str = "ring"
    startup_timeout_s: float = 600.0


class Submit(msgspec.Struct, frozen=True, tag="submit"):
    request: GenerationRequest


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    id: str


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    pass


class Ready(msgspec.Struct, frozen=True, tag="ready", kw_only=True):
    model_name: str
    weight_bytes: int
    kv_budget_bytes: int
    kv_bytes_per_token: int
    context_length: int
    load_seconds: float
    blas: str = ""
    engine: str = "flock"  # which engine serves: "flock" (its own decoder) or "mlx-lm"
    dtype: str = ""  # what the weights were loaded as: "keep" or a float dtype's name
    kernels: str = ""  # the attention it computes with (kernels.describe_kernels, decided at load)


class Stats(msgspec.Struct, frozen=True, tag="stats"):
    values: dict[str, float]


class RunnerError(msgspec.Struct, frozen=True, tag="runner_error"):
    """The runner could not start (bad model, out of memory...); it exits after sending this."""

    message: str


ToRunner = Submit | Cancel | Shutdown
FromRunner = TokenChunk | Finished | Failed | Ready | Stats | RunnerError

_encoder = msgspec.msgpack.Encoder()
to_runner_decoder = msgspec.msgpack.Decoder(ToRunner)
from_runner_decoder = msgspec.msgpack.Decoder(FromRunner)


def frame(message: Any) -> bytes:
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


class FrameBuffer:
    """Accumulates bytes and yields complete frame bodies."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        bodies = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes exceeds the limit")
            if len(self._buffer) < HEADER.size + size:
                break
            bodies.append(bytes(self._buffer[HEADER.size:HEADER.size + size]))
            del self._buffer[: HEADER.size + size]
        return bodies
