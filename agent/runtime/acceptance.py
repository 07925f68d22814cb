"""The speculative acceptance rule: which drafted tokens a verification pass keeps, so that the
output is distributed exactly as plain sampling's (and is plain sampling's argmax when greedy).

A draft from prompt lookup (or a prediction) is deterministic: its proposal distribution q is
one-hot on the drafted token d. The standard rule accepts d with probability min(1, p(d)/q(d)) =
p(d), where p is the row's own sampling distribution at that position (penalties, grammar mask,
temperature, top-k/top-p/min-p included); on rejection it samples from the normalised residual
max(0, p - q), which is p without d. A draft model samples d from its own distribution q
(not one-hot): d is kept with probability min(1, p(d)/q(d)), and a rejection samples from the
normalised max(0, p - q); either way each output token is distributed as p. Greedy rows accept
d exactly when it is the argmax. Each draw uses the row's own key, so seeded runs are
reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx

from agent.runtime.sampling import RowSampler


def accept_drafted(probs: mx.array, draft: int, uniform: float) -> bool:
    """The rule for a one-hot proposal: keep `draft` when `uniform` (in [0, 1)) < p(draft)."""
    return uniform < float(probs[draft].item())


def accept_sampled(probs: mx.array, q: mx.array, draft: int, uniform: float) -> bool:
    """The rule for a proposal drawn from `q`: keep `draft` with probability
    min(1, p(draft) / q(draft)), i.e. when uniform * q(draft) < p(draft)."""
    return uniform * float(q[draft].item()) < float(probs[draft].item())


def residual_from(probs: mx.array, q: mx.array) -> mx.array:
    """Logits of the normalised residual max(0, p - q) (p itself where nothing is left, which
    only rounding can cause: a rejection needs some p(x) > q(x))."""
    residual = mx.maximum(probs - q, 0.0)
    if float(residual.sum().item()) <= 0.0:
        residual = probs
    return mx.log(residual)


def residual_logits(logits: mx.array, draft: int) -> mx.array:
    """Logits of the normalised residual max(0, p - onehot(draft)): p with `draft` removed."""
    return mx.where(mx.arange(logits.shape[-1]) == draft, -mx.inf, logits)


def pick_after_draft(sampler: RowSampler, row_logits: mx.array, draft: int | None,
                     q: mx.array | None = None) -> tuple[int, bool]:
    """The token at one position of a verification pass, from the row's adjusted logits:
    (token, whether it is the drafted one). `draft` None: the position after a fully accepted
    draft (or no draft): sampled as plain decoding samples. `q`: the probabilities (vocab,) the
    draft was drawn from; None for a deterministic draft (one-hot q)."""
    if sampler.params.greedy:
        token = int(mx.argmax(row_logits).item())
        return token, token == draft
    filtered = sampler.filtered(row_logits)
    if draft is None:
        return int(mx.random.categorical(filtered, key=sampler.next_key()).item()), False
    key = sampler.next_key()
    if key is None:
        u_key = draw_key = None
    else:
        u_key, draw_key = mx.random.split(key)
    probs = mx.softmax(filtered)
    uniform = float(mx.random.uniform(key=u_key).item())
    if q is None:
        if accept_drafted(probs, draft, uniform):
            return draft, True
        residual = residual_logits(filtered, draft)
    else:
        if accept_sampled(probs, q, draft, uniform):
            return draft, True
        residual = residual_from(probs, q)
    return int(mx.random.categorical(residual, key=draw_key).item()), False


def verified_tokens(sampler: RowSampler, logits: mx.array, drafts: list[int],
                    prompt: list[int], q: mx.array | None = None
                    ) -> Iterator[tuple[int, bool, int]]:
    """The tokens one row's verification pass yields, in order: (token, drafted and kept,
    position). `logits` (len(drafts) + 1, vocab): position i predicts the token after input i
    (the row's pending token, then its drafts). Stops after the first token that is not the
    draft (the model's correction) or after the bonus token past a fully kept draft. `q`
    (len(drafts), vocab): the draft model's probabilities at each drafted position; None for
    deterministic drafts (prompt lookup, a prediction).

    Lazy: each position is adjusted only when asked for, after the caller has taken the
    previous token into the sampler (history for penalties, the grammar's state), so every
    position sees exactly the state plain decoding would give it. The caller stops early when
    the sequence ends (a stop string, max tokens, EOS inside the draft)."""
    for i in range(len(drafts) + 1):
        draft = drafts[i] if i < len(drafts) else None
        row = sampler.adjust(logits[i], prompt)
        token, kept = pick_after_draft(sampler, row, draft,
                                       None if q is None or draft is None else q[i])
        yield token, kept, i
        if not kept:
            return


def greedy_kept(argmax: list[int], drafts: list[int]) -> int:
    """How many drafted tokens plain greedy decoding reproduces, given the verification pass's
    argmax at each position (argmax[i] follows input i)."""
    kept = 0
    for predicted, drafted in zip(argmax, drafts, strict=False):
        if predicted != drafted:
            break
        kept += 1
    return kept
