"""Pipeline stage links: one blocking TCP connection per stage boundary.

Measured here (see bench/cluster.py and CHANGELOG): for a few KB of activations per token a plain
blocking socket beats `mx.distributed` send/recv, whose ring backend busy-polls a core while a
rank waits. A blocking `recv` parks the waiting stage in the kernel instead. Every receive has a
deadline, so a stuck or dead peer becomes a clean `StageLinkError`, never a hung request.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time

import mlx.core as mx
import msgspec
import numpy as np

from agent.runtime.journal import KvOp

_LEN = struct.Struct(">IQ")  # header bytes, payload bytes
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class StageLinkError(ConnectionError):
    """The neighbouring stage went away or stopped answering within the deadline."""


class StepMessage(msgspec.Struct, frozen=True, kw_only=True):
    """What travels along the pipeline with each step's activations."""

    op: str  # "prefill" | "decode" | "shutdown" | "ping" (counts the stages at start)
    # The head's KV layout journal since the last message (tagged by each op's kind).
    kv_ops: list[KvOp] = []
    row: int = -1
    start: int = 0
    positions: list[int] = []
    # A decode step computes KV rows [first_row, first_row + len(positions)) (a micro-batch);
    # a step over every row is first_row 0 with a position for each.
    first_row: int = 0
    # Followers this message has passed (each raises it as it forwards), and the ring's stage
    # count when the head knows it: the last stage hands back only what the head needs.
    hops: int = 0
    stages: int = 0
    tokens: list[int] = []  # token ids, for tensor-parallel peers that embed for themselves
    # A decode step: the last stage projects vocabulary rows [vocab_from, vocab) and hands their
    # logits back after the hidden states (`vocab_split.py`); 0: it hands back hidden states.
    vocab_from: int = 0
    # With vocab_from, a greedy step (every row takes its argmax): the last stage hands back
    # each row's best logit of its rows after the hidden states, and their ids in `best_ids`.
    tail_best: bool = False
    best_ids: list[int] = []
    # Each follower's busy seconds so far, appended as the step passes it (the head reports
    # them as stage metrics); on the ping, what the last stage is: its layer count, whether it
    # holds the vocabulary projection, and its compute dtype (each follower overwrites them).
    busy_s: list[float] = []
    last_layers: int = 0
    last_projects: bool = False
    last_dtype: str = ""
    last_head: str = ""  # `vocab_split.describe` of its projection
    shape: list[int] = []
    dtype: str = "float32"


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StepMessage)


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def as_stage_dtype(h: mx.array, dtype: mx.Dtype) -> mx.array:
    """Hidden states in the receiving stage's dtype: each stage of a mixed pipeline (float32
    beside bfloat16 or kept 4-bit) computes in its own; token ids pass as they are."""
    return h.astype(dtype) if h.dtype != dtype and mx.issubdtype(h.dtype, mx.floating) else h


def _to_bytes(array: mx.array) -> tuple[bytes, str]:
    if array.dtype == mx.bfloat16:
        # numpy has no bfloat16: ship the raw 16-bit words.
        return np.asarray(array.view(mx.uint16)).tobytes(), "bfloat16"
    name = "float16" if array.dtype == mx.float16 else "float32"
    return np.asarray(array.astype(_DTYPES[name])).tobytes(), name


def _from_bytes(data: bytes, shape: list[int], dtype: str) -> mx.array:
    if dtype == "bfloat16":
        return mx.array(np.frombuffer(data, dtype=np.uint16).reshape(shape)).view(mx.bfloat16)
    return mx.array(np.frombuffer(data, dtype=_NP_DTYPES[dtype]).reshape(shape))


class StageLink:
    def __init__(self, sock: socket.socket, *, timeout: float) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        self.sock = sock
        self.timeout = timeout

    @classmethod
    def connect(cls, address: str, *, deadline: float, timeout: float) -> StageLink:
        """Connect, retrying until `deadline` (the peer may still be loading its weights)."""
        host, port = parse_address(address)
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection((host, port), timeout=5.0)
                return cls(sock, timeout=timeout)
            except OSError as exc:
                last = exc
                time.sleep(0.1)
        raise StageLinkError(f"could not reach the next stage at {address}: {last}")

    @classmethod
    def accept(cls, listener: socket.socket, *, deadline: float, timeout: float) -> StageLink:
        listener.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            sock, _ = listener.accept()
        except OSError as exc:
            raise StageLinkError(f"no stage connected in time: {exc}") from exc
        return cls(sock, timeout=timeout)

    def send(self, message: StepMessage, array: mx.array | None = None) -> None:
        payload = b""
        if array is not None:
            payload, dtype = _to_bytes(array)
            message = msgspec.structs.replace(message, shape=list(array.shape), dtype=dtype)
        header = _encoder.encode(message)
        try:
            self.sock.sendall(_LEN.pack(len(header), len(payload)) + header + payload)
        except OSError as exc:
            raise StageLinkError(f"lost the next stage: {exc}") from exc

    def recv(self, timeout: float | None = None) -> tuple[StepMessage, mx.array | None]:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        head = self._exactly(_LEN.size)
        header_size, payload_size = _LEN.unpack(head)
        message = _decoder.decode(self._exactly(header_size))
        if not payload_size:
            return message, None
        return message, _from_bytes(self._exactly(payload_size), message.shape, message.dtype)

    def _exactly(self, size: int) -> bytes:
        chunks, remaining = [], size
        while remaining:
            try:
                chunk = self.sock.recv(min(remaining, 1 << 20))
            except TimeoutError as exc:
                raise StageLinkError(f"a stage did not answer within {self.timeout:.0f}s") from exc
            except OSError as exc:
                raise StageLinkError(f"lost a stage: {exc}") from exc
            if not chunk:
                raise StageLinkError("a stage closed its link")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def listen(address: str) -> socket.socket:
    host, port = parse_address(address)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4)
    return sock


def next_step(upstream: StageLink, control_fd: int,
              poll_s: float = 5.0) -> tuple[StepMessage, mx.array | None] | None:
    """A follower's wait between steps: the next message from upstream, or None once its agent
    closes the control pipe (the runner should exit 0). Blocks in `select`, so an idle rank
    costs no CPU; raises StageLinkError when the link breaks."""
    while True:
        readable, _, _ = select.select([upstream, control_fd], [], [], poll_s)
        if control_fd in readable and not os.read(control_fd, 1 << 16):
            return None
        if upstream in readable:
            return upstream.recv(timeout=None)

