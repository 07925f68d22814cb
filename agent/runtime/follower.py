"""A pipeline follower: the stages after the head. It computes its layers for whatever arrives.

The follower keeps no scheduler: it mirrors the head's KV layout by replaying the journal that
arrives with each step (row growth, compaction, prefix-cache saves and loads), computes its layer
range, and passes the hidden states on (the last stage hands them back to the head). It waits in
a blocking receive between steps, so an idle follower costs no CPU.

Messages are handled strictly in arrival order: with micro-batches several steps are in flight
around the ring, and each must meet the journal ops sent with it at the same point of the
sequence as at the head. A decode step may cover only a range of rows (`first_row`).

The last stage, when it holds the vocabulary projection, also projects the upper rows of the
vocabulary for decode steps that ask for it (`vocab_split.py`), so the head is not the slow stage
of decode; for a greedy step it hands back only each row's best logit of those rows and its id.
Each follower counts the seconds it computes and appends its total to every step it passes on:
the head reports them as per-stage busy time.
"""

from __future__ import annotations

import time

import mlx.core as mx
import msgspec

from agent.runtime.journal import Gather, KvOp, PrefixDrop, PrefixLoad, PrefixSave, Resize
from agent.runtime.kv import KvSlots
from agent.runtime.links import StageLink, StageLinkError, as_stage_dtype, next_step
from agent.runtime.model import Decoder, Linear
from agent.runtime.prefix import copy_rows
from agent.runtime.rowstep import RowsDecode
from agent.runtime.step import make_decode_fn, prefill
from agent.runtime.verify import RowsVerify, make_verify_fn
from agent.runtime.vocab_split import describe, project_rows, rows_of, tail_best
from agent.runtime.watchdog import Watchdog


class Follower:
    """Mirrors the head's KV layout and computes its share of each step.

    `embeds`: a tensor-parallel peer of the first stage gets token ids and embeds them itself;
    a pipeline stage gets hidden states.
    """

    def __init__(self, decoder: Decoder, kv: KvSlots, *, compiled: bool,
                 embeds: bool = False) -> None:
        self.decoder = decoder
        self.kv = kv
        self.embeds = embeds
        self.quant = kv.geometry.quant
        self.decode_fn = make_decode_fn(decoder, compiled=compiled, embed=embeds, project=False,
                                        quant=self.quant)
        self.rows_fn = RowsDecode(decoder, compiled=compiled, embed=embeds, project=False,
                                  quant=self.quant)
        self.verify_fn = make_verify_fn(decoder, compiled=compiled, embed=embeds, project=False,
                                        quant=self.quant)
        self.rows_verify = RowsVerify(decoder, compiled=compiled, embed=embeds, project=False,
                                      quant=self.quant)
        self.saved: dict[int, tuple[list[mx.array], list[mx.array]]] = {}
        self.busy_s = 0.0  # seconds spent computing steps (and replaying their journal)
        self.tail: tuple[int, Linear] | None = None  # (first vocabulary row, those rows)
        self.compiled = compiled
        self.tail_fn = self._project_tail
        self.tail_best_fn = self._best_of_tail

    def _project_tail(self, h: mx.array) -> mx.array:
        assert self.tail is not None
        return mx.concatenate([h, project_rows(self.decoder, self.tail[1], h)], axis=-1)

    def _best_of_tail(self, h: mx.array) -> tuple[mx.array, mx.array]:
        assert self.tail is not None
        values, ids = tail_best(project_rows(self.decoder, self.tail[1], h), self.tail[0])
        return mx.concatenate([h, values[:, None]], axis=-1), ids

    def _take_tail(self, vocab_from: int) -> None:
        if self.tail is not None and self.tail[0] == vocab_from:
            return
        head = self.decoder.head
        tail = rows_of(head, vocab_from, head.weight.shape[0])
        assert tail is not None, f"cannot slice a {type(head).__name__} projection"
        self.tail = (vocab_from, tail)
        # Only these rows are used from now on: the rest of the matrix can go.
        self.decoder.lm_head = self.decoder.embed = None
        self.tail_fn = mx.compile(self._project_tail) if self.compiled else self._project_tail
        self.tail_best_fn = (mx.compile(self._best_of_tail) if self.compiled
                             else self._best_of_tail)

    def with_tail_logits(self, h: mx.array, vocab_from: int) -> mx.array:
        """A decode step's hidden states (rows, 1, hidden) with the logits of vocabulary rows
        [vocab_from, vocab) after them: (rows, hidden + vocab - vocab_from)."""
        self._take_tail(vocab_from)
        out = self.tail_fn(h[:, 0, :])
        mx.eval(out)
        return out

    def with_tail_best(self, h: mx.array, vocab_from: int) -> tuple[mx.array, list[int]]:
        """A greedy decode step's hidden states (rows, 1, hidden) with, after them, each row's
        best logit over vocabulary rows [vocab_from, vocab): (rows, hidden + 1); and that
        logit's vocabulary id for each row (`vocab_split.tail_best`)."""
        self._take_tail(vocab_from)
        out, ids = self.tail_best_fn(h[:, 0, :])
        mx.eval(out, ids)
        return out, ids.tolist()

    def apply(self, ops: list[KvOp]) -> None:
        for op in ops:
            match op:
                case Resize(rows, capacity):
                    self.kv.resize(rows, capacity)
                case Gather(index, capacity):
                    self.kv.gather(list(index), capacity)
                case PrefixSave(entry, row, length):
                    keys, values = self.kv.read_row(row, length)
                    self.saved[entry] = (copy_rows(keys), copy_rows(values))
                case PrefixLoad(entry, row, length):
                    keys, values = self.saved[entry]
                    self.kv.write_row(row, [k[:, :, :length] for k in keys],
                                      [v[:, :, :length] for v in values])
                case PrefixDrop(entry):
                    self.saved.pop(entry, None)
                case _:
                    raise ValueError(f"unknown KV journal op {op!r}")

    def step(self, op: str, row: int, start: int, positions: list[int], h: mx.array, *,
             first_row: int = 0) -> mx.array:
        h = as_stage_dtype(h, self.decoder.dtype)  # a mixed pipeline: the sender's dtype differs
        if op == "prefill":
            out = prefill(self.decoder, h, start, row, self.kv.keys, self.kv.values,
                          embed=self.embeds, project=False, quant=self.quant)
            mx.eval(out, self.kv.keys, self.kv.values)
            return out
        if op == "verify":  # `start` carries the width: tokens a row (speculative decoding)
            if self.embeds:
                h = h.reshape(len(positions), start)
            return self._verify(h, positions, first_row)
        every_row = first_row == 0 and len(positions) == self.kv.rows
        fn = self.decode_fn if every_row else self.rows_fn(first_row)
        out = self.kv.step_in_place(fn, h, mx.array(positions))
        mx.eval(out, self.kv.keys, self.kv.values)
        return out

    def _verify(self, h: mx.array, positions: list[int], first_row: int) -> mx.array:
        """A verify step: every row (stop-and-wait) or a micro-batch's range (ring.py)."""
        every_row = first_row == 0 and len(positions) == self.kv.rows
        fn = self.verify_fn if every_row else self.rows_verify(first_row)
        out = self.kv.step_in_place(fn, h, mx.array(positions))
        mx.eval(out, self.kv.keys, self.kv.values)
        return out


