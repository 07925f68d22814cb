"""The decoder's projection matmul (`linear`): dense or quantized weights times activations,
in the operand order that keeps a few-row batch fast on CPU BLAS.

A decode step of R rows multiplies an (R, in) activation by each (out, in) weight. Written as
`x @ W.T`, BLAS sees a GEMM with M = R rows; OpenBLAS splits such a short, wide product across
its threads in a way that stalls badly when the machine is busy: measured here (2 threads,
load ~10 on 2 cores) a (8, 1024) x (1024, 1536) product took 64-95 ms for every R from 2 to 16,
against 0.2 ms at R = 1 (which the BLAS shim answers with sgemv). The same product as
`(W @ x.T).T`, a GEMM with M = out and N = R, took 0.5-4 ms (1.1 ms at R = 8), and the LM head
(32,000 rows) 126 ms against 182 ms. The products are the same sums of the same terms; only
the order of the float additions inside BLAS may differ (float32 rounding, not a different
result in kind). One row, and prompts of more than `SWAPPED_MAX_ROWS` tokens, keep `x @ W.T`:
there sgemv and blocked GEMM are already the fast forms.
"""

from __future__ import annotations

import mlx.core as mx

from agent.runtime.model import Dense, Linear

# The most rows computed as (W @ x.T).T: decode batches and verify widths (8 rows x 13
# positions = 104), not long prompts. Quiet, the two orders time alike from 40 to 128 rows.
SWAPPED_MAX_ROWS = 128


def linear(x: mx.array, proj: Linear) -> mx.array:
    """x (..., in) times the projection: (..., out), its bias added."""
    if isinstance(proj, Dense):
        rows = x.size // x.shape[-1] if x.shape[-1] else 0
        if 2 <= rows <= SWAPPED_MAX_ROWS and mx.default_device() == mx.cpu:
            flat = x.reshape(rows, x.shape[-1])
            out = (proj.weight @ flat.T).T.reshape(*x.shape[:-1], proj.weight.shape[0])
            return out + proj.bias if proj.bias is not None else out
        if proj.bias is not None:
            return mx.addmm(proj.bias, x, proj.weight.T)
        return x @ proj.weight.T
    # As mlx-lm's QuantizedLinear computes it, so kept checkpoints give its logits.
    out = mx.quantized_matmul(x, proj.weight, proj.scales, proj.biases, transpose=True,
                              group_size=proj.group_size, bits=proj.bits, mode=proj.mode)
    return out + proj.bias if proj.bias is not None else out
