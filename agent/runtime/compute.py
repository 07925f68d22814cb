"""Where a step's arithmetic happens: all in this process, or spread over several.

The scheduler asks for logits and never knows which. `LocalCompute` runs the whole model here.
`HeadCompute` drives a multi-process instance: it sends each step's inputs and the KV layout
journal to its tensor-parallel peers (so their caches mirror this one), and with a pipeline runs
the first stage, ships the hidden states down the chain and projects the hidden states that
come back from the last stage into logits. The other ranks run `follower.Follower`.

A pipeline head also offers `submit` / `collect` (`seam.PipelinedCompute`): a step is sent down
the ring and the head is free to start the next one (another micro-batch, or the next slice of a
long prompt) while later stages work on the first, so every stage computes at once. Links are
FIFO and every stage handles messages in order, so each step meets the KV journal ops drained
with it at every stage exactly where the head applied them.

A pipeline's decode steps share the vocabulary projection between the head and the last stage
(`vocab_split.py`), so an even layer split leaves no stage the slow one in decode or in prefill.
The head counts the seconds it computes, and learns the followers' from each step that comes
back: `stage_stats` reports both (flock_stage_busy_seconds_total).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import Any

import mlx.core as mx

from agent.runtime.journal import Journal
from agent.runtime.kv import KvSlots
from agent.runtime.links import StageLink, StepMessage, as_stage_dtype
from agent.runtime.model import Decoder
from agent.runtime.pacing import key_cost
from agent.runtime.rowstep import RowsDecode
from agent.runtime.seam import DecodeWork, Picks, PrefillWork, Work
from agent.runtime.step import make_decode_fn, make_project_fn, prefill
from agent.runtime.verify import RowsVerify, make_verify_fn
from agent.runtime.vocab_split import (
    decoder_bytes,
    describe,
    head_vocab_rows,
    join_best,
    project_rows,
    rows_of,
)

STAGE_BUSY_KEY = "stage_busy_seconds_total_"  # + the stage's index (0: the head)


def stage_stats(compute: Any) -> dict[str, float]:
    """What a compute reports of its stages for the runner's stats (nothing unless it is a
    pipeline head): each stage's busy seconds so far, under STAGE_BUSY_KEY + index, and the
    share of decode's vocabulary projection the head keeps (1.0: all of it)."""
    busy = getattr(compute, "stage_busy_s", None)
    if not busy:
        return {}
    return {**{f"{STAGE_BUSY_KEY}{i}": float(seconds) for i, seconds in enumerate(busy)},
            "head_vocab_share": compute.vocab_rows / compute.vocab}


