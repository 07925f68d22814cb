"""Draft-model drafting: a small model with the target's tokenizer proposes each sequence's next
tokens, which the target then verifies in one pass (`speculation.py`).

The draft keeps its own KV cache, one row per drafting sequence, in the same process as the
target's head (it is loaded with flock's decoder beside the target). A row's cache holds the
tokens `DraftRow.cached` names: before each proposal the row catches up with what the sequence
has become since (the kept drafts are already there; the target's correction and anything past
it are fed anew), then the draft decodes k tokens for every drafting row at once, one batched
step per token. Greedy sequences get the draft's argmax; sampled ones a draw from the draft's own
distribution q under the sequence's temperature / top-k / top-p / min-p, and q goes to the
acceptance rule (min(1, p/q), residual max(0, p - q)) so the output stays plain sampling's.
How far a row drafts adapts to what the target kept, and drafting pauses (longer each time)
where it keeps failing, as `drafting.PromptLookup` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from agent.runtime.compute import LocalCompute
from agent.runtime.drafting import (
    MAX_DRAFT,
    DraftPace,
    DraftStats,
)
from agent.runtime.kv import KvGeometry, KvSlots
from agent.runtime.sampling import RowSampler
from agent.runtime.verify import WIDTHS

CATCH_UP_CHUNK = 512  # most tokens one prefill call of a row's catch-up feeds


@dataclass(kw_only=True)
class DraftRow(DraftPace):
    """One sequence's place in the draft's cache and its drafting pace."""

    row: int
    cached: list[int] = field(default_factory=list)  # the tokens whose KV the row holds
    known: int = 0  # of them, how many the sequence had when the row last drafted

    def feedback(self, drafted: int, accepted: int, tokens: int) -> None:
        """The target kept `accepted` of `drafted`; `tokens`: the sequence's length now."""
        self.record(drafted, accepted, tokens)


@dataclass(frozen=True)
class Proposal:
    """A row's drafted tokens and, for a sampled row, the draft's probabilities at each
    (len(tokens), vocab); None for a greedy row (its drafts are compared, not sampled)."""

    tokens: list[int]
    q: mx.array | None


@dataclass(frozen=True)
class Want:
    """A sequence that may draft now: its id, every token it has (prompt, output, pending
    token), the most tokens it may draft, and its sampler (None: greedy)."""

    id: str
    tokens: list[int]
    limit: int
    sampler: RowSampler | None


class PacedRows:
    """Each drafting sequence's pace (`DraftRow`), fed back what the target kept: what a local
    `DraftModel` and a `draft_remote.RemoteDraft` share."""

    rows: dict[str, DraftRow]

    def feedback(self, seq_id: str, drafted: int, accepted: int, tokens: int) -> None:
        state = self.rows.get(seq_id)
        if state is not None:
            state.feedback(drafted, accepted, tokens)

    def stats(self, seq_id: str) -> DraftStats | None:
        state = self.rows.get(seq_id)
        return state.stats if state is not None else None


