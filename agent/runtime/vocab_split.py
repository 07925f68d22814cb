"""The vocabulary projection of a pipeline's decode steps, shared by its head and its last stage.

Projecting a decode row to logits reads the whole vocabulary matrix (on SmolLM2, 49152 x 576:
as much work as 8 of its 30 layers). When only the head does it, the head is the slow stage of
every micro-batched decode step, while prefill (one row projected per prompt) is not: no layer
split evens both. So the last stage, which holds the norm and head weights anyway (the memory
model counts the head on the last stage), projects the upper rows of the vocabulary for decode
steps and hands their logits back beside the hidden states; the head projects the lower rows
and joins the two. Every logit is the same dot product over the same inputs either way, so
greedy output does not change.

A greedy step (every row takes the argmax of its raw logits) needs less: the last stage hands
back, per row, only the best logit of its rows and that row's id (`tail_best`), and the head
compares them with the best of its own rows (`join_best`). A tie goes to the lower id, the head's
(its rows come first), so the pick is `argmax` over the whole vocabulary, which takes the lowest
index of equal maxima. At 8 rows of SmolLM2 that is 4 bytes a row back instead of 98 KB, and no
(rows, vocab) join at the head.

Bytes are not the whole of a stage's time: the head also samples, detokenizes and schedules
between its steps. So the boundary then moves with what the ends measure (`VocabBalance`): in a
pipeline whose stages are all busy the faster end waits for the slower one, so each decode step
the head notes how long it waited for the step to come back and how long the last stage waited
for it, and every `REBALANCE_STEPS` steps moves the boundary by whole quanta towards the end that
waited more, within `WINDOW` of the vocabulary either side of where `head_vocab_rows` put it (the
last stage keeps the rows of the whole window, so it can take any boundary in it).

`head_vocab_rows` and `VocabBalance` are the pure decisions (tested without MLX); the rest slices
and applies.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mlx.core as mx

    from agent.runtime.model import Decoder, Linear

# Each end projects at least this many vocabulary rows or none: below, a matmul is mostly call
# overhead.
MIN_ROWS = 64


def head_vocab_rows(vocab: int, head_layers: int, last_layers: int, layer_bytes: float,
                    projection_bytes: float) -> int:
    """How many vocabulary rows (from row 0) the head projects in decode; the last stage projects
    the rest. The split evens the two ends' decode work: layers cost `layer_bytes` each and the
    whole projection `projection_bytes` (decode streams every weight once per step, so bytes
    are the measure of work). `vocab` means the head projects everything (no split)."""
    if vocab <= 0 or projection_bytes <= 0 or layer_bytes <= 0:
        return vocab
    # head: h * L + x * P == last: l * L + (1 - x) * P
    share = ((last_layers - head_layers) * layer_bytes + projection_bytes) / (2 * projection_bytes)
    # Each end projects at least MIN_ROWS rows or none (a tiny matmul is all call overhead).
    rows = max(MIN_ROWS, round(min(1.0, max(0.0, share)) * vocab))
    return vocab if vocab - rows < MIN_ROWS else rows


# The boundary moves within this share of the vocabulary either side of its first place, in
# quanta of 1 / QUANTA of it, decided every REBALANCE_STEPS decode steps, at most MAX_MOVES
# quanta at a time.
WINDOW = 1 / 8
QUANTA = 256
REBALANCE_STEPS = 16
MAX_MOVES = 4


class VocabBalance:
    """Where decode's vocabulary boundary is: the head projects rows [0, rows), the last stage the
    rest. `lo` is the lowest the boundary can go (the last stage keeps rows [lo, vocab))."""

    def __init__(self, vocab: int, rows: int) -> None:
        self.rows = rows
        self.quantum = max(1, vocab // QUANTA)
        reach = round(vocab * WINDOW) // self.quantum * self.quantum
        self.lo = max(MIN_ROWS, rows - reach)
        self.hi = min(vocab - MIN_ROWS, rows + reach)
        self._reset()

    def _reset(self) -> None:
        self.gaps: list[float] = []  # the last stage's wait less the head's, a step
        self.per_row: list[float] = []  # the head's projection seconds a vocabulary row

    def note(self, head_wait_s: float, last_wait_s: float, project_s: float, rows: int) -> None:
        """One decode step back at the head while others were in flight: how long the head
        waited for it, how long the last stage waited for it, and the seconds the head took
        projecting its `rows` vocabulary rows (the step's boundary). Medians over the window,
        so a step after an idle spell (a long wait) does not swing the boundary."""
        self.gaps.append(last_wait_s - head_wait_s)
        self.per_row.append(project_s / max(1, rows))
        if len(self.gaps) >= REBALANCE_STEPS:
            self.rows = rebalanced_rows(self.rows, 0.0, statistics.median(self.gaps),
                                        statistics.median(self.per_row), self.lo, self.hi,
                                        self.quantum)
            self._reset()


def rebalanced_rows(rows: int, head_wait_s: float, last_wait_s: float, s_per_row: float,
                    lo: int, hi: int, quantum: int) -> int:
    """The head's vocabulary rows after a window of steps in which, on average, the head waited
    `head_wait_s` for a step to come back, the last stage `last_wait_s` for a step to arrive,
    and the head projected a row in `s_per_row`. Moving k rows to the last stage takes k rows'
    time from the head and gives it to the last stage, so the gap between their waits closes
    by twice that: move the whole quanta that close it without overshooting (a gap under two
    quanta's worth stays, so the boundary settles rather than swinging)."""
    if s_per_row <= 0:
        return rows
    moves = int((last_wait_s - head_wait_s) / (2 * s_per_row * quantum))  # towards zero
    moves = max(-MAX_MOVES, min(MAX_MOVES, moves))
    return max(lo, min(hi, rows - moves * quantum))


def rows_of(proj: Linear, start: int, stop: int, *, copy: bool = True) -> Linear | None:
    """The projection's output rows [start, stop), or None for a kind this does not know how to
    slice. `copy`: their own buffers, so the whole matrix can be freed; else views of it (the
    head keeps the whole matrix anyway when it doubles as the embedding)."""
    import mlx.core as mx

    from agent.runtime.model import Dense, Quantized

    def part(a: mx.array | None) -> mx.array | None:
        if a is None:
            return None
        out = mx.array(a[start:stop]) if copy else a[start:stop]
        mx.eval(out)
        return out

    if isinstance(proj, Dense):
        weight = part(proj.weight)
        assert weight is not None
        return Dense(weight, part(proj.bias))
    if isinstance(proj, Quantized):
        weight, scales = part(proj.weight), part(proj.scales)
        assert weight is not None and scales is not None
        return Quantized(weight, scales, part(proj.biases), proj.group_size, proj.bits,
                         proj.mode, part(proj.bias))
    return None


def describe(proj: Linear | None) -> str:
    """What a projection is, for the two ends to check they hold the same matrix alike (a mixed
    pipeline may keep it quantized at one end and dequantized at the other: then no split)."""
    from agent.runtime.model import Quantized

    if proj is None:
        return ""
    kind = f"{type(proj).__name__}:{proj.weight.dtype}:{list(proj.weight.shape)}"
    return kind + (f":{proj.params}" if isinstance(proj, Quantized) else "")


def project_rows(dec: Decoder, proj: Linear, h: mx.array) -> mx.array:
    """Logits of `proj`'s rows for hidden states (rows, hidden), as `project_logits` computes
    them for the whole vocabulary: the same norm and projection (a decode's few rows take the
    extension's bandwidth-bound kernel where it is loaded; through MLX's matmul each call
    packed the half-vocabulary matrix first, ~40% dearer), so each logit is the same sum."""
    from agent.runtime import kernels
    from agent.runtime.step import projection

    assert dec.norm is not None
    return projection(kernels.rms_norm(h, dec.norm, dec.config.rms_norm_eps), proj)


def tail_best(logits: mx.array, vocab_from: int) -> tuple[mx.array, mx.array]:
    """The last stage's greedy share: per row of its logits (rows, vocab - vocab_from), the best
    value and its vocabulary id (the lowest of equal maxima)."""
    import mlx.core as mx

    ids = mx.argmax(logits, axis=-1)  # one pass; the value is read at its index
    values = mx.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]
    return values, ids.astype(mx.uint32) + vocab_from


def join_best(own: mx.array, tail_values: mx.array, tail_ids: mx.array) -> mx.array:
    """Each row's argmax over the whole vocabulary from the head's logits of rows [0, n) and the
    last stage's best value and id over the rest: the tail wins only when strictly greater, so a
    tie goes to the lower id, as `argmax` over the joined logits would give."""
    import mlx.core as mx

    own_ids = mx.argmax(own, axis=-1)
    own_best = mx.take_along_axis(own, own_ids[:, None], axis=-1)[:, 0]
    return mx.where(tail_values > own_best, tail_ids.astype(mx.uint32), own_ids.astype(mx.uint32))


def decoder_bytes(dec: Decoder) -> tuple[float, float]:
    """(bytes of one layer on average, bytes of the vocabulary projection) of a stage that
    projects; what `head_vocab_rows` weighs."""
    from agent.runtime.model import arrays_of

    layers = sum(a.nbytes for a in arrays_of(dec.layers)) / max(1, len(dec.layers))
    return layers, float(sum(a.nbytes for a in arrays_of(dec.head)))
