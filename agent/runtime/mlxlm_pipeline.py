"""Pipeline stages on the mlx-lm engine: each process runs a slice of an mlx-lm model's layer list.

The head holds the embeddings, layers [0, a), the final norm and the output head; a follower
holds layers [a, b) only. Rather than re-deriving each module's masks and positions (sliding
windows, recurrent layers, per-layer mask kinds), every stage calls the module's own `__call__`
over its whole layer list, with the layers it does not hold swapped for stand-ins:

- on the head, layer a ships the hidden states down the chain and returns what the last stage
  sends back; the layers after it pass them through, so the module's own norm and head finish;
- on a follower, layer a takes the hidden states that arrived, layer b-1 ends the call with its
  output (`StageDone`), the layers before a pass through and the embeddings return zeros.

Masks are built from the cache list before the layer loop, and may read any layer's cache
(`cache[fa_idx]`, `cache[sliding_window_pattern - 1]`): so each stage keeps a cache for every
layer, and the caches of layers it does not hold are advanced with zero-width keys (no bytes) by
as many positions as its own, merged and filtered alike; their offsets, padding and windows are
then exactly the real ones. Followers replay the head's row events (acquire, release, the rows a
decode computes) on their own `MlxLmSlots`, as tensor peers do. The stand-ins' weights are
dropped before anything is evaluated (the model is loaded lazily), so a stage holds only its
slice.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import ArraysCache, CacheList, make_prompt_cache

from agent.models.arch import MLX_LM_PIPELINE_MODULES
from agent.runtime.journal import DecodeRows, KvOp, RowAcquire, RowRelease, StageCost
from agent.runtime.links import StageLink, StageLinkError, StepMessage, next_step
from agent.runtime.mlxlm_cache import MlxLmSlots
from agent.runtime.mlxlm_engine import MlxLmCompute, MlxLmModel
from agent.runtime.model import UnsupportedModel
from agent.runtime.protocol import RunnerConfig
from agent.runtime.sequences import SchedulerLimits
from agent.runtime.watchdog import Watchdog

# The modules whose slicing is checked against mlx-lm's own generation (the registry's list).
SLICEABLE_MODULES = MLX_LM_PIPELINE_MODULES


class StageDone(Exception):
    """Raised by a follower's last layer: the rest of the model's call is not this stage's."""

    def __init__(self, h: mx.array) -> None:
        super().__init__()
        self.h = h


def _leaves(cache: Any) -> list[Any]:
    if isinstance(cache, CacheList):
        return [leaf for c in cache.caches for leaf in _leaves(c)]
    return [cache]


def _advance(leaf: Any, batch: int, tokens: int) -> None:
    """Move a stand-in layer's cache on by `tokens` positions without storing anything."""
    if isinstance(leaf, ArraysCache):
        for i, entry in enumerate(leaf.cache):
            if entry is None:  # recurrent state has no positions: it only needs to exist
                leaf.cache[i] = mx.zeros((batch, 0))
        return
    empty = mx.zeros((batch, 1, tokens, 0))
    leaf.update_and_fetch(empty, empty)


