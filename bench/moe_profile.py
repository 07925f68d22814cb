"""Where one-stream decode of bench.models' random qwen3_moe goes, flock's decoder beside
mlx-lm's, timed part by part in one process (each case takes its turn every round, so load
that comes and goes on a shared machine falls on all alike).

Run from the repository root: `python -m bench.moe_profile [--rounds N]`. The process gets the
runners' environment (the flockblas shim with its sgemv path, the OpenBLAS threads).

- `flock_step_ms`: the compiled decode step at one row (KV written in place, as the runner
  does); `flock_no_moe_step_ms` the same with every MoE block replaced by a scaling, and
  `flock_no_head_step_ms` without the head projection, so `flock_moe_ms` and `flock_head_ms`
  are the differences and `flock_rest_ms` (embedding, attention, norms) what is left.
- `mlxlm_step_ms`, `mlxlm_no_moe_step_ms`, `mlxlm_moe_ms`: mlx-lm's model call alike.
- `flock_gather_step_ms`: flock's step with the experts on the gather matmuls (as without the
  experts kernel, `kernels.moe_experts`).
- `flock_moe8_route_ms`, `flock_moe8_gate_up_ms`, `flock_moe8_down_ms`: the 8 layers' router
  and top-k, and the experts' gathered matmuls alone (fixed experts per layer);
  `flock_moe8_kernel_ms` the experts kernel on the same experts (gate_up, SwiGLU, down, sum).
Prints `name: value` lines (median ms, and `_min` ones); asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import emit


def worker(rounds: int) -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from agent.runtime import kernels, moe, step
    from agent.runtime.kv import KvGeometry, KvSlots
    from agent.runtime.matmul import linear
    from agent.runtime.model import load_decoder
    from bench.models import MOE_PROMPT, moe_dir

    directory = moe_dir()
    dec = load_decoder(directory, dtype=mx.float32)
    sparse_mlp = moe.sparse_mlp

    kernel_experts = moe._kernel_experts

    def flock(project: bool, mlp: Callable[..., Any] | None,
              gather: bool = False) -> Callable[[], mx.array]:
        def fn(inputs: mx.array, positions: mx.array, *kv: mx.array) -> tuple[mx.array, ...]:
            moe.sparse_mlp = mlp or sparse_mlp  # swapped while tracing only
            if gather:
                moe._kernel_experts = lambda *a: None
            try:
                half = len(kv) // 2
                out, keys, values = step.decode_step(dec, inputs, positions, list(kv[:half]),
                                                     list(kv[half:]), embed=True,
                                                     project=project)
            finally:
                moe.sparse_mlp = sparse_mlp
                moe._kernel_experts = kernel_experts
            return (out, *keys, *values)

        compiled = mx.compile(fn)
        kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
        kv.acquire("0", 256)
        return lambda: kv.step_in_place(compiled, mx.array([100]), mx.array([len(MOE_PROMPT)]))

    model, _ = load_model(directory)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([MOE_PROMPT]), cache=cache))
    layers = model.model.layers
    mlps = [layer.mlp for layer in layers]

    def mlxlm(with_moe: bool) -> mx.array:
        if not with_moe:
            for layer in layers:
                layer.mlp = lambda x: x * 0.5
        try:
            out = model(mx.array([[100]]), cache=cache)
        finally:
            for layer, mlp in zip(layers, mlps, strict=True):
                layer.mlp = mlp
        for c in cache:  # the same position every round
            c.offset -= 1
        return out

    x = mx.random.normal((1, 1, dec.config.hidden_size))
    chosen = [mx.array([[(7 * i + j * 5) % dec.config.num_experts for j in range(4)]])
              for i in range(len(dec.layers))]
    xe = mx.expand_dims(x, (-2, -3))
    act = mx.random.normal((1, 1, 4, 1, dec.config.moe_intermediate_size))
    mx.eval(x, xe, act, *chosen)

    def route() -> list[mx.array]:
        return [a for layer in dec.layers
                for a in moe.route(layer.mlp, linear(x, layer.mlp.router))]

    def gate_up() -> list[mx.array]:
        return [mx.gather_mm(xe, layer.mlp.gate_up.gate_up.weight.swapaxes(-1, -2),
                             rhs_indices=c) for layer, c in zip(dec.layers, chosen, strict=True)]

    def down() -> list[mx.array]:
        return [mx.gather_mm(act, layer.mlp.down.weight, rhs_indices=c)
                for layer, c in zip(dec.layers, chosen, strict=True)]

    scores = mx.full((1, 1, 4), 0.25)

    def kernel() -> list[mx.array]:
        return [kernels.moe_experts(x, c[None], scores, layer.mlp.gate_up.gate_up.weight,
                                    layer.mlp.down.weight)
                for layer, c in zip(dec.layers, chosen, strict=True)]

    cases: dict[str, Callable[[], Any]] = {
        "flock_step_ms": flock(True, None),
        "flock_no_moe_step_ms": flock(True, lambda m, h, lin, dense: h * 0.5),
        "flock_no_head_step_ms": flock(False, None),
        "flock_gather_step_ms": flock(True, None, gather=True),
        "mlxlm_step_ms": lambda: mlxlm(True),
        "mlxlm_no_moe_step_ms": lambda: mlxlm(False),
        "flock_moe8_route_ms": mx.compile(route),
        "flock_moe8_gate_up_ms": mx.compile(gate_up),
        "flock_moe8_down_ms": mx.compile(down),
    }
    if kernels.moe_experts(x, chosen[0][None], scores, dec.layers[0].mlp.gate_up.gate_up.weight,
                           dec.layers[0].mlp.down.weight) is not None:
        cases["flock_moe8_kernel_ms"] = mx.compile(kernel)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for index in range(rounds + 3):  # three rounds to compile and warm up
        for name, case in cases.items():
            began = time.perf_counter()
            mx.eval(case())
            if index >= 3:
                times[name].append(1000 * (time.perf_counter() - began))
    med = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        emit(name, med[name], 2)
        emit(name[:-3] + "_min_ms", min(values), 2)
    emit("flock_moe_ms", med["flock_step_ms"] - med["flock_no_moe_step_ms"], 2)
    emit("flock_head_ms", med["flock_step_ms"] - med["flock_no_head_step_ms"], 2)
    emit("flock_rest_ms", med["flock_no_moe_step_ms"] - med["flock_step_ms"]
         + med["flock_no_head_step_ms"], 2)
    emit("mlxlm_moe_ms", med["mlxlm_step_ms"] - med["mlxlm_no_moe_step_ms"], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    if os.environ.get("FLOCK_BLAS_LIB"):
        worker(args.rounds)
        return
    from bench.common import runner_env

    env, threads = runner_env(gemv=True)
    print(f"openblas_threads: {threads}", flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "bench.moe_profile", *sys.argv[1:]],
              {**os.environ, **env})


if __name__ == "__main__":
    main()
