"""The stages of a 2-stage SmolLM2 pipeline timed in one process, in CPU seconds: how balanced a
layer split is, with the vocabulary projection on the head alone or shared with the last stage.

    .venv/bin/python -m bench.stage_balance [--splits 13:head,15:shared] [--steps 8]
        [--slice N] [--prefill-reps 3]

Each stage's work is what its runner computes (`compute.HeadCompute`, `follower.Follower`): the
head embeds, runs its layers and projects its share of the vocabulary; the last stage runs its
layers (and projects the rest when shared). CPU seconds of this process (one BLAS thread, the
runners' environment) rather than wall time, so a machine shared with other work distorts the
figures less. Prints `name: value` lines per split:

  <split>_decode8_head_ms / _last_ms   one micro-batch of 8 rows (16 streams over 2 stages)
  <split>_decode16_head_ms / _last_ms  all 16 rows (stop-and-wait)
  <split>_decode_balance               slower / faster stage at 8 rows (1.0: even)
  <split>_microbatch_vs_stopwait_est   (head16 + last16) / (2 x slower stage at 8 rows): what
                                       micro-batching can give over stop-and-wait, hops aside
  <split>_prefill2k_vs_single_est      a 2,000-token prompt in the ring's slices (max-plus of
                                       the measured slice times, two steps in the ring at most)
                                       / the whole model in one pass
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import call_in_subprocess, emit, runner_env, smollm2_f32_dir

PROMPT = 2000


def worker(model_dir: str, splits: list[list[Any]], steps: int, slice_tokens: int,
           prefill_reps: int = 3) -> dict[str, float]:
    import json
    import time
    from pathlib import Path

    import mlx.core as mx

    from agent.models.tensors import LayerRange
    from agent.runtime.kv import KvGeometry, KvSlots
    from agent.runtime.model import DecoderConfig, load_decoder
    from agent.runtime.pacing import key_cost
    from agent.runtime.ring import lone_prompt_slices
    from agent.runtime.rowstep import RowsDecode
    from agent.runtime.step import make_decode_fn, prefill
    from agent.runtime.vocab_split import decoder_bytes, head_vocab_rows, project_rows, rows_of

    directory = Path(model_dir)
    cpu = time.process_time

    def stage(start: int, stop: int, *, embeds: bool) -> tuple[Any, KvSlots]:
        dec = load_decoder(directory, layers=LayerRange(start, stop), embeds=embeds,
                           projects=True)
        kv = KvSlots(KvGeometry(len(dec.layers), dec.local_kv_heads, dec.config.head_dim))
        for row in range(16):
            kv.acquire(f"r{row}", PROMPT + 64)
        kv.ensure_capacity(PROMPT + 64)
        return dec, kv

    def timed(fn: Any) -> float:
        for _ in range(2):
            fn()
        began = cpu()
        for _ in range(steps):
            fn()
        return 1000 * (cpu() - began) / steps

    def decode_ms(dec: Any, kv: KvSlots, rows: int, embed: bool, proj: Any) -> float:
        fn = (make_decode_fn(dec, compiled=True, embed=embed, project=False) if rows == 16
              else RowsDecode(dec, compiled=True, embed=embed, project=False)(0))
        inputs = mx.array([5] * rows) if embed else mx.zeros((rows, 1, dec.config.hidden_size))
        positions = mx.array([100] * rows)
        project = mx.compile(lambda h: project_rows(dec, proj, h)) if proj is not None else None

        def step() -> None:
            out = kv.step_in_place(fn, inputs, positions)
            mx.eval(project(out[:, 0, :]) if project is not None else out, kv.keys, kv.values)

        return timed(step)

    def plan() -> list[int]:
        """Slice lengths: `slice_tokens` each, or (0) the ring's slices for a lone prompt."""
        if slice_tokens:
            return [min(slice_tokens, PROMPT - s) for s in range(0, PROMPT, slice_tokens)]
        per_key = key_cost(DecoderConfig.from_hf(
            json.loads((directory / "config.json").read_text())))
        return lone_prompt_slices(PROMPT, 0, 2, per_key, 2048)

    def slices_ms(dec: Any, kv: KvSlots, embed: bool) -> list[float]:
        """Each slice's CPU ms, the least of `prefill_reps` passes over the prompt (the
        first pass's one-time costs and a busy machine's spikes left out)."""
        hidden = dec.config.hidden_size
        tokens = list(range(1000, 1000 + PROMPT))
        best: list[float] = []
        for _ in range(prefill_reps):
            out, start = [], 0
            for size in plan():
                part = tokens[start:start + size]
                x = mx.array(part) if embed else mx.zeros((1, len(part), hidden))
                began = cpu()
                h = prefill(dec, x, start, 0, kv.keys, kv.values, embed=embed, project=False)
                mx.eval(h, kv.keys, kv.values)
                out.append(1000 * (cpu() - began))
                start += size
            best = out if not best else [min(a, b) for a, b in zip(best, out, strict=True)]
        return best

    figures: dict[str, float] = {}
    full, full_kv = stage(0, 30, embeds=True)
    single_prefill = float("inf")
    for _ in range(prefill_reps):
        began = cpu()
        h = prefill(full, mx.array(list(range(1000, 1000 + PROMPT))), 0, 0, full_kv.keys,
                    full_kv.values)
        mx.eval(h, full_kv.keys, full_kv.values)
        single_prefill = min(single_prefill, 1000 * (cpu() - began))
    layers = full.config.num_layers
    del full, full_kv
    for head_layers, mode in splits:
        name = f"split{head_layers}_{mode}"
        head, head_kv = stage(0, head_layers, embeds=True)
        last, last_kv = stage(head_layers, layers, embeds=False)
        vocab = head.head.weight.shape[0]
        rows = vocab
        if mode == "shared":
            layer_bytes, projection_bytes = decoder_bytes(head)
            rows = head_vocab_rows(vocab, len(head.layers), len(last.layers), layer_bytes,
                                   projection_bytes)
        head_proj = rows_of(head.head, 0, rows, copy=False)
        last_proj = rows_of(last.head, rows, vocab) if rows < vocab else None
        for batch in (8, 16):
            figures[f"{name}_decode{batch}_head_ms"] = decode_ms(head, head_kv, batch, True,
                                                                 head_proj)
            figures[f"{name}_decode{batch}_last_ms"] = decode_ms(last, last_kv, batch, False,
                                                                 last_proj)
        h8, l8 = figures[f"{name}_decode8_head_ms"], figures[f"{name}_decode8_last_ms"]
        figures[f"{name}_decode_balance"] = max(h8, l8) / min(h8, l8)
        figures[f"{name}_microbatch_vs_stopwait_est"] = (
            figures[f"{name}_decode16_head_ms"] + figures[f"{name}_decode16_last_ms"]) / (
            2 * max(h8, l8))
        head_slices, last_slices = slices_ms(head, head_kv, True), slices_ms(last, last_kv, False)
        # The ring holds two steps: the head starts slice k once slice k - 2 is back.
        done_head, done_last = 0.0, [0.0, 0.0]
        for a, b in zip(head_slices, last_slices, strict=True):
            done_head = max(done_head, done_last[-2]) + a
            done_last.append(max(done_last[-1], done_head) + b)
        figures[f"{name}_prefill2k_vs_single_est"] = done_last[-1] / single_prefill
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default="13:head,15:shared",
                        help="head layers:head|shared (who projects decode's vocabulary), ...")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps")
    parser.add_argument("--prefill-reps", type=int, default=3,
                        help="passes over the prompt; each slice's least CPU time is kept")
    parser.add_argument("--slice", type=int, default=0,
                        help="prefill slice tokens (0: the ring's slices for a lone 2,000-token "
                             "prompt on 2 stages, `ring.lone_prompt_slices`)")
    args = parser.parse_args()
    splits = [[int(h), mode] for h, _, mode in (s.partition(":") for s in args.splits.split(","))]
    env, _ = runner_env(gemv=True, threads=1)
    got = call_in_subprocess("bench.stage_balance:worker",
                             {"model_dir": str(smollm2_f32_dir()), "splits": splits,
                              "steps": args.steps, "slice_tokens": args.slice,
                              "prefill_reps": args.prefill_reps}, env,
                             timeout=1800)
    for name, value in got.items():
        emit(name, value, 3 if "est" in name or "balance" in name else 1)


if __name__ == "__main__":
    main()
