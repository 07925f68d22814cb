"""Prompt-lookup drafting: guess a sequence's next tokens from where its recent tokens occurred
before, so one verification pass can yield several tokens.

Edits of code or documents, retrieval answers and structured output repeat long spans of the
prompt (or of a predicted output, OpenAI's `prediction`). A `PromptLookup` indexes every n-gram
of a sequence's tokens as they arrive and proposes the continuation of the longest n-gram that
ends the text so far. How far it guesses adapts to how much of its recent guesses the model
accepted, and it stops guessing for a while (longer each time) where guesses keep failing, so
free-form text pays almost nothing. Pure Python: no MLX, testable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.runtime.draft_cost import DECAY, acceptance, match_prior

MIN_NGRAM = 2  # a single repeated token predicts little; two already find copied spans
MAX_NGRAM = 4
FIRST_DRAFT = 4  # tokens proposed before any acceptance has been seen
MAX_DRAFT = 12
MISSES_TO_PAUSE = 3  # consecutive drafts with nothing accepted before drafting pauses
FIRST_PAUSE = 16  # steps drafting stays off the first time; doubles each time after
MAX_PAUSE = 512
MATCH_CAP = 32  # how far back a lookup match is measured (its length sets the prior)
PREDICTION_PRIOR = 0.9  # per-token acceptance expected of a request's own prediction


@dataclass
class DraftStats:
    """What a sequence's drafts did: passes that carried a draft, tokens drafted, accepted."""

    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    predicted_accepted: int = 0  # of them, tokens that came from the request's prediction
    predicted_rejected: int = 0


@dataclass
class DraftPace:
    """How far a sequence drafts, and when it stops for a while: the next draft's length follows
    what the last one kept (`next_draft_len`); after MISSES_TO_PAUSE drafts in a row kept nothing,
    drafting pauses for `pause_len` tokens (counted in tokens, not steps, so a pause runs out
    however the steps that produce them are built), doubling each time up to MAX_PAUSE and back
    to FIRST_PAUSE once a draft is kept whole. Shared by prompt lookup and the draft models."""

    draft_len: int = FIRST_DRAFT
    max_draft: int = MAX_DRAFT
    stats: DraftStats = field(default_factory=DraftStats)
    misses: int = 0
    resume_at: int = 0  # drafting pauses until the sequence has this many tokens
    pause_len: int = FIRST_PAUSE
    # Recent verification outcomes, decayed: drafted tokens kept, and drafts cut short.
    kept_recent: float = 0.0
    failed_recent: float = 0.0

    def acceptance(self, prior: float) -> float:
        """Estimated chance that the next drafted token is kept (given the ones before it)."""
        return acceptance(self.kept_recent, self.failed_recent, prior)

    def paused_at(self, tokens: int) -> bool:
        return tokens < self.resume_at

    def record(self, drafted: int, accepted: int, tokens: int) -> None:
        """Verification kept `accepted` of `drafted` tokens; `tokens`: the sequence's length."""
        if drafted <= 0:
            return
        s = self.stats
        s.passes += 1
        s.drafted += drafted
        s.accepted += accepted
        self.kept_recent = DECAY * self.kept_recent + accepted
        self.failed_recent = DECAY * self.failed_recent + (accepted < drafted)
        self.draft_len = next_draft_len(self.draft_len, drafted, accepted, self.max_draft)
        if accepted == 0:
            self.misses += 1
            if self.misses >= MISSES_TO_PAUSE:
                self.resume_at = tokens + self.pause_len
                self.pause_len = min(2 * self.pause_len, MAX_PAUSE)
                self.misses = 0
        else:
            self.misses = 0
            if accepted == drafted:
                self.pause_len = FIRST_PAUSE


