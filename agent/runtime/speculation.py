"""Speculative decoding in the scheduler: a decode step whose rows carry drafted tokens.

Each sequence may have a drafter (`drafting.PromptLookup`: the prompt, the output so far and a
predicted output), and a runner may hold a draft model (`draft_model.DraftModel`), which drafts
for every sequence the lookup has nothing for (a prediction or a copied span comes first: it is
free). When some decoding row has a draft and the cost model (`draft_cost.py`) says the wider
step pays (each row's estimated acceptance against what `rows x width` positions cost here; a
prediction's or a draft model's draft always goes in), the step is a verification step, as wide
as pays best, instead of a plain decode: every row feeds its pending token plus its draft (rows
without one just their pending token, padded), one forward pass scores every position, and each
row keeps the longest prefix of its draft that the acceptance rule (`acceptance.py`) allows,
plus the model's own next token (a draft model's sampled drafts carry their distribution q, for
the min(1, p/q) rule). Tokens go out through the scheduler's ordinary `_accept`, one by one, so
stop strings, EOS, max tokens, logprobs and constraints behave as in plain decoding; a sequence
that ends inside its draft ignores the rest. KV of rejected positions needs no undo: a row's
length says where its next token is written, and the positions past it are overwritten before
any query can see them (on every rank alike, since all ranks compute the same step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx

from agent.runtime.acceptance import greedy_kept, verified_tokens
from agent.runtime.draft_cost import (
    MeasuredCost,
    RowDraft,
    accelerator_step_cost,
    choose_width,
    cpu_step_cost,
)
from agent.runtime.draft_model import DraftModel, Proposal, Want
from agent.runtime.drafting import MAX_DRAFT, PromptLookup
from agent.runtime.sampling import top_logprobs
from agent.runtime.sequences import SchedulerView, Sequence
from agent.runtime.verify import WIDTHS, step_width


@dataclass
class SpeculationStats:
    verify_steps: int = 0  # verification passes (steps where some row carried a draft)
    draft_passes: int = 0  # (row, pass) pairs that carried a draft
    drafted_tokens: int = 0
    accepted_tokens: int = 0  # drafted tokens kept (the model's own next token not counted)
    # Of them, those a draft model proposed (the rest: prompt lookup and predictions).
    model_draft_passes: int = 0
    model_drafted_tokens: int = 0
    model_accepted_tokens: int = 0


@dataclass(frozen=True)
class Draft:
    """One row's draft in a verify step: its tokens, the draft model's probabilities for a
    sampled one (None: deterministic, q one-hot), and where it came from."""

    tokens: list[int]
    q: mx.array | None = None
    source: Literal["lookup", "model"] = "lookup"


# A verify step computes `width` positions for every KV row, drafted or not, and a step of many
# rows is compute-bound (on a CPU at once, on a GPU from a few dozen rows): there drafts cost more
# than they save. Measured here: 150 schema-constrained requests, 48 at a time, took 238 s with
# drafting in every step and 114 s without. Batches up to this many rows draft.
MAX_VERIFY_ROWS = 8
# A draft model's per-token acceptance as the cost model sees it (its drafts are verified
# anyway; this only weighs how wide the step is).
MODEL_DRAFT_ACCEPTANCE = 0.5


class Speculator:
    """Drafts for the scheduler's sequences and runs the verification steps.

    `enabled`: prompt lookup for every sequence (a request's `prediction` drafts even when it
    is off); `draft_model`: drafts where the lookup has none. The engine must offer
    `compute.verify` for any of them.
    """

    def __init__(self, scheduler: SchedulerView, *, enabled: bool = True,
                 draft_model: DraftModel | None = None) -> None:
        self.scheduler = scheduler
        self.supported = callable(getattr(scheduler.compute, "verify", None))
        self.enabled = enabled
        self.draft_model = draft_model if self.supported else None
        self.stats = SpeculationStats()
        # What a step of (rows, width) costs here (`draft_cost.py`): the scheduler's own step
        # times where it has them, the prior (in one-row plain steps) until then.
        prior = cpu_step_cost if mx.default_device() == mx.cpu else accelerator_step_cost
        self.costs = MeasuredCost(prior)
        self.last_width = 1  # the width of the verify step `try_verify` ran last

    def drafter_for(self, prompt: list[int], prediction: list[int] | None
                    ) -> PromptLookup | None:
        """A new sequence's drafter, or None when it will not draft (nor will the draft
        model, which needs the drafter's view of the sequence's tokens)."""
        if not self.supported or not (self.enabled or prediction or self.draft_model):
            return None
        return PromptLookup(prediction=list(prediction or []), lookup_prompt=self.enabled)

    # ---- which step runs ----------------------------------------------------------------
    def _sync(self, seq: Sequence) -> PromptLookup | None:
        drafter: PromptLookup | None = seq.drafter
        if drafter is not None:
            known = len(drafter.tokens)
            prompt, history = seq.prompt, seq.sampler.history
            if known < len(prompt):
                drafter.extend(prompt[known:])
                known = len(prompt)
            drafter.extend(history[known - len(prompt):])
        return drafter

    def wants_step(self, decoding: list[Sequence]) -> bool:
        """Whether the next step should be built after this one's tokens are known (so it can
        carry drafts) rather than queued ahead: some row has drafted lately and may again."""
        if self.scheduler.kv.rows > MAX_VERIFY_ROWS:
            return False
        model = self.draft_model
        lookup = {s.request.id: Draft(d) for s in decoding if (d := self._draft(s))}
        if lookup and self._width(decoding, lookup) > 1:
            return True
        for seq in decoding:
            drafter = self._sync(seq)
            if (model is not None and drafter is not None and self._room(seq) > 0
                    and not model.paused(seq.request.id, len(drafter.tokens))):
                return True
        return False

    def _room(self, seq: Sequence) -> int:
        # The kept draft plus the model's next token must fit in max tokens and the context.
        return min(MAX_DRAFT, WIDTHS[-1] - 1, seq.max_tokens - seq.generated - 1,
                   self.scheduler.limits.context_length - seq.length - 2)

    def _draft(self, seq: Sequence) -> list[int]:
        drafter = self._sync(seq)
        if drafter is None:
            return []
        return self._constrained(seq, drafter.propose(self._room(seq), len(seq.prompt)))

    @staticmethod
    def _constrained(seq: Sequence, drafts: list[int]) -> list[int]:
        """The draft cut where the sequence's grammar (if any) stops allowing it."""
        constraint = seq.sampler.constraint
        if drafts and constraint is not None:
            drafts = drafts[:constraint.valid_prefix(drafts)]
        return drafts

    def _plan(self, decoding: list[Sequence]) -> dict[str, Draft]:
        """Every decoding row's draft: prompt lookup's (or the prediction's) where it has one,
        else the draft model's (one batched proposal for all of those rows)."""
        plan = {s.request.id: Draft(d) for s in decoding if (d := self._draft(s))}
        model = self.draft_model
        if model is None:
            return plan
        model.retain(set(self.scheduler.running))
        wants = []
        by_id = {}
        for seq in decoding:
            if seq.request.id in plan or seq.drafter is None:
                continue
            room = self._room(seq)
            if room <= 0:
                continue
            sampler = seq.sampler if not seq.sampler.params.greedy else None
            wants.append(Want(seq.request.id, seq.drafter.tokens, room, sampler))
            by_id[seq.request.id] = seq
        for seq_id, proposal in model.propose(wants).items():
            draft = self._model_draft(by_id[seq_id], proposal)
            if draft is not None:
                plan[seq_id] = draft
        return plan

    def _model_draft(self, seq: Sequence, proposal: Proposal) -> Draft | None:
        tokens = self._constrained(seq, proposal.tokens)
        if not tokens:
            return None
        q = proposal.q[:len(tokens)] if proposal.q is not None else None
        return Draft(tokens, q, "model")

    def try_verify(self, decoding: list[Sequence]) -> bool:
        """Run this step as a verification step when some row has a draft; False (nothing
        done) when none has, or the cache cannot take the wider step."""
        if not self.supported or self.scheduler.kv.rows > MAX_VERIFY_ROWS:
            return False
        plan = self._plan(decoding)
        if not plan:
            return False
        chosen = self._width(decoding, plan)
        if chosen <= 1:
            return False
        plan = {rid: _cut(d, chosen - 1) for rid, d in plan.items()}
        sched, kv = self.scheduler, self.scheduler.kv
        width = step_width(1 + max(len(d.tokens) for d in plan.values()))
        longest = max(s.length for s in sched.running.values())
        limit = kv.capacity_limit(kv.rows)
        if limit is not None and longest + width > limit:
            return False
        kv.ensure_capacity(longest + width)
        tokens = [[0] * width for _ in range(kv.rows)]
        starts = [0] * kv.rows
        # Rows still in prefill take harmless writes past their length, as in plain decoding.
        for seq in sched.running.values():
            starts[seq.row] = seq.length
        for seq in decoding:
            draft = plan.get(seq.request.id)
            row = [seq.next_token, *(draft.tokens if draft is not None else [])]
            tokens[seq.row][:len(row)] = row  # type: ignore[assignment]
        sched.compute.will_decode([s.row for s in decoding])
        logits = sched.compute.verify(tokens, starts)  # type: ignore[attr-defined]
        self._take(decoding, plan, logits)
        self.stats.verify_steps += 1
        self.last_width = width
        return True

    def record_step(self, kv_rows: int, width: int, seconds: float) -> None:
        """A local step's time (width 1: a plain decode step) for the measured costs; a
        pipeline's steps are not one node's (`_width` does not weigh them)."""
        if self._pipelined():
            return
        self.costs.record(kv_rows, width, seconds)

    def _pipelined(self) -> bool:
        compute = self.scheduler.compute
        return max(getattr(compute, "stages", 1), getattr(compute, "ring_stages", 1)) > 1

    def _width(self, decoding: list[Sequence], plan: dict[str, Draft]) -> int:
        """The verify step's width by the cost model (1: a plain step pays better). A draft
        model's or a prediction's draft is verified whenever there is one (the request or the
        node asked for it); prompt lookup's only where its expected yield pays. The costs are
        the measured ones when every decoding row is greedy (whose output no width changes);
        a sampling row's tokens depend on which drafts are verified, so there the prior alone
        decides, and a seeded request stays reproducible whatever the step times were."""
        if self._pipelined():
            # A pipeline step's time is mostly its trips between stages, which a wider step
            # does not lengthen: every draft goes in, whole (the cost model is one node's).
            return step_width(1 + max(len(d.tokens) for d in plan.values()))
        rows, forced = [], False
        for seq in decoding:
            draft = plan.get(seq.request.id)
            drafter = seq.drafter
            if draft is None:
                rows.append(RowDraft(0, 0.0))
            elif draft.source == "model" or drafter is None:
                forced = True
                rows.append(RowDraft(len(draft.tokens), MODEL_DRAFT_ACCEPTANCE))
            else:
                forced |= drafter.from_prediction > 0
                rows.append(RowDraft(len(draft.tokens), drafter.expected_acceptance()))
        greedy = all(s.sampler.params.greedy for s in decoding)
        return choose_width(self.scheduler.kv.rows, rows, WIDTHS, forced=forced,
                            cost=self.costs if greedy else self.costs.prior)

    # ---- a pipeline's verify micro-batches (ring.py) --------------------------------------
    def drafts_for(self, seqs: list[Sequence]) -> dict[str, Draft]:
        """The drafts of those of `seqs` that have one (request id -> draft: prompt lookup's,
        else the draft model's) for a step that the caller builds itself; empty when this
        engine cannot verify or the batch is too wide for drafts to pay."""
        if not self.supported or self.scheduler.kv.rows > MAX_VERIFY_ROWS:
            return {}
        return self._plan(seqs)

    def take_verified(self, seqs: list[Sequence], plan: dict[str, Draft], logits: mx.array,
                      rows_of: list[int]) -> None:
        """A verification step's outcome for `seqs` (each's length at the step's first
        position), whose logits are rows `rows_of` of `logits` (rows, width, vocab)."""
        self._take(seqs, plan, logits, rows_of)
        self.stats.verify_steps += 1

    # ---- what each row keeps ------------------------------------------------------------
    def _take(self, decoding: list[Sequence], plan: dict[str, Draft], logits: mx.array,
              rows_of: list[int] | None = None) -> None:
        sched = self.scheduler
        argmax = mx.argmax(logits, axis=-1)
        mx.eval(argmax, sched.kv.keys, sched.kv.values)
        ids = argmax.tolist()
        for i, seq in enumerate(decoding):
            row = seq.row if rows_of is None else rows_of[i]
            draft = plan.get(seq.request.id)
            drafts = draft.tokens if draft is not None else []
            start = seq.length
            if not seq.sampler.needs_logits:
                kept = greedy_kept(ids[row], drafts)
                picks = [(t, None) for t in drafts[:kept]] + [(ids[row][kept], None)]
                self._emit(seq, start, picks)
            else:
                kept = self._emit_sampled(seq, start, drafts, logits[row],
                                          draft.q if draft is not None else None)
            if draft is not None:
                self._count(seq, draft, kept)

    def _count(self, seq: Sequence, draft: Draft, kept: int) -> None:
        s, drafted = self.stats, len(draft.tokens)
        s.draft_passes += 1
        s.drafted_tokens += drafted
        s.accepted_tokens += kept
        if draft.source == "model":
            s.model_draft_passes += 1
            s.model_drafted_tokens += drafted
            s.model_accepted_tokens += kept
            if self.draft_model is not None:
                tokens = len(seq.prompt) + len(seq.sampler.history)
                self.draft_model.feedback(seq.request.id, drafted, kept, tokens)
        elif seq.drafter is not None:
            seq.drafter.feedback(drafted, kept)

    def _emit(self, seq: Sequence, start: int, picks: list[tuple[int, Any]]) -> None:
        sched = self.scheduler
        for i, (token, lp) in enumerate(picks):
            seq.length = start + i + 1  # the input before this token is in the cache now
            sched._accept(seq, token, lp)
            if seq.request.id not in sched.running:
                return

    def _emit_sampled(self, seq: Sequence, start: int, drafts: list[int], logits: mx.array,
                      q: mx.array | None = None) -> int:
        """Pick and emit a row's tokens position by position (each adjusted after the previous
        one is taken in); returns how many drafted tokens the acceptance rule kept."""
        sched = self.scheduler
        params = seq.request.sampling
        kept = 0
        for token, from_draft, i in verified_tokens(seq.sampler, logits, drafts, seq.prompt, q):
            kept += from_draft
            lp = None
            if params.logprobs:
                lp = top_logprobs(logits[i], mx.array(token), params.top_logprobs)
                mx.eval(lp)
            seq.length = start + i + 1
            sched._accept(seq, token, lp)
            if seq.request.id not in sched.running:
                break
        return kept

    def snapshot(self) -> dict[str, float]:
        s = self.stats
        return {"verify_steps_total": float(s.verify_steps),
                "draft_passes_total": float(s.draft_passes),
                "drafted_tokens_total": float(s.drafted_tokens),
                "accepted_draft_tokens_total": float(s.accepted_tokens),
                **({"draft_model_passes_total": float(s.model_draft_passes),
                    "draft_model_drafted_tokens_total": float(s.model_drafted_tokens),
                    "draft_model_accepted_tokens_total": float(s.model_accepted_tokens)}
                   if self.draft_model is not None else {})}


def _cut(draft: Draft, most: int) -> Draft:
    """The draft's first `most` tokens."""
    if len(draft.tokens) <= most:
        return draft
    q = draft.q[:most] if draft.q is not None else None
    return Draft(draft.tokens[:most], q, draft.source)


def prediction_usage(seq: Sequence) -> dict[str, int]:
    """A finished request's Predicted Outputs figures, as OpenAI reports them: prediction
    tokens that verification kept in the output, and the rest of the prediction."""
    prediction = seq.request.prediction_tokens
    if not prediction or seq.drafter is None:
        return {}
    accepted = min(seq.drafter.stats.predicted_accepted, len(prediction))
    return {"accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": len(prediction) - accepted}