class Stage:
    """Layers [start, stop) of an mlx-lm model, on the head (start 0) or a follower."""

    def __init__(self, model: Any, start: int, stop: int, *, head: bool) -> None:
        layers = model.layers
        count = len(layers)
        if not (0 <= start < stop <= count) or (head and (start != 0 or stop >= count)):
            raise UnsupportedModel(f"pipeline stage [{start}, {stop}) does not fit a model of "
                                   f"{count} layers")
        self.model = model
        self.head = head
        self.start, self.stop = start, stop
        self.incoming: mx.array | None = None  # the hidden states a follower's layer a takes
        # The head's trip down the chain; None while probing (layer a then passes through).
        self.remote: Callable[[mx.array], mx.array] | None = None
        self.width, self.dtype = 0, mx.float32
        keep: set[int] = set()
        for i, layer in enumerate(layers):
            if start <= i < stop:
                keep |= {id(a) for _, a in tree_flatten(layer.parameters())}
            _swap(layer, self._role(i), self)
        if head:
            in_layers = {id(a) for layer in layers for _, a in tree_flatten(layer.parameters())}
            keep |= {id(a) for _, a in tree_flatten(model.parameters()) if id(a) not in in_layers}
        else:
            in_layers = {id(m) for layer in layers for _, m in layer.named_modules()}
            for _, embed in model.named_modules():
                if isinstance(embed, nn.Embedding | nn.QuantizedEmbedding) and \
                        id(embed) not in in_layers:
                    # Shapes only: nothing is read from the (lazy) weights.
                    probe = embed(mx.array([[0]]))
                    self.width, self.dtype = int(probe.shape[-1]), probe.dtype
                    _stub_embedding(embed, self.width, probe.dtype)
            if not self.width:
                raise UnsupportedModel("pipeline stages: no token embedding found beside the "
                                       f"layers of '{type(model).__module__}'")
        # Drop every weight this stage does not compute with, before any is evaluated.
        model.update(tree_unflatten([(k, a if id(a) in keep else mx.zeros((0,), a.dtype))
                                     for k, a in tree_flatten(model.parameters())]))
        mx.eval(model.parameters())
        self.owned = self._probe_owned()

    def _role(self, i: int) -> str:
        if self.head:
            return "" if i < self.stop else ("remote" if i == self.stop else "skip")
        if i < self.start or i >= self.stop:
            return "skip"
        enter, leave = i == self.start, i == self.stop - 1
        return "enter_exit" if enter and leave else "enter" if enter else "exit" if leave else ""

    def _probe_owned(self) -> list[bool]:
        """Which cache leaves this stage's own layers write (found by one probe call)."""
        cache = make_prompt_cache(self.model)
        self._call(mx.array([[0]]), cache, self.probe_states(mx.array([[0]])))
        return [not leaf.empty() for c in cache for leaf in _leaves(c)]

    def probe_states(self, inputs: mx.array) -> mx.array | None:
        """Stand-in hidden states for a follower's probes (load-time checks): distinct per
        token, so rows at different positions differ."""
        if self.head:
            return None
        ids = inputs.astype(mx.float32)[..., None]
        return mx.sin(ids * 0.37 + mx.arange(self.width) * 0.11).astype(self.dtype)

    def _call(self, inputs: mx.array, cache: list[Any], incoming: mx.array | None) -> mx.array:
        self.incoming = incoming
        try:
            return self.model(inputs, cache=cache)
        except StageDone as done:
            return done.h
        finally:
            self.incoming = None

    def forward(self, inputs: mx.array, cache: list[Any], incoming: mx.array | None = None
                ) -> mx.array:
        """The head: logits; a follower: its last layer's hidden states. `inputs` only gives a
        follower its shapes."""
        out = self._call(inputs, cache, incoming)
        batch, tokens = inputs.shape[0], inputs.shape[1]
        leaves = [leaf for c in cache for leaf in _leaves(c)]
        for leaf, owned in zip(leaves, self.owned, strict=True):
            if not owned:
                _advance(leaf, batch, tokens)
        return out

    def probe_forward(self, inputs: mx.array, cache: list[Any]) -> mx.array:
        """A local call for load-time checks (no links; the head's layer a passes through)."""
        return self.forward(inputs, cache, self.probe_states(inputs))


_SWAPPED: dict[tuple[type, str, int], type] = {}


def _swap(layer: nn.Module, role: str, stage: Stage) -> None:
    """Give one layer its stand-in behaviour by switching it to a subclass (its attributes, such
    as `is_linear` or `block_type` that modules' loops read, stay as they are)."""
    if not role:
        return
    base = type(layer)
    key = (base, role, id(stage))
    if key not in _SWAPPED:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            own: Stage = type(self)._flock_stage
            h, rest = args[0], args[1:]
            if role == "skip":
                return h
            if role == "remote":
                return h if own.remote is None else own.remote(h)
            if role in ("enter", "enter_exit") and own.incoming is not None:
                h = own.incoming
            out = base.__call__(self, h, *rest, **kwargs)
            if role in ("exit", "enter_exit"):
                raise StageDone(out)
            return out

        _SWAPPED[key] = type(f"{base.__name__}Stage{role.title()}", (base,),
                             {"__call__": call, "_flock_stage": stage})
    layer.__class__ = _SWAPPED[key]


def _stub_embedding(embed: nn.Module, width: int, dtype: Any) -> None:
    """A follower's embeddings: zeros of the right shape (its layer a replaces them)."""
    base = type(embed)

    def call(self: Any, x: mx.array) -> mx.array:
        return mx.zeros((*x.shape, width), dtype)

    embed.__class__ = type(f"{base.__name__}Stub", (base,), {"__call__": call})


def check_sliceable(config: dict[str, Any], module: str) -> None:
    """Refuse, by name, a family whose slicing is not known to give mlx-lm's results."""
    if module not in SLICEABLE_MODULES:
        raise UnsupportedModel(f"pipeline stages of '{config.get('model_type', module)}' are not "
                               "supported on the mlx-lm engine (supported: "
                               f"{', '.join(sorted(SLICEABLE_MODULES))})")


def load_stage(model_dir: Path, config: RunnerConfig) -> MlxLmModel:
    """Load one stage: the model lazily, then only the slice's weights are read."""
    from mlx_lm.utils import load_config, load_model

    from agent.models.arch import module_name

    raw = load_config(model_dir)
    check_sliceable(raw, module_name(raw))
    if config.layer_start is None or config.layer_stop is None:
        raise UnsupportedModel("a pipeline stage needs its layer range")
    try:
        model, raw = load_model(model_dir, lazy=True)
    except Exception as exc:
        raise UnsupportedModel(f"mlx-lm could not load this '{raw.get('model_type', '?')}' "
                               f"model: {type(exc).__name__}: {exc}") from exc
    stage = Stage(model, config.layer_start, config.layer_stop, head=config.role == "head")
    vocab = 0
    if stage.head:  # the vocabulary is the head's width
        vocab = int(stage.probe_forward(mx.array([[0]]), make_prompt_cache(model)).shape[-1])
    loaded = MlxLmModel(model, raw, vocab)
    loaded.stage = stage
    return loaded


