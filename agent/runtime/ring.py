"""Micro-batches in flight around a pipeline ring: the scheduler's round when its compute is a
pipeline head (`seam.PipelinedCompute` with more than one stage).

Stop-and-wait keeps one step in the ring, so with S stages each is busy 1/S of the time. Here
the running sequences are split into up to S micro-batches (contiguous ranges of KV rows) and
each is sent round as soon as its previous step's logits are back and sampled: while stage 2
computes micro-batch A, the head computes B. A long prompt's slices flow the same way (slice
k+1 enters stage 1 while slice k is in stage 2), so its time to first token falls with stages.

What stays exact: sampling, stop strings, admission and the prefix cache stay in the head's
scheduler; a sequence is in at most one step in flight; bookkeeping (`length`, `prefilled`)
advances when a step is submitted, so every later step (and any harmless write a range makes
to rows that are not its members) targets the positions after it; and every stage runs steps
in submission order with the journal ops drained at each submit, so followers' caches mirror
the head's whatever compaction or growth happens while steps are in flight. Results are
matched to sequences by identity, not row, because rows may be regrouped meanwhile.

One decoding sequence (or micro-batching off) is one step of every row in flight at a time:
the same step, in the same order, as the synchronous path.

Drafted tokens (speculative decoding) ride the micro-batches' ordinary trips: a micro-batch
whose rows have drafts goes round as a verify micro-batch (`width` tokens a row: the pending
token and its draft, padded; rows without a draft feed their pending token alone), and the head
applies the acceptance rule when its logits come back. Until then its rows' lengths are held
at the most the step can keep (start + width), so compaction, growth and other micro-batches'
harmless writes treat every position it writes as taken; on its return each row's length drops
to what it kept. The positions past that hold stale KV on every stage, harmless as ever: a
row's length says where its next token is written, and no query sees a position before that
token's step has rewritten it. With one stream (`SOLO_VERIFY`) its verify step goes round alone,
stop-and-wait, as the synchronous round's does (`_speculate`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.runtime.pacing import moving_average, pipeline_slices, prefill_slice
from agent.runtime.seam import DecodeWork, Picks, PipelinedCompute, PrefillWork, Work
from agent.runtime.sequences import SchedulerView, Sequence
from agent.runtime.verify import step_width

if TYPE_CHECKING:
    from agent.runtime.speculation import Draft

# A lone long prompt is cut into slices on the attention kernel's query blocks, sized from the
# cost model in pacing.py (`lone_prompt_slices`): as few and as even as the ring's fill and
# drain allow, none shorter than PIPELINE_MIN_SLICE tokens but the prompt's last. Below 256 rows
# a slice's matmuls lose speed (a 128-row slice takes `matmul.linear`'s swapped form), so the
# floor is two blocks. 2,000 tokens on 2 stages: seven slices of 256 and one of 208.
PIPELINE_MIN_SLICE = 256
# One stream with drafts: its verify step goes round alone, stop-and-wait (`_speculate`), rather
# than as a one-row verify micro-batch. The same work either way; on a 3-stage SmolLM2 pipeline
# (3 interleaved rounds, a busy machine) the two measured within noise of each other.
SOLO_VERIFY = True


def lone_prompt_slices(prompt_tokens: int, done: int, stages: int, per_key: float,
                       most: int) -> list[int]:
    """Slice lengths for a prompt's tokens [done, prompt_tokens) prefilled while nothing
    decodes (`pacing.pipeline_slices`): every stage has work after the first slice, and each
    slice is matrix-shaped work ending on a query block."""
    return pipeline_slices(prompt_tokens, done, stages, per_key, least=PIPELINE_MIN_SLICE,
                           most=most)


def split_rows(ready_rows: list[int], total_decoding: int, stages: int) -> list[int]:
    """The rows of the next micro-batch: the lowest-row ready sequences, as many as an even
    split of every decoding sequence (in flight or not) over the stages gives each."""
    parts = max(1, min(stages, total_decoding))
    size = -(-total_decoding // parts)
    return sorted(ready_rows)[:size]


@dataclass
class SlicePlan:
    """A lone prompt's slices still to go: its request, where its next slice starts, and the
    lengths of the slices from there."""

    request: str
    start: int
    sizes: deque[int]


@dataclass
class Flight:
    """A step in the ring: its work and the sequences it computes for (with each one's row
    offset within the step's rows)."""

    work: Work
    members: list[tuple[Sequence, int]]
    started: float
    # A verify micro-batch: each member's drafted tokens (request id -> draft, those that have
    # one) and its first position (its length before the step).
    drafts: dict[str, Draft] | None = None
    starts: dict[str, int] | None = None


class Ring:
    def __init__(self, scheduler: SchedulerView, compute: PipelinedCompute) -> None:
        self.sched = scheduler
        self.compute = compute
        self.flights: deque[Flight] = deque()
        self.busy: dict[str, int] = {}  # request id -> its steps in flight
        self.last_collect: float | None = None
        self.overlapped_steps_total = 0  # steps submitted while another was in flight
        self.in_flight_max = 0
        self.verify_microbatches_total = 0  # micro-batches that carried drafts round the ring
        self.greedy_picks_total = 0  # decode steps that came back as picks, not logits
        self.plan: SlicePlan | None = None  # the lone prompt being sliced

    @property
    def key_cost(self) -> float:
        """A prompt's attention work per (query, key) pair relative to a token's matmuls
        (`pacing.key_cost`); 0 (equal-token slices) when the compute does not say."""
        return float(getattr(self.compute, "prefill_key_cost", 0.0))

    @property
    def stages(self) -> int:
        return self.compute.stages

    def step(self) -> None:
        sched = self.sched
        self._release_cancelled()
        sched._drop_cancelled()
        sched._admit()
        if not sched.running:
            while self.flights:  # only steps of sequences that are gone: read and drop them
                self._collect()
            return
        if not self.flights and self._speculate():
            sched._compact()
            return
        self._fill()
        if self.flights:
            self._collect()
        sched._compact()

    def _release_cancelled(self) -> None:
        """A cancelled sequence with a verify micro-batch in flight finishes now: its length
        drops from the held maximum to what is certainly in the cache (its pending token), so
        what it leaves behind (the prefix cache's copy) matches its tokens."""
        for flight in self.flights:
            if flight.starts is None:
                continue
            for seq, _ in flight.members:
                if seq.request.id in self.sched.cancelled:
                    seq.length = flight.starts[seq.request.id] + 1

    def _speculate(self) -> bool:
        """One stream alone (`SOLO_VERIFY`): there is nothing to overlap, and its verify step
        goes round alone (the ring is empty); False when it has no draft."""
        sched = self.sched
        if not SOLO_VERIFY or any(s.in_prefill for s in sched.running.values()):
            return False
        decoding = [s for s in sched.running.values() if s.next_token is not None]
        if len(decoding) != 1:
            return False
        started = time.perf_counter()
        if not sched.speculator.try_verify(decoding):
            return False
        sched._count_step(decoding, started)
        return True

    # ---- what goes in next ------------------------------------------------------------------
    def _fill(self) -> None:
        while len(self.flights) < self.stages:
            already = len(self.flights)
            if (self._next_prefill() or self._next_decode()) is None:
                return
            if already:
                self.overlapped_steps_total += 1
            self.in_flight_max = max(self.in_flight_max, len(self.flights))

    def _decoding(self) -> list[Sequence]:
        return [s for s in self.sched.running.values()
                if not s.in_prefill and (s.next_token is not None or s.request.id in self.busy)]

    def _next_prefill(self) -> Flight | None:
        sched = self.sched
        prefilling = [s for s in sched.running.values() if s.in_prefill]
        if not prefilling:
            return None
        seq = prefilling[0]
        limits = sched.limits
        if self._decoding():
            # Others decode: one bounded slice in the ring at a time, as the synchronous path.
            if any(isinstance(f.work, PrefillWork) for f in self.flights):
                return None
            chunk = prefill_slice(limits.prefill_chunk, limits.prefill_gap_steps,
                                  sched.decode_step_s, sched.prefill_s_per_token)
            start = seq.prefilled
            sched.kv.ensure_capacity(min(start + chunk, len(seq.prompt)) + 1)
        else:
            start, prompt = seq.prefilled, len(seq.prompt)
            chunk = self._planned_slice(seq)
            # Room for the whole prompt at once: growing the cache slice by slice copied it
            # at every stage before each slice (6-14 ms a slice at 2,000 tokens on SmolLM2).
            sched.kv.ensure_capacity(prompt + 1)
        tokens = seq.prompt[start:start + chunk]
        seq.prefilled = seq.length = start + len(tokens)
        work = PrefillWork(seq.row, start, tokens, logits=not seq.in_prefill)
        began = time.perf_counter()
        self.compute.submit(work)
        # The head's own share of the slice: the unit decode steps are measured in too, so
        # their ratio sizes slices as it does on one node.
        per_token = (time.perf_counter() - began) / len(tokens)
        sched.prefill_s_per_token = moving_average(sched.prefill_s_per_token, per_token)
        return self._fly(work, [(seq, 0)])

    def _planned_slice(self, seq: Sequence) -> int:
        """The next slice of a prompt prefilled alone. Its plan is made at its first slice, and
        again wherever it does not resume where the plan's last slice ended (slices taken while
        others decoded)."""
        start = seq.prefilled
        plan = self.plan
        if plan is None or (plan.request, plan.start) != (seq.request.id, start):
            plan = SlicePlan(seq.request.id, start,
                             deque(lone_prompt_slices(len(seq.prompt), start, self.stages,
                                                      self.key_cost,
                                                      self.sched.limits.solo_prefill_chunk)))
        size = plan.sizes.popleft()
        plan.start += size
        self.plan = plan if plan.sizes else None
        return size

    def _next_decode(self) -> Flight | None:
        sched = self.sched
        decoding = self._decoding()
        ready = {s.row: s for s in decoding if s.request.id not in self.busy}
        if not ready:
            return None
        kv = sched.kv
        kv.ensure_capacity(max(s.length for s in sched.running.values()) + 1)
        if min(self.stages, len(decoding)) <= 1:
            first, stop = 0, kv.rows  # one micro-batch: the synchronous path's step
            members = list(ready.values())
        else:
            rows = split_rows(list(ready), len(decoding), self.stages)
            first, stop = rows[0], rows[-1] + 1
            members = [ready[row] for row in rows]
        drafts = self._drafts(members)
        width = step_width(1 + max(len(d.tokens) for d in drafts.values())) if drafts else 1
        if width > 1:
            kv.ensure_capacity(max(s.length for s in sched.running.values()) + width)
        positions = [0] * (stop - first)
        tokens = [[0] * width for _ in positions]
        for seq in sched.running.values():
            if first <= seq.row < stop:
                positions[seq.row - first] = seq.length
        for seq in members:
            draft = drafts.get(seq.request.id)
            row = [seq.next_token, *(draft.tokens if draft is not None else [])]
            tokens[seq.row - first][:len(row)] = row  # type: ignore[assignment]
        # Plain greedy rows need only their argmax: a head may hand back `Picks` for them.
        greedy = width == 1 and not any(s.sampler.needs_logits for s in members)
        work = DecodeWork(first, tokens, positions, greedy=greedy)
        sched.compute.will_decode([s.row for s in members])
        began = time.perf_counter()
        self.compute.submit(work)
        if len(members) == len(decoding):
            sched.decode_step_s = moving_average(sched.decode_step_s,
                                                  time.perf_counter() - began)
        else:  # the head's share of a micro-batch, scaled to the whole batch
            share = (time.perf_counter() - began) * len(decoding) / len(members)
            sched.decode_step_s = moving_average(sched.decode_step_s, share)
        offsets = [(s, s.row - first) for s in members]
        starts = {s.request.id: s.length for s in members}
        for seq in members:
            # Its one token; for a verify step the most it can keep, held until it is back.
            seq.length += width
        sched.stats.decode_rows_max = max(sched.stats.decode_rows_max, len(members))
        if width > 1:
            self.verify_microbatches_total += 1
            return self._fly(work, offsets, drafts, starts)
        return self._fly(work, offsets)

    def _drafts(self, members: list[Sequence]) -> dict[str, Draft]:
        """The members' drafts for this micro-batch; none when the widest step would not fit
        the cache's budget."""
        sched = self.sched
        drafts = sched.speculator.drafts_for(members)
        if not drafts:
            return drafts
        width = step_width(1 + max(len(d.tokens) for d in drafts.values()))
        kv = sched.kv
        limit = kv.capacity_limit(kv.rows)
        longest = max(s.length for s in sched.running.values())
        if limit is not None and longest + width > limit:
            return {}
        return drafts

    def _fly(self, work: Work, members: list[tuple[Sequence, int]],
             drafts: dict[str, Draft] | None = None,
             starts: dict[str, int] | None = None) -> Flight:
        flight = Flight(work, members, time.perf_counter(), drafts, starts)
        self.flights.append(flight)
        for seq, _ in members:
            self.busy[seq.request.id] = self.busy.get(seq.request.id, 0) + 1
        return flight

    # ---- what comes back --------------------------------------------------------------------
    def _collect(self) -> None:
        sched = self.sched
        work, logits = self.compute.collect()
        flight = self.flights.popleft()
        assert flight.work is work, "steps come back in the order they went"
        now = time.perf_counter()
        for seq, _ in flight.members:
            left = self.busy[seq.request.id] - 1
            if left:
                self.busy[seq.request.id] = left
            else:
                del self.busy[seq.request.id]
        live = [(s, offset) for s, offset in flight.members
                if sched.running.get(s.request.id) is s]
        if isinstance(work, PrefillWork):
            if logits is not None and live:
                sched._sample_and_emit([live[0][0]], logits)
        else:
            since = flight.started if self.last_collect is None else max(
                self.last_collect, flight.started)
            sched.stats.decode_steps_total += 1
            sched.stats.decode_seconds_total += now - since
            if live and flight.starts is not None:
                self._take_verified(flight, live, logits)
            elif live and isinstance(logits, Picks):  # a greedy step: each row's argmax
                self.greedy_picks_total += 1
                for seq, offset in live:
                    sched._accept(seq, logits.ids[offset], None)
            elif live:
                sched._sample_and_emit([s for s, _ in live], logits,  # type: ignore[arg-type]
                                       rows_of=[offset for _, offset in live])
        self.last_collect = now if self.flights else None

    def _take_verified(self, flight: Flight, live: list[tuple[Sequence, int]],
                       logits: Any) -> None:
        """A verify micro-batch is back: each row's length returns to its first position and
        the acceptance rule emits what it keeps (which sets the length it ends at)."""
        assert flight.starts is not None and flight.drafts is not None
        for seq, _ in live:
            seq.length = flight.starts[seq.request.id]
        self.sched.speculator.take_verified([s for s, _ in live], flight.drafts, logits,
                                            rows_of=[offset for _, offset in live])

    def snapshot(self) -> dict[str, float]:
        return {"pipeline_stages": float(self.stages),
                "microbatches_in_flight": float(len(self.flights)),
                "microbatches_in_flight_max": float(self.in_flight_max),
                "overlapped_steps_total": float(self.overlapped_steps_total),
                "verify_microbatches_total": float(self.verify_microbatches_total),
                "greedy_picks_total": float(self.greedy_picks_total)}
