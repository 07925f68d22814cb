"""Where a step's arithmetic happens: all in this process, or spread along a pipeline.

The scheduler asks for logits and never knows which. `LocalCompute` runs the whole model here;
`PipelineHeadCompute` runs the first stage, ships the hidden states (and the KV layout journal,
so the followers' caches mirror this one) down the chain, and projects the hidden states that
come back from the last stage into logits.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx
import msgspec

from agent.runtime.kv import KvSlots
from agent.runtime.links import StageLink, StepMessage
from agent.runtime.model import Decoder
from agent.runtime.step import make_decode_fn, make_project_fn, prefill


class LocalCompute:
    def __init__(self, decoder: Decoder, kv: KvSlots, *, compiled: bool) -> None:
        self.decoder = decoder
        self.kv = kv
        self.decode_fn = make_decode_fn(decoder, compiled=compiled)

    def prefill(self, row: int, start: int, tokens: list[int]) -> mx.array:
        """Logits (1, vocab) of the last token; writes the row's KV."""
        return prefill(self.decoder, mx.array(tokens), start, row, self.kv.keys, self.kv.values)

    def decode(self, tokens: list[int], positions: list[int]) -> mx.array:
        """Logits (rows, vocab), one row per KV row; writes each row's new KV."""
        out = self.decode_fn(mx.array(tokens), mx.array(positions), *self.kv.keys,
                             *self.kv.values)
        self._take_kv(out)
        return out[0]

    def _take_kv(self, out: tuple[mx.array, ...]) -> None:
        layers = len(self.kv.keys)
        self.kv.keys = list(out[1:1 + layers])
        self.kv.values = list(out[1 + layers:])

    def close(self) -> None:
        pass


class PipelineHeadCompute(LocalCompute):
    def __init__(self, decoder: Decoder, kv: KvSlots, journal: list[tuple], *, compiled: bool,
                 downstream: StageLink, upstream: StageLink) -> None:
        super().__init__(decoder, kv, compiled=compiled)
        self.journal = journal
        self.downstream = downstream
        self.upstream = upstream  # the last stage's link back to the head
        self.decode_fn = make_decode_fn(decoder, compiled=compiled, embed=True, project=False)
        self.project_fn = make_project_fn(decoder, compiled=compiled)

    def _drain(self) -> list[tuple]:
        ops = list(self.journal)
        self.journal.clear()
        return ops

    def prefill(self, row: int, start: int, tokens: list[int]) -> mx.array:
        h = prefill(self.decoder, mx.array(tokens), start, row, self.kv.keys, self.kv.values,
                    embed=True, project=False)
        mx.eval(h, self.kv.keys, self.kv.values)
        self.downstream.send(StepMessage(op="prefill", kv_ops=self._drain(), row=row,
                                         start=start), h)
        _, back = self.upstream.recv()
        assert back is not None
        return self.project_fn(back[0, -1:])

    def decode(self, tokens: list[int], positions: list[int]) -> mx.array:
        out = self.decode_fn(mx.array(tokens), mx.array(positions), *self.kv.keys,
                             *self.kv.values)
        self._take_kv(out)
        h = out[0]
        mx.eval(h, self.kv.keys, self.kv.values)
        self.downstream.send(StepMessage(op="decode", kv_ops=self._drain(),
                                         positions=positions), h)
        _, back = self.upstream.recv()
        assert back is not None
        return self.project_fn(back[:, 0, :])

    def close(self) -> None:
        with contextlib.suppress(ConnectionError):
            self.downstream.send(StepMessage(op="shutdown"))
        self.downstream.close()
        self.upstream.close()


class TensorHeadCompute(LocalCompute):
    """Rank 0 of a tensor-parallel group: tells the other ranks what to compute, then computes
    its own shard; the collectives inside the step keep the ranks in lockstep."""

    def __init__(self, decoder: Decoder, kv: KvSlots, journal: list[tuple], *, compiled: bool,
                 peers: list[StageLink]) -> None:
        super().__init__(decoder, kv, compiled=compiled)
        self.journal = journal
        self.peers = peers

    def _broadcast(self, message: StepMessage) -> None:
        ops = list(self.journal)
        self.journal.clear()
        message = msgspec.structs.replace(message, kv_ops=ops)
        for peer in self.peers:
            peer.send(message)

    def prefill(self, row: int, start: int, tokens: list[int]) -> mx.array:
        self._broadcast(StepMessage(op="prefill", row=row, start=start, tokens=tokens))
        return super().prefill(row, start, tokens)

    def decode(self, tokens: list[int], positions: list[int]) -> mx.array:
        self._broadcast(StepMessage(op="decode", tokens=tokens, positions=positions))
        return super().decode(tokens, positions)

    def close(self) -> None:
        for peer in self.peers:
            with contextlib.suppress(ConnectionError):
                peer.send(StepMessage(op="shutdown"))
            peer.close()