class PipelineHeadCompute(MlxLmCompute):
    """The first stage: its layers, then the chain, then the module's own norm and head."""

    def __init__(self, model: MlxLmModel, slots: MlxLmSlots, stage: Stage,
                 downstream: StageLink, upstream: StageLink) -> None:
        super().__init__(model, slots)
        self.stage = stage
        self.downstream, self.upstream = downstream, upstream
        self._message: StepMessage | None = None
        slots.events = []
        stage.remote = self._round_trip

    def _forward(self, inputs: mx.array, cache: list[Any], message: StepMessage) -> mx.array:
        self._message = message
        return self.stage.forward(inputs, cache)

    def _round_trip(self, h: mx.array) -> mx.array:
        assert self._message is not None
        events = self.slots.events
        assert events is not None
        message = StepMessage(op=self._message.op, kv_ops=[*events, *self._message.kv_ops],
                              row=self._message.row, start=self._message.start,
                              positions=self._message.positions)
        events.clear()
        mx.eval(h)
        self.downstream.send(message, h)
        _, back = self.upstream.recv()
        assert back is not None
        return back

    def agree(self, limits: SchedulerLimits, timeout: float) -> SchedulerLimits:
        """Admission for the whole chain, asked once at start-up. Each stage's caches cost what
        its own layers keep, against its own budget B_i; the head keeps its budget B_0 and
        counts each cost as the largest of cost_i * B_0 / B_i over the stages, so whatever fits
        the head's count fits every stage."""
        self.downstream.send(StepMessage(op="hello"))
        message, _ = self.upstream.recv(timeout=timeout)
        mine, budget = self.slots.geometry, limits.kv_budget_bytes
        per_token, per_sequence = mine.bytes_per_token, mine.bytes_per_sequence
        for op in message.kv_ops:
            if not isinstance(op, StageCost) or op.budget_bytes <= 0:
                continue
            theirs = op.budget_bytes
            per_token = max(per_token, -(-op.bytes_per_token * budget // theirs))
            per_sequence = max(per_sequence, -(-op.bytes_per_sequence * budget // theirs))
        self.slots.geometry = dataclasses.replace(mine, bytes_per_token=per_token,
                                                  bytes_per_sequence=per_sequence)
        return limits

    def close(self) -> None:
        with contextlib.suppress(ConnectionError):
            self.downstream.send(StepMessage(op="shutdown"))
        self.downstream.close()
        self.upstream.close()


class PipelineFollower:
    """A later stage: replays the head's row events, computes its layers for each step."""

    def __init__(self, stage: Stage, slots: MlxLmSlots) -> None:
        self.stage = stage
        self.slots = slots
        self.rows: list[int] = []

    def cost(self) -> StageCost:
        """This stage's budget and cache cost, for the head's admission (`agree`)."""
        geometry = self.slots.geometry
        return StageCost(int(self.slots.limit_bytes or 0), geometry.bytes_per_token,
                         geometry.bytes_per_sequence)

    def apply(self, ops: list[KvOp]) -> None:
        for op in ops:
            match op:
                case RowAcquire(row=row):
                    self.slots.take_row(row)
                case RowRelease(row=row):
                    self.slots.release(row)
                case DecodeRows(rows=rows):
                    self.rows = sorted(rows)
                case StageCost():
                    pass  # for the head, passed on down the chain
                case _:
                    raise ValueError(f"unexpected op {op!r} for an mlx-lm pipeline stage")

    def step(self, message: StepMessage, h: mx.array) -> mx.array:
        slots = self.slots
        if message.op == "prefill":  # also a row decoded on its own (caches that cannot batch)
            row = message.row
            assert slots.lengths[row] == message.start, (row, slots.lengths[row], message.start)
            out = self.stage.forward(mx.zeros(h.shape[:2], mx.int32), slots.cache_of(row), h)
            slots.lengths[row] = message.start + h.shape[1]
        else:
            batch = slots.batch_for(self.rows)
            out = self.stage.forward(mx.zeros((len(slots.order), 1), mx.int32), batch, h)
            for row in self.rows:
                slots.lengths[row] += 1
        mx.eval(out, slots.keys)
        return out


def follow_pipeline(follower: PipelineFollower, upstream: StageLink, downstream: StageLink,
                    control_fd: int, watchdog: Watchdog | None = None) -> int:
    """Serve steps until the head shuts the chain down or the agent goes away."""
    while True:
        try:
            incoming = next_step(upstream, control_fd)
        except StageLinkError:
            return 1
        if incoming is None:
            return 0  # the agent closed our control pipe
        message, h = incoming
        if message.op == "shutdown":
            with contextlib.suppress(ConnectionError):
                downstream.send(message)
            return 0
        if message.op == "hello":  # start-up: add this stage's cost, pass it on
            downstream.send(StepMessage(op="hello", kv_ops=[*message.kv_ops, follower.cost()]))
            continue
        follower.apply(message.kv_ops)
        assert h is not None
        if watchdog:
            watchdog.arm()
        out = follower.step(message, h)
        if watchdog:
            watchdog.disarm()
        downstream.send(message, out)
