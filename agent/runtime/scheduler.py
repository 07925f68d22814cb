"""Continuous batching: requests join and leave one running batch, token by token.

Each `step()` runs at most one prefill chunk (so a long prompt never freezes running streams)
and one decode step for every sequence past its prompt. Admission is checked against the
context length and the KV budget before any work starts: a request that can never fit fails at
once, one that cannot fit now waits in a bounded queue, and a full queue answers "overloaded".
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from agent.generation import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from agent.runtime.compute import LocalCompute, stage_stats
from agent.runtime.journal import PrefixLoad, PrefixSave
from agent.runtime.pacing import (  # noqa: F401  (prefill_slice's figures live there now)
    FIRST_PREFILL_SLICE,
    MIN_PREFILL_SLICE,
    moving_average,
    prefill_slice,
)
from agent.runtime.prefix import PrefixCache, copy_rows
from agent.runtime.ring import Ring
from agent.runtime.sampling import RowSampler, top_logprobs
from agent.runtime.seam import Compute, Slots
from agent.runtime.sequences import (
    SchedulerLimits,
    SchedulerStats,
    Sequence,
)
from agent.runtime.speculation import Speculator, prediction_usage
from agent.runtime.stops import StopMatcher

Emit = Callable[[GenerationEvent], None]


@dataclass(frozen=True)
class Lookahead:
    """A decode step queued before the previous step's tokens were read back: its logits, and
    the batch it was built for (sequence id -> row, and the row count)."""

    logits: mx.array
    rows: dict[str, int]
    kv_rows: int


class Scheduler:
    """Owns the KV slots of one runner and decides what runs in each step.

    `decoder` is flock's `Decoder` or the mlx-lm engine's model (the scheduler reads its
    `config.vocab_size`); `kv` and `compute` are either engine's halves of the seam (`seam.py`).
    """

    def __init__(
        self,
        decoder: Any,
        tokenizer: Any,
        kv: Slots,
        limits: SchedulerLimits,
        emit: Emit,
        *,
        compiled: bool = True,
        prefix_cache: PrefixCache | None = None,
        compute: Compute | None = None,
        constraint_factory: Callable[[GenerationRequest], Any] | None = None,
        prompt_lookup: bool = True,
        draft_model: Any = None,
    ) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.kv = kv
        # Allocated KV (rows x capacity, padding included) stays within the budget: the cache
        # stops growing there, and admission only lets in what the padded layout can hold.
        kv.limit_bytes = limits.kv_budget_bytes
        self.limits = limits
        self.emit = emit
        self.compute: Compute = compute or LocalCompute(decoder, kv,  # type: ignore[arg-type]
                                                        compiled=compiled)
        self.eos_ids: set[int] = set(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.waiting: deque[GenerationRequest] = deque()
        self.running: dict[str, Sequence] = {}
        self.cancelled: set[str] = set()
        self.stats = SchedulerStats()
        self.prefix = prefix_cache
        self._rate_mark = (0, 0.0)  # (generated tokens, decode seconds) at the last snapshot
        # Builds a request's decoding constraint (None when it has none); raises ValueError for
        # a constraint that cannot be compiled, which fails that request as a bad request.
        self.constraint_factory = constraint_factory
        self._ahead: Lookahead | None = None
        # The last decode step's (start, KV rows, width) while decode steps follow each other
        # (`_time_period`): the speculator's measured step costs.
        self._period: tuple[float, int, int] | None = None
        # Moving averages that size prefill slices: seconds a decode step takes, and seconds
        # per prompt token of the latest prefill slices.
        self.decode_step_s: float | None = None
        self.prefill_s_per_token: float | None = None
        # A pipeline head keeps micro-batches in flight around its ring (ring.py runs the round).
        stages = getattr(self.compute, "stages", 1)
        self.ring = Ring(self, self.compute) if stages > 1 else None  # type: ignore[arg-type]
        # Speculative decoding: drafts per sequence (prompt lookup, a draft model), verified in
        # multi-token decode steps.
        self.speculator = Speculator(self, enabled=prompt_lookup, draft_model=draft_model)

    # ---- admission --------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def kv_reserved_bytes(self) -> int:
        per_token = self.kv.geometry.bytes_per_token
        return sum(seq.reserved_tokens for seq in self.running.values()) * per_token

    def kv_used_bytes(self) -> int:
        per_token = self.kv.geometry.bytes_per_token
        return sum(seq.length for seq in self.running.values()) * per_token

    def submit(self, request: GenerationRequest) -> None:
        problem = self._never_fits(request)
        if problem is not None:
            self.stats.rejected_total += 1
            self.emit(Failed(id=request.id, code="bad_request", message=problem))
            return
        free_slots = max(0, self.limits.max_batch - len(self.running))
        if len(self.waiting) >= free_slots + self.limits.max_queue:
            self.stats.rejected_total += 1
            self.emit(Failed(id=request.id, code="overloaded",
                             message="the server is at capacity; retry shortly"))
            return
        self.waiting.append(request)

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)

    def _max_tokens(self, request: GenerationRequest) -> int:
        room = self.limits.context_length - len(request.prompt_tokens)
        return max(0, min(request.sampling.max_tokens, room))

    def _never_fits(self, request: GenerationRequest) -> str | None:
        prompt = len(request.prompt_tokens)
        if prompt == 0:
            return "the prompt is empty"
        vocab = self.decoder.config.vocab_size
        bad = next((t for t in request.prompt_tokens if not 0 <= t < vocab), None)
        if bad is not None:
            return f"token id {bad} is outside the model's vocabulary (0 to {vocab - 1})"
        if prompt >= self.limits.context_length:
            return (f"the prompt has {prompt} tokens, but the model's context is "
                    f"{self.limits.context_length} tokens (at most "
                    f"{self.limits.context_length - 1} prompt tokens leave room for one reply "
                    "token)")
        need = (prompt + max(1, self._max_tokens(request))) * self.kv.geometry.bytes_per_token
        if need > self.limits.kv_budget_bytes:
            return (f"the request needs {need} bytes of KV cache ({prompt} prompt tokens + "
                    f"{self._max_tokens(request)} reply tokens) but this node's KV budget is "
                    f"{self.limits.kv_budget_bytes} bytes; shorten the prompt or max_tokens")
        return None

    def _peak_tokens(self, request: GenerationRequest) -> int:
        return len(request.prompt_tokens) + max(1, self._max_tokens(request))

    def _rows_with(self, request: GenerationRequest) -> int | None:
        """Rows the cache takes with `request` running too, or None when the allocation (every
        row padded to the longest sequence's peak) would exceed the KV budget."""
        tokens = max([s.peak_tokens for s in self.running.values()]
                     + [self._peak_tokens(request)])
        return self.kv.layout(len(self.running) + 1, tokens)

    def _fits_now(self, request: GenerationRequest) -> bool:
        if len(self.running) >= self.limits.max_batch:
            return False
        need = (len(request.prompt_tokens) + self._max_tokens(request))
        need *= self.kv.geometry.bytes_per_token
        if self.kv_reserved_bytes() + need > self.limits.kv_budget_bytes:
            return False
        return self._rows_with(request) is not None

    def _make_room(self, request: GenerationRequest) -> int:
        """Prepare the cache for one more row; returns the row count to grow to if needed.

        The cache may carry rows or capacity from sequences that have finished; when that would
        keep the layout (with the new row) from holding every running sequence's peak within
        the budget, the running rows are regrouped into exactly the rows `layout` chose."""
        rows = self._rows_with(request)
        assert rows is not None
        kv = self.kv
        target = kv.rows if kv.free_rows() else rows
        tokens = max([s.peak_tokens for s in self.running.values()]
                     + [self._peak_tokens(request), kv.capacity])
        limit = kv.capacity_limit(target)
        if limit is not None and limit < tokens:
            mapping = kv.compact({s.row: s.length for s in self.running.values()}, rows=rows)
            for seq in self.running.values():
                seq.row = mapping[seq.row]
        return rows

    def _admit(self) -> None:
        while self.waiting:
            request = self.waiting[0]
            if request.id in self.cancelled:
                self.waiting.popleft()
                self.cancelled.discard(request.id)
                self._finish_unstarted(request, "cancelled")
                continue
            if not self._fits_now(request):
                return
            self.waiting.popleft()
            try:
                constraint = self.constraint_factory(request) if self.constraint_factory else None
            except ValueError as exc:
                self.emit(Failed(id=request.id, code="bad_request", message=str(exc)))
                continue
            max_tokens = self._max_tokens(request)
            rows = self._make_room(request)
            row = self.kv.acquire(request.id, len(request.prompt_tokens) + 1, rows=rows)
            self.running[request.id] = Sequence(
                request=request,
                row=row,
                sampler=RowSampler(request.sampling, constraint=constraint),
                detokenizer=self.tokenizer.detokenizer,
                stops=StopMatcher(request.sampling.stop),
                max_tokens=max_tokens,
                drafter=self.speculator.drafter_for(request.prompt_tokens,
                                                    request.prediction_tokens),
            )
            self._reuse_prefix(self.running[request.id])
            self.stats.requests_total += 1
            self.stats.prompt_tokens_total += len(request.prompt_tokens)
            if max_tokens == 0:
                self._finish(self.running[request.id], "length")

    def _reuse_prefix(self, seq: Sequence) -> None:
        if self.prefix is None:
            return
        n, entry = self.prefix.lookup(seq.prompt)
        if entry is None:
            return
        self.kv.write_row(seq.row, [k[:, :, :n] for k in entry.keys],
                          [v[:, :, :n] for v in entry.values])
        if self.kv.journal is not None:
            self.kv.journal.append(PrefixLoad(entry.id, seq.row, n))
        seq.prefilled = seq.length = seq.cached_tokens = n

    def _remember_prefix(self, seq: Sequence) -> None:
        if self.prefix is None or seq.length < self.prefix.min_tokens:
            return
        tokens = (seq.prompt + seq.sampler.history)[: seq.length]
        keys, values = self.kv.read_row(seq.row, seq.length)
        entry_id = self.prefix.store(tokens, copy_rows(keys), copy_rows(values))
        if entry_id is not None and self.kv.journal is not None:
            self.kv.journal.append(PrefixSave(entry_id, seq.row, seq.length))

    def _finish_unstarted(self, request: GenerationRequest, reason: str) -> None:
        usage = Usage(prompt_tokens=len(request.prompt_tokens), completion_tokens=0)
        self.emit(Finished(id=request.id, reason=reason, usage=usage))  # type: ignore[arg-type]

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> None:
        """One scheduling round: admit, one prefill chunk, one decode step."""
        if self.ring is not None:
            self.ring.step()
            return
        self._drop_cancelled()
        self._admit()
        if not self.running:
            self._period = None  # idle: no step follows the last one
            return
        decoding = [s for s in self.running.values()
                    if not s.in_prefill and s.next_token is not None]
        prefilling = [s for s in self.running.values() if s.in_prefill]
        if prefilling:
            self._period = None  # this round's prefill chunks are no decode step's cost
            self._prefill_round(prefilling, bool(decoding))
        if decoding:
            self._decode(decoding)
        self._compact()

    def _drop_cancelled(self) -> None:
        for request_id in list(self.cancelled):
            seq = self.running.get(request_id)
            if seq is not None:
                self.cancelled.discard(request_id)
                self._finish(seq, "cancelled")

    def _prefill_round(self, prefilling: list[Sequence], others_decode: bool) -> None:
        """This round's prefill: the oldest prompt's next chunk (sized by time while others
        decode, `solo_prefill_chunk` when none does), then every later prompt that fits whole in
        what is left of the time-sized slice, so short prompts arriving together start in one
        round rather than one per decode step; a prompt that does not fit waits its turn (no
        small partial chunks)."""
        timed = prefill_slice(self.limits.prefill_chunk, self.limits.prefill_gap_steps,
                              self.decode_step_s, self.prefill_s_per_token)
        first, *later = prefilling
        chunk = timed if others_decode else self.limits.solo_prefill_chunk
        left = timed - min(chunk, first.prompt_left)
        self._prefill_chunk(first, chunk)
        for seq in later:
            if seq.prompt_left <= left:
                left -= seq.prompt_left
                self._prefill_chunk(seq, seq.prompt_left)

    def _prefill_chunk(self, seq: Sequence, chunk: int) -> None:
        start = seq.prefilled
        tokens = seq.prompt[start:start + chunk]
        self.kv.ensure_capacity(start + len(tokens) + 1)
        began = time.perf_counter()
        logits = self.compute.prefill(seq.row, start, tokens)
        seq.prefilled = seq.length = start + len(tokens)
        if seq.in_prefill:
            mx.eval(self.kv.keys, self.kv.values)
            per_token = (time.perf_counter() - began) / len(tokens)
            self.prefill_s_per_token = moving_average(self.prefill_s_per_token, per_token)
            return
        self._sample_and_emit([seq], logits)

    def _decode(self, decoding: list[Sequence]) -> None:
        started = time.perf_counter()
        self._time_period(started)
        kv_rows = self.kv.rows
        logits = self._take_lookahead(decoding)
        if logits is None and self.speculator.try_verify(decoding):
            self._period = (started, kv_rows, self.speculator.last_width)
            self._count_step(decoding, started)
            return
        self._period = (started, kv_rows, 1)
        if logits is None:
            self.kv.ensure_capacity(max(s.length for s in self.running.values()) + 1)
            rows = self.kv.rows
            tokens = [0] * rows
            positions = [0] * rows
            # Rows still in prefill get a harmless write at their next free position, which
            # their next prefill chunk overwrites; free rows write at 0.
            for seq in self.running.values():
                positions[seq.row] = seq.length
            for seq in decoding:
                tokens[seq.row] = seq.next_token  # type: ignore[assignment]
            self.compute.will_decode([s.row for s in decoding])
            logits = self.compute.decode(tokens, positions)
        else:
            self.stats.lookahead_steps_total += 1
        for seq in decoding:
            seq.length += 1
        if self._may_look_ahead(decoding):
            self._greedy_with_lookahead(decoding, logits)
        else:
            self._sample_and_emit(decoding, logits, rows_of=[s.row for s in decoding])
        self._count_step(decoding, started)

    def _time_period(self, now: float) -> None:
        """The previous decode step's period (from its start to this one's, the scheduling
        round around it included) goes to the speculator's measured step costs as a step of
        its (rows, width). A period, not the step's own span: a plain step overlaps the next
        one's compute (lookahead), so its own span swings between a whole step and almost
        nothing, while the period is what each step really costs the streams."""
        period, self._period = self._period, None
        if period is not None:
            began, rows, width = period
            self.speculator.record_step(rows, width, now - began)

    def _count_step(self, decoding: list[Sequence], started: float) -> None:
        self.stats.decode_rows_max = max(self.stats.decode_rows_max, len(decoding))
        self.stats.decode_steps_total += 1
        elapsed = time.perf_counter() - started
        self.stats.decode_seconds_total += elapsed
        self.decode_step_s = moving_average(self.decode_step_s, elapsed)

    # ---- lookahead: the next decode step runs while this one's tokens are handled ----------
    def _may_look_ahead(self, decoding: list[Sequence]) -> bool:
        """Only when the next step's batch is as predictable as can be: every running
        sequence decodes greedily from raw logits (the next input is this step's argmax),
        nobody waits to join, someone will still be running, and the steps are plain local
        MLX work."""
        return (self.compute.lazy_decode
                and not self.waiting and not self.cancelled
                and len(decoding) == len(self.running)
                and not any(s.sampler.needs_logits for s in decoding)
                and not self.speculator.wants_step(decoding)
                and any(s.generated + 1 < s.max_tokens for s in decoding))

    def _greedy_with_lookahead(self, decoding: list[Sequence], logits: mx.array) -> None:
        """Queue the next step on this step's (still lazy) argmax, then read this step's tokens
        while MLX computes the next one. Whatever this step's tokens decide (a stop, a new
        request), the queued step only writes each row's KV at its next position, which the
        real step would write with the same token, or a freed row nobody reads."""
        chosen = mx.argmax(logits, axis=-1).astype(mx.int32)
        self.kv.ensure_capacity(max(s.length for s in decoding) + 1)
        positions = [0] * self.kv.rows
        for seq in decoding:
            positions[seq.row] = seq.length
        self.compute.will_decode([s.row for s in decoding])
        ahead = self.compute.decode(chosen, positions)
        mx.async_eval(ahead, self.kv.keys, self.kv.values)
        self._ahead = Lookahead(ahead, {s.request.id: s.row for s in decoding}, self.kv.rows)
        ids = chosen.tolist()
        for seq in decoding:
            self._accept(seq, int(ids[seq.row]), None)

    def _take_lookahead(self, decoding: list[Sequence]) -> mx.array | None:
        """The queued step's logits when it was built for exactly this batch, else None (the
        queued step's KV writes are then redone or unused)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.kv_rows != self.kv.rows:
            return None
        if len(decoding) != len(self.running) or len(decoding) != len(ahead.rows):
            return None
        if any(ahead.rows.get(s.request.id) != s.row for s in decoding):
            return None
        return ahead.logits

    def _sample_and_emit(self, seqs: list[Sequence], logits: mx.array,
                         rows_of: list[int] | None = None) -> None:
        """Pick each sequence's next token from its logits row and stream it out."""
        rows = rows_of if rows_of is not None else [0] * len(seqs)
        if not any(s.sampler.needs_logits for s in seqs):
            chosen = mx.argmax(logits, axis=-1)
            mx.eval(chosen, self.kv.keys, self.kv.values)
            ids = chosen.tolist()
            picks = [(int(ids[row]), None) for row in rows]
        else:
            picks = []
            pending = []
            for seq, row in zip(seqs, rows, strict=True):
                row_logits = seq.sampler.adjust(logits[row], seq.prompt)
                token = seq.sampler.choose(row_logits)
                lp = None
                if seq.request.sampling.logprobs:
                    lp = top_logprobs(logits[row], token, seq.request.sampling.top_logprobs)
                pending.append((token, lp))
            mx.eval([p[0] for p in pending], [p[1] for p in pending if p[1] is not None],
                    self.kv.keys, self.kv.values)
            for token, lp in pending:
                picks.append((int(token.item()), lp))
        for seq, (token, lp) in zip(seqs, picks, strict=True):
            self._accept(seq, token, lp)

    def _accept(self, seq: Sequence, token: int, lp: Any) -> None:
        seq.generated += 1
        seq.sampler.history.append(token)
        self.stats.generated_tokens_total += 1
        request = seq.request
        constraint = seq.sampler.constraint
        if constraint is not None:
            constraint.consume(token)
        if token in self.eos_ids or token in request.sampling.stop_token_ids:
            self._finish(seq, "stop")
            return
        seq.detokenizer.add_token(token)
        text, stop = seq.stops.feed(seq.detokenizer.last_segment)
        logprobs = None
        if lp is not None:
            logprobs = [self._logprob_entry(token, lp)]
        seq.unsent_ids.append(token)
        if text or logprobs:
            self.emit(TokenChunk(id=request.id, text=text, token_ids=seq.unsent_ids,
                                 logprobs=logprobs))
            seq.unsent_ids = []
        if stop is not None:
            self._finish(seq, "stop", stop_sequence=stop, flush=False)
            return
        seq.next_token = token
        if constraint is not None and constraint.finished():
            self._finish(seq, "stop")
            return
        if seq.generated >= seq.max_tokens or seq.length + 1 >= self.limits.context_length:
            self._finish(seq, "length")

    def _logprob_entry(self, token: int, lp: Any) -> TokenLogprob:
        chosen, ids, values = lp
        decode = self.tokenizer.decode
        top = [TopLogprob(int(i), decode([int(i)]), float(v))
               for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return TokenLogprob(token, decode([token]), float(chosen.item()), top)

    def _finish(self, seq: Sequence, reason: str, *, stop_sequence: str | None = None,
                flush: bool = True) -> None:
        if flush and reason != "cancelled":
            seq.detokenizer.finalize()
            tail = seq.stops.flush(seq.detokenizer.last_segment)
            if tail or seq.unsent_ids:
                self.emit(TokenChunk(id=seq.request.id, text=tail, token_ids=seq.unsent_ids))
                seq.unsent_ids = []
        usage = Usage(prompt_tokens=len(seq.prompt), completion_tokens=seq.generated,
                      cached_tokens=seq.cached_tokens, **prediction_usage(seq))
        self.emit(Finished(id=seq.request.id, reason=reason, usage=usage,  # type: ignore[arg-type]
                           stop_sequence=stop_sequence))
        if not seq.in_prefill:
            self._remember_prefix(seq)
        self.kv.release(seq.row)
        del self.running[seq.request.id]

    def _compact(self) -> None:
        lengths = {seq.row: seq.length for seq in self.running.values()}
        mapping = self.kv.compact(lengths)
        for seq in self.running.values():
            seq.row = mapping.get(seq.row, seq.row)

    # ---- reporting ------------------------------------------------------------------------
    def decode_rate(self) -> float:
        """Decode tokens per second of decode-step time since the last call (0 when idle)."""
        tokens, seconds = self.stats.generated_tokens_total, self.stats.decode_seconds_total
        last_tokens, last_seconds = self._rate_mark
        self._rate_mark = (tokens, seconds)
        if seconds <= last_seconds:
            return 0.0
        return (tokens - last_tokens) / (seconds - last_seconds)

    def snapshot(self) -> dict[str, float]:
        return {
            "decode_tokens_per_second": self.decode_rate(),
            "active": float(len(self.running)),
            "queued": float(len(self.waiting)),
            "kv_used_bytes": float(self.kv_used_bytes()),
            "kv_reserved_bytes": float(self.kv_reserved_bytes()),
            "kv_allocated_bytes": float(self.kv.allocated_bytes),
            "kv_capacity_bytes": float(self.limits.kv_budget_bytes),
            "prompt_tokens_total": float(self.stats.prompt_tokens_total),
            "generated_tokens_total": float(self.stats.generated_tokens_total),
            "decode_steps_total": float(self.stats.decode_steps_total),
            "decode_seconds_total": self.stats.decode_seconds_total,
            "decode_rows_max": float(self.stats.decode_rows_max),
            "prefix_hits": float(self.prefix.stats.hits if self.prefix else 0),
            "prefix_misses": float(self.prefix.stats.misses if self.prefix else 0),
            "evictions": float(self.prefix.stats.evictions if self.prefix else 0),
            "prefix_cache_bytes": float(self.prefix.bytes if self.prefix else 0),
            **(self.ring.snapshot() if self.ring is not None else {}),
            **stage_stats(self.compute),
            **self.speculator.snapshot(),
        }