@dataclass
class PromptLookup(DraftPace):
    """One sequence's drafter over `prompt + output` (and an optional predicted output).

    `extend(tokens)` feeds it the sequence's tokens as they become known (prompt first);
    `propose(limit, output_start)` returns up to `limit` guessed next tokens (maybe none);
    `feedback(drafted, accepted)` reports what verification kept, which sizes and pauses later
    drafts. `lookup_prompt` False: only the prediction drafts.
    """

    prediction: list[int] = field(default_factory=list)
    lookup_prompt: bool = True
    min_ngram: int = MIN_NGRAM
    max_ngram: int = MAX_NGRAM
    tokens: list[int] = field(default_factory=list)
    # n-gram -> where its latest earlier occurrence ends (the index its continuation starts at)
    _index: dict[tuple[int, ...], int] = field(default_factory=dict, repr=False)
    _predicted: dict[tuple[int, ...], int] = field(default_factory=dict, repr=False)
    _from_prediction: int = 0  # leading tokens of the last proposal that came from `prediction`
    match: int = 0  # tokens of the text so far that the last lookup's source matched

    @property
    def from_prediction(self) -> int:
        """Leading tokens of the last proposal that came from the request's prediction."""
        return self._from_prediction

    def prior(self) -> float:
        """Per-token acceptance expected of the last proposal before any outcome is known."""
        return PREDICTION_PRIOR if self._from_prediction else match_prior(self.match)

    def expected_acceptance(self) -> float:
        """The last proposal's per-token acceptance: its prior, moved by recent outcomes."""
        return self.acceptance(self.prior())

    def __post_init__(self) -> None:
        for end in range(1, len(self.prediction)):
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._predicted[tuple(self.prediction[end - n:end])] = end

    def extend(self, tokens: list[int]) -> None:
        if not self.lookup_prompt:
            self.tokens.extend(tokens)
            return
        for token in tokens:
            end = len(self.tokens)
            # Every n-gram that ends just before this token now has a continuation: `token`.
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._index[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    @property
    def paused(self) -> bool:
        return self.paused_at(len(self.tokens))

    def could_draft(self, output_start: int) -> bool:
        """Whether `propose` would find something now (no bookkeeping)."""
        return not self.paused and bool(self._lookup(1, output_start)[0])

    def propose(self, limit: int, output_start: int) -> list[int]:
        """Up to `limit` tokens that may follow the text so far. `output_start`: where the
        output begins in `tokens` (a prediction is the expected output from there on)."""
        self._from_prediction = 0
        if limit <= 0 or self.paused:
            return []
        draft, predicted = self._lookup(min(limit, self.draft_len), output_start)
        if predicted:
            self._from_prediction = len(draft)
        return draft

    def _lookup(self, want: int, output_start: int) -> tuple[list[int], bool]:
        if self.prediction:
            draft = self._from_predicted(want, output_start)
            if draft:
                return draft, True
        self.match = 0
        if not self.lookup_prompt:
            return [], False
        end = len(self.tokens)
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            at = self._index.get(tuple(self.tokens[end - n:end]))
            if at is not None:
                self.match = match_length(self.tokens, at, n, MATCH_CAP)
                return continuation(self.tokens, at, want), False
        return [], False

    def _from_predicted(self, want: int, output_start: int) -> list[int]:
        produced = len(self.tokens) - output_start
        if produced <= 0:
            return self.prediction[:want]
        # Still following the prediction verbatim: continue it where the output is.
        if self.tokens[output_start:] == self.prediction[:produced]:
            return self.prediction[produced:produced + want]
        end = len(self.tokens)
        for n in range(min(self.max_ngram, produced), self.min_ngram - 1, -1):
            at = self._predicted.get(tuple(self.tokens[end - n:end]))
            if at is not None:
                return self.prediction[at:at + want]
        return []

    def feedback(self, drafted: int, accepted: int) -> None:
        """Verification kept `accepted` of the `drafted` tokens last proposed."""
        if drafted <= 0:
            return
        from_prediction = min(self._from_prediction, drafted)
        self.stats.predicted_accepted += min(accepted, from_prediction)
        self.stats.predicted_rejected += from_prediction - min(accepted, from_prediction)
        self.record(drafted, accepted, len(self.tokens))


def next_draft_len(current: int, drafted: int, accepted: int, most: int) -> int:
    """Draft length after a verification: longer when the whole draft was kept (copied spans
    tend to go on), one past what was kept otherwise (a cheaper miss next time)."""
    if accepted >= drafted:
        return min(most, max(current, drafted) + 2)
    return max(1, min(current, accepted + 1))


def continuation(tokens: list[int], at: int, want: int) -> list[int]:
    """`want` tokens from `tokens[at]` on; past the end the draft continues with itself, so a
    repeating span (a loop, a list's pattern) is drafted whole, not one token at a time."""
    end = len(tokens)
    draft: list[int] = []
    for i in range(want):
        j = at + i
        draft.append(tokens[j] if j < end else draft[j - end])
    return draft


def match_length(tokens: list[int], at: int, n: int, cap: int) -> int:
    """How many tokens before `at` equal the last ones of `tokens` (at least the `n` of the
    n-gram found there), up to `cap`: a long match is a copied span, a short one may be chance."""
    end = len(tokens)
    m = n
    while m < cap and at - m - 1 >= 0 and tokens[at - m - 1] == tokens[end - m - 1]:
        m += 1
    return m
