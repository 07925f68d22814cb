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
index of equal maxima. That is one logit and one id a row back instead of the last stage's
share of the vocabulary's logits (24,576 a row on SmolLM2), and no (rows, vocab) join at the
head.

`head_vocab_rows` is the pure decision (tested without MLX); the rest slices and applies.
"""

from __future__ import annotations

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

    values, ids = _row_best(logits)
    return values, ids.astype(mx.uint32) + vocab_from


def _row_best(logits: mx.array) -> tuple[mx.array, mx.array]:
    """Per row, the best value and its index (the lowest of equal maxima): one argmax pass, the
    value read at its index."""
    import mlx.core as mx

    ids = mx.argmax(logits, axis=-1)
    return mx.take_along_axis(logits, ids[:, None], axis=-1)[:, 0], ids


def join_best(own: mx.array, tail_values: mx.array, tail_ids: mx.array) -> mx.array:
    """Each row's argmax over the whole vocabulary from the head's logits of rows [0, n) and the
    last stage's best value and id over the rest: the tail wins only when strictly greater, so a
    tie goes to the lower id, as `argmax` over the joined logits would give."""
    import mlx.core as mx

    own_best, own_ids = _row_best(own)
    return mx.where(tail_values > own_best, tail_ids.astype(mx.uint32), own_ids.astype(mx.uint32))


def decoder_bytes(dec: Decoder) -> tuple[float, float]:
    """(bytes of one layer on average, bytes of the vocabulary projection) of a stage that
    projects; what `head_vocab_rows` weighs."""
    from agent.runtime.model import arrays_of

    layers = sum(a.nbytes for a in arrays_of(dec.layers)) / max(1, len(dec.layers))
    return layers, float(sum(a.nbytes for a in arrays_of(dec.head)))
