"""The mlx-lm engine: any architecture mlx-lm has a module for, run by mlx-lm's own model code.

flock's decoder (`model.py`) runs the llama family with its own math; every other architecture
mlx-lm can load runs here, behind the same scheduler (continuous batching, admission, sampling,
stop strings, streaming): `MlxLmCompute` implements the scheduler's compute seam over
`MlxLmSlots` (mlx-lm's caches, one batch cache for every decoding row). The model is loaded with
mlx_lm.utils.load_model, weights as stored. Tensor parallel is in `mlxlm_tensor.py`, pipeline
stages in `mlxlm_pipeline.py`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from agent.models.arch import context_length
from agent.runtime.journal import DecodeRows
from agent.runtime.links import StepMessage
from agent.runtime.mlxlm_cache import CacheCost, MlxLmSlots, measure_cost
from agent.runtime.model import UnsupportedModel
from agent.runtime.protocol import Ready, RunnerConfig


@dataclass(frozen=True)
class ModelFacts:
    """What the scheduler asks of a model."""

    vocab_size: int
    max_position_embeddings: int


class MlxLmModel:
    """An mlx-lm model object and the facts the runner reports about it."""

    def __init__(self, model: Any, config: dict[str, Any], vocab_size: int) -> None:
        self.model = model
        self.raw_config = config
        self.config = ModelFacts(vocab_size, context_length(config))
        self.stage: Any = None  # a pipeline stage's slice (mlxlm_pipeline.Stage), if any

    def weight_bytes(self) -> int:
        return sum(a.nbytes for _, a in tree_flatten(self.model.parameters()))


def load_mlxlm_model(model_dir: Path) -> MlxLmModel:
    """Load with mlx-lm's own loader; a failure names the architecture."""
    from mlx_lm.utils import load_config, load_model

    config = load_config(model_dir)
    model_type = config.get("model_type", "?")
    try:
        model, config = load_model(model_dir)
    except Exception as exc:
        raise UnsupportedModel(f"mlx-lm could not load this '{model_type}' model: "
                               f"{type(exc).__name__}: {exc}") from exc
    from mlx_lm.models.cache import make_prompt_cache

    # The vocabulary is the head's width (configs nest or pad it differently).
    probe = model(mx.array([[0]]), cache=make_prompt_cache(model))
    return MlxLmModel(model, config, int(probe.shape[-1]))


class MlxLmCompute:
    """The scheduler's compute seam over an mlx-lm model: prefill one row into its own cache,
    decode every decoding row in one batched call."""

    # A decode step advances every row's cache (recurrent state too), so a queued step that the
    # scheduler drops would not be harmless: no lookahead.
    lazy_decode = False

    def __init__(self, model: MlxLmModel, slots: MlxLmSlots) -> None:
        self.model = model.model
        self.slots = slots
        self._rows: list[int] = []

    def prefill(self, row: int, start: int, tokens: list[int]) -> mx.array:
        slots = self.slots
        assert slots.lengths[row] == start, (row, slots.lengths[row], start)
        cache = slots.cache_of(row)
        logits = self._forward(mx.array(tokens)[None], cache,
                               StepMessage(op="prefill", row=row, start=start))
        slots.lengths[row] = start + len(tokens)
        return logits[:, -1, :]

    def _forward(self, inputs: mx.array, cache: list[Any], message: StepMessage) -> mx.array:
        """One model call; `message` says what it is, for a pipeline head's stages."""
        return self.model(inputs, cache=cache)

    def will_decode(self, rows: list[int]) -> None:
        self._rows = sorted(rows)

    def decode(self, tokens: list[int] | mx.array, positions: list[int]) -> mx.array:
        slots, rows = self.slots, self._rows
        assert rows, "will_decode names the rows first"
        for row in rows:
            assert positions[row] == slots.lengths[row], (row, positions[row], slots.lengths[row])
        ids = tokens if isinstance(tokens, mx.array) else mx.array(tokens)
        if slots.geometry.batchable:
            batch = slots.batch_for(rows)
            inputs = ids[mx.array(slots.order)][:, None]
            message = StepMessage(op="decode", kv_ops=[DecodeRows(list(rows))],
                                  positions=list(positions))
            logits = self._forward(inputs, batch, message)[:, -1, :]
            at = {row: i for i, row in enumerate(slots.order)}
        else:
            # Caches that cannot merge (a chunked cache...): each row its own call, same step.
            # (To pipeline stages each such call is a one-token prefill of that row.)
            parts = [self._forward(ids[row:row + 1][:, None], slots.cache_of(row),
                                   StepMessage(op="prefill", row=row, start=slots.lengths[row])
                                   )[:, -1, :] for row in rows]
            logits = mx.concatenate(parts, axis=0)
            at = {row: i for i, row in enumerate(rows)}
        for row in rows:
            slots.lengths[row] += 1
        if len(at) == slots.rows and all(at[r] == r for r in range(slots.rows)):
            return logits
        return logits[mx.array([at.get(r, 0) for r in range(slots.rows)])]

    def close(self) -> None:
        pass


