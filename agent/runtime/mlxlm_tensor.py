"""Tensor parallel on the mlx-lm engine: every rank holds the model cut by its own `shard()`.

Rank 0 runs the scheduler; before each step it sends the other ranks the step's inputs and its
row events (rows acquired and released, the rows a decode computes) over plain links, so each
rank's caches follow the same merges and filters and every rank makes the same model calls,
whose collectives (inside mlx-lm's sharded layers) keep them in lockstep. Only rank 0's logits
are used.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx

from agent.runtime.journal import DecodeRows, KvOp, RowAcquire, RowRelease
from agent.runtime.links import StageLink, StageLinkError, StepMessage, next_step
from agent.runtime.mlxlm_cache import MlxLmSlots
from agent.runtime.mlxlm_engine import MlxLmCompute, MlxLmModel
from agent.runtime.watchdog import Watchdog


class TensorHeadCompute(MlxLmCompute):
    """Rank 0: tells its peers each step, then computes its own shard of it."""

    def __init__(self, model: MlxLmModel, slots: MlxLmSlots, peers: list[StageLink]) -> None:
        super().__init__(model, slots)
        self.peers = peers
        slots.events = []

    def _tell(self, message: StepMessage) -> None:
        for peer in self.peers:
            peer.send(message)

    def _drain(self) -> list[KvOp]:
        events = self.slots.events
        assert events is not None
        ops = list(events)
        events.clear()
        return ops

    def prefill(self, row: int, start: int, tokens: list[int]) -> mx.array:
        self._tell(StepMessage(op="prefill", kv_ops=self._drain(), row=row, start=start,
                               tokens=tokens))
        # Evaluated here, as the peers do: a chunk before the prompt's last has its logits
        # dropped, and lazily that would skip its last layers' collectives on this rank only,
        # so every later collective would pair with the wrong step.
        logits = super().prefill(row, start, tokens)
        mx.eval(logits, self.slots.keys)
        return logits

    def decode(self, tokens: list[int] | mx.array, positions: list[int]) -> mx.array:
        assert not isinstance(tokens, mx.array), "a tensor head decodes known tokens"
        ops = [*self._drain(), DecodeRows(list(self._rows))]
        self._tell(StepMessage(op="decode", kv_ops=ops, tokens=list(tokens),
                               positions=positions))
        return super().decode(tokens, positions)

    def close(self) -> None:
        for peer in self.peers:
            with contextlib.suppress(ConnectionError):
                peer.send(StepMessage(op="shutdown"))
            peer.close()


def _apply(compute: MlxLmCompute, ops: list[KvOp]) -> None:
    slots = compute.slots
    for op in ops:
        match op:
            case RowAcquire(row=row):
                slots.take_row(row)
            case RowRelease(row=row):
                slots.release(row)
            case DecodeRows(rows=rows):
                compute.will_decode(list(rows))
            case _:
                raise ValueError(f"unexpected op {op!r} for a tensor peer of the mlx-lm engine")


def follow_tensor(compute: MlxLmCompute, upstream: StageLink, control_fd: int,
                  watchdog: Watchdog | None = None) -> int:
    """A peer rank: replay rank 0's steps until it shuts down or the agent goes away."""
    while True:
        try:
            incoming = next_step(upstream, control_fd)
        except StageLinkError:
            return 1
        if incoming is None:
            return 0  # the agent closed our control pipe
        message, _ = incoming
        if message.op == "shutdown":
            return 0
        _apply(compute, message.kv_ops)
        if watchdog:
            watchdog.arm()
        if message.op == "prefill":
            out = compute.prefill(message.row, message.start, message.tokens)
        else:
            out = compute.decode(message.tokens, message.positions)
        mx.eval(out, compute.slots.keys)
        if watchdog:
            watchdog.disarm()
