"""The mixture-of-experts MLP of flock's decoder: route each token to its top-k experts and
run them on MLX's gather matmuls, as mlx-lm's SwitchGLU does (a decode step's few rows of dense
float32 experts on one kernel instead, `kernels.moe_experts`, where the extension is loaded).

The experts are stacked Linears (a leading expert axis, see `SparseMoe` in model.py); dense ones
go through `mx.gather_mm`, quantized ones through `mx.gather_qmm` at their stored bits, so a kept
4-bit checkpoint is never widened. Routing follows each family's mlx-lm class operation for
operation (which top-k form, softmax before or after it, renormalisation), so logits match
mlx-lm's on the same weights. Everything is array ops without host syncs: the compiled decode
step traces it like the dense MLP.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from agent.runtime import gpt_oss, kernels
from agent.runtime.model import Dense, FusedGateUp, Linear, Mlp, SparseMoe

# The (token, expert) pairs are sorted by expert whenever more than one token is routed, so
# the pairs of one expert are computed one after the other and its weights are read from memory
# once, then from cache (CPU: 32 pairs over 8 experts, adjacent, took 4.6 ms against 15.7 ms
# interleaved; one expert is 4 MB here and L3 holds it). mlx-lm sorts only from 64 pairs (for
# Metal); the products are the same either way, only their order changes.
SORT_AT = 2


def route(moe: SparseMoe, logits: mx.array) -> tuple[mx.array, mx.array]:
    """(expert indices, their weights), each (..., top_k), from the router's logits."""
    k = moe.top_k
    if moe.routing == "topk_softmax":  # mixtral, gpt_oss: the top k logits, then a softmax
        inds = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k] if moe.top_from_negated \
            else mx.argpartition(logits, kth=-k, axis=-1)[..., -k:]
        return inds, mx.softmax(mx.take_along_axis(logits, inds, axis=-1), axis=-1,
                                precise=True)
    gates = mx.softmax(logits, axis=-1, precise=True)
    if moe.top_from_negated:  # qwen2_moe
        inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
    else:  # qwen3_moe
        inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]
    scores = mx.take_along_axis(gates, inds, axis=-1)
    if moe.norm_topk:
        scores = scores / mx.sum(scores, axis=-1, keepdims=True)
    return inds, scores


def _gather(x: mx.array, proj: Linear, inds: mx.array, sort: bool,
            transposed: bool = False) -> mx.array:
    """x (..., 1, in) times the selected experts' matrices: (..., 1, out). A dense `proj` is
    (experts, out, in), or (experts, in, out) when `transposed` (the down projections)."""
    if isinstance(proj, Dense):
        weight = proj.weight if transposed else proj.weight.swapaxes(-1, -2)
        out = mx.gather_mm(x, weight, rhs_indices=inds, sorted_indices=sort)
    else:
        out = mx.gather_qmm(x, proj.weight, proj.scales, proj.biases, rhs_indices=inds,
                            transpose=True, group_size=proj.group_size, bits=proj.bits,
                            mode=proj.mode, sorted_indices=sort)
    if proj.bias is not None:
        out = out + mx.expand_dims(proj.bias[inds], -2)
    return out


def experts(moe: SparseMoe, x: mx.array, inds: mx.array) -> mx.array:
    """Each token's top-k experts' SwiGLU outputs: x (..., hidden) -> (..., top_k, hidden)."""
    x = mx.expand_dims(x, (-2, -3))
    sort = inds.size // inds.shape[-1] >= SORT_AT
    idx, inv_order = inds, None
    if sort:
        # The pairs in expert order (mlx-lm's _gather_sort), put back after.
        k = inds.shape[-1]
        flat = inds.flatten()
        order = mx.argsort(flat)
        inv_order = mx.argsort(order)
        x, idx = x.flatten(0, -3)[order // k], flat[order]
    if isinstance(moe.gate_up, FusedGateUp) and moe.activation == "swiglu":
        # One kernel where flockops is loaded (as the dense MLP), else MLX's split and products.
        act = kernels.swiglu(_gather(x, moe.gate_up.gate_up, idx, sort))
    else:
        if isinstance(moe.gate_up, FusedGateUp):
            gate, up = mx.split(_gather(x, moe.gate_up.gate_up, idx, sort), 2, axis=-1)
        else:
            up = _gather(x, moe.gate_up.up, idx, sort)
            gate = _gather(x, moe.gate_up.gate, idx, sort)
        act = gpt_oss.swiglu_oai(gate, up) if moe.activation == "swiglu_oai" else \
            gate * mx.sigmoid(gate) * up
    out = _gather(act, moe.down, idx, sort, transposed=True)  # model.experts_down's layout
    if inv_order is not None:
        out = mx.unflatten(out[inv_order], 0, inds.shape)
    return out.squeeze(-2)


def _kernel_experts(moe: SparseMoe, x: mx.array, inds: mx.array, scores: mx.array
                    ) -> mx.array | None:
    """The weighted sum of the selected experts' outputs in one kernel (`kernels.moe_experts`:
    a decode's few rows, dense float32 SwiGLU experts without biases), else None."""
    gate_up, down = moe.gate_up, moe.down
    if moe.activation != "swiglu" or not isinstance(gate_up, FusedGateUp) or \
            not isinstance(gate_up.gate_up, Dense) or not isinstance(down, Dense) or \
            gate_up.gate_up.bias is not None or down.bias is not None:
        return None
    return kernels.moe_experts(x, inds, scores, gate_up.gate_up.weight, down.weight)


def sparse_mlp(moe: SparseMoe, x: mx.array, linear: Callable[[mx.array, Linear], mx.array],
               dense_mlp: Callable[[Mlp, mx.array], mx.array]) -> mx.array:
    """The layer's MLP output for x (..., hidden), before any tensor-parallel sum: under tensor
    parallel each rank holds a slice of every expert's width (and of the shared expert's), so
    its output is a partial sum, like a dense MLP's; the router is whole on every rank."""
    inds, scores = route(moe, linear(x, moe.router))
    y = _kernel_experts(moe, x, inds, scores)
    if y is None:
        y = experts(moe, x, inds)
        y = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
    if moe.shared is not None and moe.shared_gate is not None:
        y = y + mx.sigmoid(linear(x, moe.shared_gate)) * dense_mlp(moe.shared, x)
    return y