def load_for_runner(config: RunnerConfig, budget_for: Any, group: Any = None, *,
                    load_stage: Callable[[Path, RunnerConfig], MlxLmModel] | None = None,
                    ) -> tuple[tuple[Any, ...], Ready]:
    """The mlx-lm engine's part of runner start-up: (model, tokenizer, slots, limits, prefix
    cache or None, compute) and the Ready message. `budget_for(weight_bytes, bytes_per_token,
    context)` is the runner's KV budget rule. With a tensor `group` the model is cut by its own
    `shard()` (every rank runs this same sequence of model calls: the probes' collectives pair
    up). A pipeline stage is loaded by `load_stage` (mlxlm_pipeline's, handed in by the runner:
    the pipeline module builds on this one)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from agent.runtime.blas import describe_blas
    from agent.runtime.prefix import PrefixCache, prefix_cache_bytes
    from agent.runtime.sequences import SchedulerLimits

    pipeline = config.role in ("head", "follower")
    if pipeline and group is not None:
        raise UnsupportedModel("the mlx-lm engine does not run tensor groups inside pipeline "
                               "stages")
    if config.role not in ("solo", "tp_follower", "head", "follower") or (
            not pipeline and config.layer_start not in (None, 0)):
        raise UnsupportedModel(f"the mlx-lm engine does not run role {config.role!r} with "
                               f"layers from {config.layer_start}")
    started = time.perf_counter()
    model_dir = Path(config.model_dir)
    if pipeline:
        if load_stage is None:
            raise UnsupportedModel("a pipeline stage needs the pipeline stage loader")
        model = load_stage(model_dir, config)
    else:
        model = load_mlxlm_model(model_dir)
    if group is not None:
        arch = model.raw_config.get("model_type", "?")
        if not hasattr(model.model, "shard"):
            raise UnsupportedModel(f"tensor parallel: mlx-lm's '{arch}' module has no shard()")
        model.model.shard(group)
        mx.eval(model.model.parameters())
    if config.kv_bits is not None:
        print(f"flock: kv_bits={config.kv_bits} is not applied on the mlx-lm engine; the cache "
              "keeps the model's dtype", file=sys.stderr)
    stage = model.stage
    cost: CacheCost = measure_cost(model.model, stage.probe_forward if stage else None)
    if stage is not None and not stage.head:
        # Whether rows batch is the head's call: its messages say which way each step goes.
        cost = dataclasses.replace(cost, batchable=True)
    tokenizer = load_tokenizer(model_dir)
    context = model.config.max_position_embeddings
    if config.context_length:
        context = min(context, config.context_length)
    weights = model.weight_bytes()
    # Recurrent state is a fixed cost per sequence: spread over the context, so that a budget
    # sized for `max_batch` sequences counts it (a stage or model of recurrent layers only
    # keeps ~nothing per token, and would otherwise be sized for one sequence).
    per_token = cost.bytes_per_token + -(-cost.bytes_per_sequence // max(context, 1))
    budget = budget_for(weights, per_token, context)
    limits = SchedulerLimits.for_runner(config, context_length=context, kv_budget_bytes=budget)
    slots = MlxLmSlots(model.model, cost, limit_bytes=budget)
    prefix = None
    # Peers and later stages would need the same entries: not yet.
    if cost.reusable and group is None and stage is None:
        prefix = PrefixCache(prefix_cache_bytes(config.prefix_cache_bytes, budget))
    ready = Ready(
        model_name=config.model_name,
        weight_bytes=weights,
        kv_budget_bytes=budget,
        kv_bytes_per_token=cost.bytes_per_token,
        context_length=context,
        load_seconds=time.perf_counter() - started,
        blas=describe_blas(),
        engine="mlx-lm",
    )
    compute = MlxLmCompute(model, slots)
    return (model, tokenizer, slots, limits, prefix, compute), ready