def follow(follower: Follower, upstream: StageLink, downstream: StageLink | None,
           control_fd: int, watchdog: Watchdog | None = None,
           tp_peers: list[StageLink] | None = None) -> int:
    """Serve steps until the head shuts the chain down or the agent goes away.

    `downstream` None: a tensor-parallel peer, whose output its stage's leader already has.
    `tp_peers`: a stage leader's tensor peers, who get each step before the leader computes.
    """
    while True:
        try:
            incoming = next_step(upstream, control_fd)
        except StageLinkError:
            return 1
        if incoming is None:
            return 0  # the agent closed our control pipe
        message, h = incoming
        if message.op == "ping":  # the head counting its stages (tensor peers take no part)
            if downstream is not None:
                dec = follower.decoder
                downstream.send(msgspec.structs.replace(
                    message, hops=message.hops + 1, last_layers=len(dec.layers),
                    last_projects=dec.projects and dec.norm is not None,
                    last_dtype=str(dec.dtype),
                    last_head=describe(dec.lm_head or dec.embed) if dec.projects else ""))
            continue
        for peer in tp_peers or ():
            peer.send(message, h)
        if message.op == "shutdown":
            if downstream is not None:
                downstream.send(message)
            return 0
        began = time.perf_counter()
        follower.apply(message.kv_ops)
        if follower.embeds:
            h = mx.array(message.tokens)
        assert h is not None
        if watchdog:
            watchdog.arm()
        out = follower.step(message.op, message.row, message.start, message.positions, h,
                            first_row=message.first_row)
        if watchdog:
            watchdog.disarm()
        if downstream is None:
            follower.busy_s += time.perf_counter() - began
            continue
        forward = msgspec.structs.replace(message, hops=message.hops + 1)
        if forward.hops == message.stages - 1:  # the last stage: back to the head
            forward = msgspec.structs.replace(forward, kv_ops=[])
            if message.op == "prefill":
                out = out[:, -1:]  # the head projects only the last position
            elif message.op == "decode" and message.vocab_from and message.tail_best:
                out, best = follower.with_tail_best(out, message.vocab_from)
                forward = msgspec.structs.replace(forward, best_ids=best)
            elif message.op == "decode" and message.vocab_from:
                out = follower.with_tail_logits(out, message.vocab_from)
        follower.busy_s += time.perf_counter() - began
        downstream.send(msgspec.structs.replace(
            forward, busy_s=[*message.busy_s, follower.busy_s]), out)