class LocalCompute:
    # Whether a decode step may be queued before the previous one's tokens are read back (the
    # scheduler's lookahead): true when nothing but lazy MLX work happens in `decode`.
    lazy_decode = True
    # Steps in flight that keep every stage busy: one process has one stage.
    stages = 1

    def __init__(self, decoder: Decoder, kv: KvSlots, *, compiled: bool) -> None:
        self.decoder = decoder
        self.kv = kv
        self.compiled = compiled
        self.quant = kv.geometry.quant
        self.decode_fn = make_decode_fn(decoder, compiled=compiled, quant=self.quant)
        self.rows_fn = RowsDecode(decoder, compiled=compiled, quant=self.quant)
        self._done: deque[tuple[Work, mx.array | None]] = deque()
        self.verify_fn = make_verify_fn(decoder, compiled=compiled, quant=self.quant)
        self.rows_verify = RowsVerify(decoder, compiled=compiled, quant=self.quant)

    def prefill(self, row: int, start: int, tokens: list[int]) -> mx.array:
        """Logits (1, vocab) of the last token; writes the row's KV."""
        return self._local_prefill(row, start, tokens)

    def _local_prefill(self, row: int, start: int, tokens: list[int]) -> mx.array:
        return prefill(self.decoder, mx.array(tokens), start, row, self.kv.keys, self.kv.values,
                       quant=self.quant)

    def will_decode(self, rows: list[int]) -> None:
        """Every row is computed each step (rows not decoding take a harmless write)."""

    def decode(self, tokens: list[int] | mx.array, positions: list[int]) -> mx.array:
        """Logits (rows, vocab), one row per KV row; writes each row's new KV. `tokens` may be
        a lazy int32 array (the previous step's argmax, not yet computed)."""
        ids = tokens if isinstance(tokens, mx.array) else mx.array(tokens)
        return self._step(ids, mx.array(positions))

    def _step(self, *inputs: mx.array, first_row: int = 0) -> mx.array:
        if first_row == 0 and inputs[1].shape[0] == self.kv.rows:
            return self.kv.step_in_place(self.decode_fn, *inputs)
        return self.kv.step_in_place(self.rows_fn(first_row), *inputs)

    # ---- submit / collect, done synchronously (one stage) -----------------------------------
    def submit(self, work: Work) -> None:
        if isinstance(work, PrefillWork):
            logits = self._local_prefill(work.row, work.start, work.tokens)
            self._done.append((work, logits if work.logits else None))
            return
        if work.width > 1:  # a verify micro-batch (ring.py)
            self._done.append((work, self._verify_rows(work)))
            return
        out = self._step(mx.array(work.flat_tokens()), mx.array(work.positions),
                         first_row=work.first_row)
        self._done.append((work, out))

    def collect(self) -> tuple[Work, mx.array | None]:
        return self._done.popleft()

    @property
    def in_flight(self) -> int:
        return len(self._done)

    def verify(self, tokens: list[list[int]], starts: list[int]) -> mx.array:
        """Logits (rows, width, vocab) for `width` tokens a row at positions starts[r] + i
        (speculative verification, `verify.py`); writes their KV."""
        return self.kv.step_in_place(self.verify_fn, mx.array(tokens), mx.array(starts))

    def _verify_rows(self, work: DecodeWork) -> mx.array:
        """This process's share of a verify micro-batch: `work.width` tokens a row of the rows
        [first_row, first_row + rows), the whole-batch verify step when that is every row."""
        tokens, starts = mx.array(work.tokens), mx.array(work.positions)
        if work.first_row == 0 and work.rows == self.kv.rows:
            return self.kv.step_in_place(self.verify_fn, tokens, starts)
        return self.kv.step_in_place(self.rows_verify(work.first_row), tokens, starts)

    def close(self) -> None:
        pass


