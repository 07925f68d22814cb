"""Where a step's arithmetic happens: all in this process, or spread over several.

The scheduler asks for logits and never knows which. `LocalCompute` runs the whole model here.
`HeadCompute` drives a multi-process instance: it sends each step's inputs and the KV layout
journal to its tensor-parallel peers (so their caches mirror this one), and with a pipeline runs
the first stage, ships the hidden states down the chain and projects the hidden states that
come back from the last stage into logits. The other ranks run `follower.Follower`.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx

from agent.runtime.journal import Journal
from agent.runtime.kv import KvSlots
from agent.runtime.links import StageLink, StepMessage
from agent.runtime.model import Decoder
from agent.runtime.step import make_decode_fn, make_project_fn, prefill
from agent.runtime.verify import make_verify_fn


class LocalCompute:
    # Whether a decode step may be queued before the previous one's tokens are read back (the
    # scheduler's lookahead): true when nothing but lazy MLX work happens in `decode`.
    lazy_decode = True

    def __init__(self, decoder: Decoder, kv: KvSlots, *, compiled: bool) -> None:
        self.decoder = decoder
        self.kv = kv
        self.quant = kv.geometry.quant
        self.decode_fn = make_decode_fn(decoder, compiled=compiled, quant=self.quant)
        self.verify_fn = make_verify_fn(decoder, compiled=compiled, quant=self.quant)

    def prefill(self, row: int, start: int, tokens: list[int]) -> mx.array:
        """Logits (1, vocab) of the last token; writes the row's KV."""
        return prefill(self.decoder, mx.array(tokens), start, row, self.kv.keys, self.kv.values,
                       quant=self.quant)

    def will_decode(self, rows: list[int]) -> None:
        """Every row is computed each step (rows not decoding take a harmless write)."""

    def decode(self, tokens: list[int] | mx.array, positions: list[int]) -> mx.array:
        """Logits (rows, vocab), one row per KV row; writes each row's new KV. `tokens` may be
        a lazy int32 array (the previous step's argmax, not yet computed)."""
        ids = tokens if isinstance(tokens, mx.array) else mx.array(tokens)
        return self._step(ids, mx.array(positions))

    def _step(self, *inputs: mx.array) -> mx.array:
        return self.kv.step_in_place(self.decode_fn, *inputs)

    def verify(self, tokens: list[list[int]], starts: list[int]) -> mx.array:
        """Logits (rows, width, vocab) for `width` tokens a row at positions starts[r] + i
        (speculative verification, `verify.py`); writes their KV."""
        return self.kv.step_in_place(self.verify_fn, mx.array(tokens), mx.array(starts))

    def close(self) -> None:
        pass


class HeadCompute(LocalCompute):
    """The head of a multi-process instance: rank 0 of its stage's tensor group and/or the
    first stage of a pipeline.

    Each step it sends its tensor peers the step's inputs (token ids, positions and the KV
    journal) so they compute their shards in lockstep (the collectives inside the step keep them
    there); with a pipeline it then computes its layers, ships the hidden states down the chain
    and projects what comes back from the last stage into logits.
    """

    lazy_decode = False  # every step talks to peers over blocking links

    def __init__(self, decoder: Decoder, kv: KvSlots, journal: Journal, *, compiled: bool,
                 tp_peers: list[StageLink] | None = None, downstream: StageLink | None = None,
                 upstream: StageLink | None = None) -> None:
        super().__init__(decoder, kv, compiled=compiled)
        self.journal = journal
        self.tp_peers = tp_peers or []
        self.downstream = downstream
        self.upstream = upstream  # the last stage's link back to the head
        if downstream is not None:
            self.decode_fn = make_decode_fn(decoder, compiled=compiled, embed=True,
                                            project=False, quant=self.quant)
            self.project_fn = make_project_fn(decoder, compiled=compiled)
            self.verify_fn = make_verify_fn(decoder, compiled=compiled, embed=True,
                                            project=False, quant=self.quant)

    def _drain(self) -> Journal:
        ops = list(self.journal)
        self.journal.clear()
        return ops

    def _tell_peers(self, message: StepMessage) -> None:
        for peer in self.tp_peers:
            peer.send(message)

    def _round_trip(self, message: StepMessage, h: mx.array) -> mx.array:
        assert self.downstream is not None and self.upstream is not None
        self.downstream.send(message, h)
        _, back = self.upstream.recv()
        assert back is not None
        return back

    def prefill(self, row: int, start: int, tokens: list[int]) -> mx.array:
        ops = self._drain()
        self._tell_peers(StepMessage(op="prefill", kv_ops=ops, row=row, start=start,
                                     tokens=tokens))
        if self.downstream is None:
            return super().prefill(row, start, tokens)
        h = prefill(self.decoder, mx.array(tokens), start, row, self.kv.keys, self.kv.values,
                    embed=True, project=False, quant=self.quant)
        mx.eval(h, self.kv.keys, self.kv.values)
        back = self._round_trip(StepMessage(op="prefill", kv_ops=ops, row=row, start=start), h)
        return self.project_fn(back[0, -1:])

    def decode(self, tokens: list[int] | mx.array, positions: list[int]) -> mx.array:
        assert not isinstance(tokens, mx.array), "a pipeline head decodes known tokens"
        ops = self._drain()
        self._tell_peers(StepMessage(op="decode", kv_ops=ops, tokens=tokens,
                                     positions=positions))
        out = self._step(mx.array(tokens), mx.array(positions))
        if self.downstream is None:
            return out
        mx.eval(out, self.kv.keys, self.kv.values)
        back = self._round_trip(StepMessage(op="decode", kv_ops=ops, positions=positions), out)
        return self.project_fn(back[:, 0, :])

    def verify(self, tokens: list[list[int]], starts: list[int]) -> mx.array:
        ops = self._drain()
        flat = [t for row in tokens for t in row]
        width = len(tokens[0])
        self._tell_peers(StepMessage(op="verify", kv_ops=ops, tokens=flat, positions=starts,
                                     start=width))
        out = super().verify(tokens, starts)
        if self.downstream is None:
            return out
        mx.eval(out, self.kv.keys, self.kv.values)
        back = self._round_trip(StepMessage(op="verify", kv_ops=ops, positions=starts,
                                            start=width), out)
        return self.project_fn(back)

    def close(self) -> None:
        links = [*self.tp_peers, *([self.downstream] if self.downstream else [])]
        for link in links:
            with contextlib.suppress(ConnectionError):
                link.send(StepMessage(op="shutdown"))
            link.close()
        if self.upstream is not None:
            self.upstream.close()