class DraftModel(PacedRows):
    """A loaded draft model and its cache. `vocab`: the target's vocabulary size (the draft's
    logits are cut or padded to it, so proposals are ids the target has)."""

    def __init__(self, decoder: Any, *, vocab: int, compiled: bool = True,
                 name: str = "draft", paced: bool = True) -> None:
        self.decoder = decoder
        # False: every want drafts its whole limit and never pauses (a remote draft server,
        # whose client paces each sequence itself, `draft_remote.py`).
        self.paced = paced
        self.name = name
        self.vocab = vocab
        geometry = KvGeometry(len(decoder.layers), decoder.local_kv_heads,
                              decoder.config.head_dim, decoder.dtype)
        self.kv = KvSlots(geometry)
        self.compute = LocalCompute(decoder, self.kv, compiled=compiled)
        self.rows: dict[str, DraftRow] = {}

    # ---- which sequences have rows --------------------------------------------------------
    def paused(self, seq_id: str, tokens: int) -> bool:
        state = self.rows.get(seq_id)
        return self.paced and state is not None and state.paused_at(tokens)

    def retain(self, live: set[str]) -> None:
        """Free the rows of sequences that are gone, and shrink the cache where it can."""
        for seq_id in [s for s in self.rows if s not in live]:
            self.kv.release(self.rows.pop(seq_id).row)
        if not self.rows:
            return
        mapping = self.kv.compact({s.row: len(s.cached) for s in self.rows.values()})
        for state in self.rows.values():
            state.row = mapping.get(state.row, state.row)

    # ---- proposing ------------------------------------------------------------------------
    def propose(self, wants: list[Want]) -> dict[str, Proposal]:
        """Drafts for every sequence in `wants` that is not paused (a row each, from one
        batched decode step per drafted position)."""
        context = self.decoder.config.max_position_embeddings
        wants = [w for w in wants if w.limit > 0 and not self.paused(w.id, len(w.tokens))
                 and len(w.tokens) + w.limit + WIDTHS[-1] < context]
        if not wants:
            return {}
        states = [self._row_for(w) for w in wants]
        counts = [min(w.limit, s.draft_len) if self.paced else w.limit
                  for w, s in zip(wants, states, strict=True)]
        # Room for every row's catch-up (rows not drafting take harmless writes past theirs).
        longest = max([len(w.tokens) for w in wants] + [len(s.cached) for s in self.rows.values()])
        self.kv.ensure_capacity(longest + MAX_DRAFT + WIDTHS[-1] + 1)
        last = self._catch_up(wants, states)
        picks: list[list[mx.array]] = [[] for _ in wants]
        probs: list[list[mx.array]] = [[] for _ in wants]
        for step in range(max(counts)):
            for i, (want, logits) in enumerate(zip(wants, last, strict=True)):
                logits = self._fit(logits)
                if want.sampler is None or step >= counts[i]:
                    picks[i].append(mx.argmax(logits).astype(mx.int32))
                    continue
                filtered = want.sampler.filtered(logits)
                probs[i].append(mx.softmax(filtered))
                picks[i].append(mx.random.categorical(filtered, key=want.sampler.next_key())
                                .astype(mx.int32))
            if step == max(counts) - 1:
                break
            tokens = [mx.array(0, dtype=mx.int32)] * self.kv.rows
            positions = [0] * self.kv.rows
            for state in self.rows.values():
                positions[state.row] = len(state.cached)
            for i, state in enumerate(states):
                tokens[state.row] = picks[i][-1]
                positions[state.row] = len(state.cached) + step
            logits_all = self.compute.decode(mx.stack(tokens), positions)
            last = [logits_all[state.row] for state in states]
        mx.eval([p for row in picks for p in row], [q for row in probs for q in row],
                self.kv.keys, self.kv.values)
        out: dict[str, Proposal] = {}
        for i, (want, state) in enumerate(zip(wants, states, strict=True)):
            ids = [int(p.item()) for p in picks[i]]
            state.cached.extend(ids[:-1])  # the last drafted token was never fed
            state.known = len(want.tokens)
            q = mx.stack(probs[i]) if want.sampler is not None and probs[i] else None
            out[want.id] = Proposal(ids[:counts[i]], q)
        return out

    def _row_for(self, want: Want) -> DraftRow:
        state = self.rows.get(want.id)
        if state is None:
            row = self.kv.acquire(want.id, len(want.tokens) + MAX_DRAFT + 1)
            state = self.rows[want.id] = DraftRow(row=row)
        # The cache holds what the sequence had at the last proposal and the drafts fed since:
        # it is valid up to where those drafts part from what the sequence kept.
        # At least the last token is fed again: its logits start the draft.
        valid = min(state.known, len(want.tokens) - 1)
        for cached, token in zip(state.cached[valid:], want.tokens[valid:], strict=False):
            if cached != token:
                break
            valid += 1
        del state.cached[min(valid, len(want.tokens) - 1):]
        return state

    def _catch_up(self, wants: list[Want], states: list[DraftRow]) -> list[mx.array]:
        """Feed each row what its cache lacks; the logits (vocab,) after each row's last token.
        Short catch-ups (the usual: the target's correction and a token or two) go in one
        batched multi-token step, long ones (a new prompt) as prefill chunks."""
        last: list[mx.array | None] = [None] * len(wants)
        short: list[int] = []
        for i, (want, state) in enumerate(zip(wants, states, strict=True)):
            missing = want.tokens[len(state.cached):]
            if len(missing) > WIDTHS[-1]:
                for at in range(0, len(missing), CATCH_UP_CHUNK):
                    chunk = missing[at:at + CATCH_UP_CHUNK]
                    logits = self.compute.prefill(state.row, len(state.cached), chunk)
                    state.cached.extend(chunk)
                last[i] = logits[0]
            else:
                short.append(i)
        if short:
            width = max(len(wants[i].tokens) - len(states[i].cached) for i in short)
            width = next(w for w in WIDTHS if w >= width)
            tokens = [[0] * width for _ in range(self.kv.rows)]
            starts = [0] * self.kv.rows
            for state in self.rows.values():
                starts[state.row] = len(state.cached)  # others take harmless writes past theirs
            fed = {}
            for i in short:
                state = states[i]
                missing = wants[i].tokens[len(state.cached):]
                tokens[state.row][:len(missing)] = missing
                fed[i] = len(missing)
            logits = self.compute.verify(tokens, starts)
            for i in short:
                state = states[i]
                last[i] = logits[state.row, fed[i] - 1]
                state.cached.extend(wants[i].tokens[len(state.cached):])
        assert all(x is not None for x in last)
        return last  # type: ignore[return-value]

    def _fit(self, logits: mx.array) -> mx.array:
        """The draft's logits over the target's vocabulary (ids past the draft's own: -inf)."""
        size = logits.shape[-1]
        if size == self.vocab:
            return logits
        if size > self.vocab:
            return logits[:self.vocab]
        return mx.concatenate([logits, mx.full((self.vocab - size,), -mx.inf, logits.dtype)])


def load_draft_model(draft_dir: Path, target_dir: Path, *, vocab: int, dtype: Any = None,
                     compiled: bool = True, name: str = "draft") -> DraftModel:
    """Check that the draft shares the target's tokenizer (ValueError naming the difference
    otherwise) and load it with flock's decoder."""
    from agent.models.draft_check import check_draft_model
    from agent.runtime.model import load_decoder

    check_draft_model(Path(draft_dir), Path(target_dir))
    decoder = load_decoder(Path(draft_dir), dtype=dtype)
    return DraftModel(decoder, vocab=vocab, compiled=compiled, name=name)