class HeadCompute(LocalCompute):
    """The head of a multi-process instance: rank 0 of its stage's tensor group and/or the
    first stage of a pipeline.

    Each step it sends its tensor peers the step's inputs (token ids, positions and the KV
    journal) so they compute their shards in lockstep (the collectives inside the step keep them
    there); with a pipeline it then computes its layers, ships the hidden states down the chain
    and projects what comes back from the last stage into logits.

    `microbatch`: whether the scheduler may keep several steps in flight around the ring
    (`stages` is then the ring's stage count, learnt with one ping round trip at start).
    """

    lazy_decode = False  # every step talks to peers over blocking links

    def __init__(self, decoder: Decoder, kv: KvSlots, journal: Journal, *, compiled: bool,
                 tp_peers: list[StageLink] | None = None, downstream: StageLink | None = None,
                 upstream: StageLink | None = None, microbatch: bool = True) -> None:
        super().__init__(decoder, kv, compiled=compiled)
        self.journal = journal
        self.tp_peers = tp_peers or []
        self.downstream = downstream
        self.upstream = upstream  # the last stage's link back to the head
        self._pending: deque[Work] = deque()  # sent down the ring, not yet back
        self.ring_stages = 1
        self.busy_s = 0.0  # this stage's computing seconds
        self.follower_busy_s: list[float] = []  # each follower's, as the last step brought back
        self.vocab = decoder.head.weight.shape[0]
        self.vocab_rows = self.vocab  # rows of the vocabulary the head projects in decode
        # How a lone prompt's slices round the ring are cut (ring.py, `pacing.pipeline_slices`).
        self.prefill_key_cost = key_cost(decoder.config)
        if downstream is not None:
            self.decode_fn = make_decode_fn(decoder, compiled=compiled, embed=True,
                                            project=False, quant=self.quant)
            self.rows_fn = RowsDecode(decoder, compiled=compiled, embed=True, project=False,
                                      quant=self.quant)
            self.project_fn = make_project_fn(decoder, compiled=compiled)
            self.verify_fn = make_verify_fn(decoder, compiled=compiled, embed=True,
                                            project=False, quant=self.quant)
            self.rows_verify = RowsVerify(decoder, compiled=compiled, embed=True, project=False,
                                          quant=self.quant)
            self.ring_stages = self._count_stages()
        self.stages = self.ring_stages if microbatch else 1

    def _count_stages(self) -> int:
        """Every follower passes a ping on with its hop count raised by one (and says what it
        is: the last one's word reaches the head, which then splits the vocabulary with it)."""
        assert self.downstream is not None and self.upstream is not None
        self.downstream.send(StepMessage(op="ping"))
        back, _ = self.upstream.recv()
        assert back.op == "ping", f"expected the ping back, got {back.op!r}"
        self._split_vocabulary(back)
        return back.hops + 1

    def _split_vocabulary(self, last: StepMessage) -> None:
        """Share decode's vocabulary projection with the last stage when it holds the head
        weights as this stage does and computes in this stage's dtype (so its logits are the
        ones this stage would compute)."""
        dec = self.decoder
        if (not last.last_projects or last.last_dtype != str(dec.dtype)
                or last.last_head != describe(dec.head)):
            return
        layer_bytes, projection_bytes = decoder_bytes(dec)
        rows = head_vocab_rows(self.vocab, len(dec.layers), last.last_layers, layer_bytes,
                               projection_bytes)
        part = rows_of(dec.head, 0, rows, copy=False) if rows < self.vocab else None
        if part is None:
            return
        self.vocab_rows = rows
        hidden = dec.config.hidden_size

        def join(back: mx.array) -> mx.array:
            # back: (rows, hidden + the last stage's logits)
            return mx.concatenate([project_rows(dec, part, back[:, :hidden]), back[:, hidden:]],
                                  axis=-1)

        def pick(back: mx.array, tail_ids: mx.array) -> mx.array:
            # back: (rows, hidden + the last stage's best logit); tail_ids: that logit's ids
            own = project_rows(dec, part, back[:, :hidden])
            return join_best(own, back[:, hidden], tail_ids)

        self.join_fn = mx.compile(join) if self.compiled else join
        self.pick_fn = mx.compile(pick) if self.compiled else pick

    def _drain(self) -> Journal:
        ops = list(self.journal)
        self.journal.clear()
        return ops

    def _tell_peers(self, message: StepMessage) -> None:
        for peer in self.tp_peers:
            peer.send(message)

    def prefill(self, row: int, start: int, tokens: list[int]) -> mx.array:
        self.submit(PrefillWork(row, start, tokens))
        _, logits = self.collect()
        assert logits is not None
        return logits

    def decode(self, tokens: list[int] | mx.array, positions: list[int]) -> mx.array:
        assert not isinstance(tokens, mx.array), "a pipeline head decodes known tokens"
        self.submit(DecodeWork(0, [[t] for t in tokens], positions))
        _, logits = self.collect()
        assert logits is not None
        return logits

    def submit(self, work: Work) -> None:
        ops = self._drain()
        if isinstance(work, PrefillWork):
            row, start, tokens = work.row, work.start, work.tokens
            self._tell_peers(StepMessage(op="prefill", kv_ops=ops, row=row, start=start,
                                         tokens=tokens))
            if self.downstream is None:
                # The tensor peers compute every layer of the chunk, collectives included, even
                # when its logits are not wanted (a chunk before the prompt's last): so must
                # rank 0, now, or the dropped lazy logits skip its last collectives and every
                # later one pairs with the wrong step (wrong tokens once rows run together).
                logits = self._local_prefill(row, start, tokens)
                mx.eval(logits, self.kv.keys, self.kv.values)
                self._done.append((work, logits if work.logits else None))
                return
            began = time.perf_counter()
            h = prefill(self.decoder, mx.array(tokens), start, row, self.kv.keys,
                        self.kv.values, embed=True, project=False, quant=self.quant)
            mx.eval(h, self.kv.keys, self.kv.values)
            self.busy_s += time.perf_counter() - began
            # The last stage hands back only the last position: all the head projects.
            self.downstream.send(StepMessage(op="prefill", kv_ops=ops, row=row, start=start,
                                             stages=self.ring_stages), h)
            self._pending.append(work)
            return
        if work.width > 1:
            self._submit_verify(work, ops)
            return
        tokens = work.flat_tokens()
        self._tell_peers(StepMessage(op="decode", kv_ops=ops, tokens=tokens,
                                     positions=work.positions, first_row=work.first_row))
        began = time.perf_counter()
        out = self._step(mx.array(tokens), mx.array(work.positions), first_row=work.first_row)
        if self.downstream is None:
            self._done.append((work, out))
            return
        mx.eval(out, self.kv.keys, self.kv.values)
        self.busy_s += time.perf_counter() - began
        vocab_from = self.vocab_rows if self.vocab_rows < self.vocab else 0
        self.downstream.send(StepMessage(op="decode", kv_ops=ops, positions=work.positions,
                                         first_row=work.first_row, stages=self.ring_stages,
                                         vocab_from=vocab_from,
                                         tail_best=work.greedy and vocab_from > 0),
                             out)
        self._pending.append(work)

    def collect(self) -> tuple[Work, mx.array | Picks | None]:
        if self._done:
            return self._done.popleft()
        assert self.upstream is not None and self._pending
        work = self._pending.popleft()
        message, back = self.upstream.recv()
        assert back is not None
        self.follower_busy_s = message.busy_s
        back = as_stage_dtype(back, self.decoder.dtype)  # the last stage may compute in another
        began = time.perf_counter()
        if isinstance(work, PrefillWork):
            if not work.logits:
                return work, None
            logits = self.project_fn(back[0, -1:])
        elif work.width > 1:  # a verify micro-batch: logits at every position (rows, width, vocab)
            logits = self.project_fn(back)
        elif message.best_ids:  # a greedy step: the upper rows' best logit and id a row
            logits = self.pick_fn(back, mx.array(message.best_ids, dtype=mx.uint32))
        elif message.vocab_from:  # the last stage projected the upper vocabulary rows
            logits = self.join_fn(back)
        else:
            logits = self.project_fn(back[:, 0, :])
        mx.eval(logits)  # here, so the projection counts as this stage's busy time
        self.busy_s += time.perf_counter() - began
        if message.best_ids:  # each row's pick, not logits
            return work, Picks(logits.tolist())
        return work, logits

    @property
    def stage_busy_s(self) -> list[float]:
        """Seconds each stage of the ring has computed (the head first); empty unless this
        is a pipeline head."""
        if self.downstream is None:
            return []
        return [self.busy_s, *self.follower_busy_s]

    @property
    def in_flight(self) -> int:
        return len(self._done) + len(self._pending)

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
        # A verify step goes round alone (the synchronous round drafts; nothing is in flight).
        assert self.upstream is not None and not self._pending, "verify with steps in flight"
        self.downstream.send(StepMessage(op="verify", kv_ops=ops, positions=starts,
                                         start=width, stages=self.ring_stages), out)
        message, back = self.upstream.recv()
        assert back is not None
        self.follower_busy_s = message.busy_s
        return self.project_fn(as_stage_dtype(back, self.decoder.dtype))

    def _submit_verify(self, work: DecodeWork, ops: Journal) -> None:
        """A verify micro-batch (rows carrying drafted tokens, ring.py) on its ordinary trip
        round the ring: a "verify" message with its row range, like a decode step's."""
        width = work.width
        self._tell_peers(StepMessage(op="verify", kv_ops=ops,
                                     tokens=[t for row in work.tokens for t in row],
                                     positions=work.positions, start=width,
                                     first_row=work.first_row))
        began = time.perf_counter()
        out = self._verify_rows(work)
        if self.downstream is None:
            self._done.append((work, out))
            return
        mx.eval(out, self.kv.keys, self.kv.values)
        self.busy_s += time.perf_counter() - began
        self.downstream.send(StepMessage(op="verify", kv_ops=ops, positions=work.positions,
                                         start=width, first_row=work.first_row,
                                         stages=self.ring_stages), out)
        self._pending.append(work)

    def close(self) -> None:
        links = [*self.tp_peers, *([self.downstream] if self.downstream else [])]
        for link in links:
            with contextlib.suppress(ConnectionError):
                link.send(StepMessage(op="shutdown"))
            link.close()
        if self.upstream is not None:
            self.upstream.close()
