"""Every Prometheus metric a flock node exports, in one place and in the node's own registry.

The rest of flock calls methods of `FlockMetrics` (one-liners at the call site) and never touches
prometheus-client objects. `create_metrics(enabled=False)` returns `NullMetrics`, whose methods do
nothing, so the decode hot path pays one empty method call per token when metrics are off.

Call sites, in the order a node meets them:

- startup: `create_metrics(settings.metrics_enabled)`, then
  `set_build_info(version, backend, blas)`.
- each API request: `req = metrics.request(api, model)` once the request is parsed, then
  `req.tokens(len(chunk.token_ids))` for every token chunk streamed out, then exactly one
  `req.done(status, prompt_tokens=..., cached_tokens=...)` when the response ends
  (`with metrics.request(...) as req:` calls `done` itself when the block exits without it).
- a request turned away before work starts: `rejected(reason)`; an internal failure: `error(kind)`.
- runner lifecycle: `observe_runner_stats(model, stats, instance_id)` for each periodic snapshot,
  `runner_restarted(model, instance_id)` when the agent restarts a runner,
  `forget_runner(model, instance_id)` when an instance is removed.
- membership loop: `set_node_memory(total, available)`, `set_peer_rtt(peer, seconds)`,
  `forget_peer(peer)`; reconcile loop: `set_placements(rows)` with this node's ranks.
- `/metrics`: `render()` with `content_type`.

Label values are bounded: `api` is one of API_NAMES, `status` is an HTTP status class, rejection
reasons come from a fixed set, and model names and error kinds are capped in number (the rest are
reported as "other"), so a client sending random model names cannot grow the series count.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import NamedTuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

# prometheus-client adds a `<name>_created` series next to every counter and histogram in the text
# format; they double the series count and nothing in flock's dashboards or alerts reads them.
# The switch is process-wide, which is fine: the agent process owns its exposition.
disable_created_metrics()

API_NAMES = frozenset({"openai", "anthropic", "ollama"})
REJECTION_REASONS = frozenset({"overloaded", "too_long", "unauthorized", "bad_request"})
OTHER = "other"

# Caps on label values that come from outside the code (request bodies, runner reports).
MAX_MODEL_LABELS = 64
MAX_ERROR_KINDS = 32
MAX_LABEL_LENGTH = 128
_ERROR_KIND = re.compile(r"[a-z][a-z0-9_]{0,47}")

# Inter-token latency: a fast small model decodes in about a millisecond, a pipeline over Wi-Fi or
# a swapping node can take seconds.
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0,
)  # fmt: skip
# Time to first token includes queueing and prefill of long prompts.
TTFT_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

# Keys of the runner's periodic stats snapshot (see observe_runner_stats).
RUNNER_GAUGE_KEYS = ("kv_used_bytes", "kv_capacity_bytes", "active", "queued")
RUNNER_COUNTER_KEYS = ("prefix_hits", "prefix_misses", "evictions", "drafted_tokens_total",
                       "accepted_draft_tokens_total", "draft_passes_total")
RUNNER_RATE_KEY = "decode_tokens_per_second"
# A pipeline head's stats: each stage's busy seconds (key + stage index, 0 the head) and the
# micro-batches it has in the ring (agent/runtime/compute.py `stage_stats`, ring.py).
STAGE_BUSY_PREFIX = "stage_busy_seconds_total_"
IN_FLIGHT_KEY = "microbatches_in_flight"
MAX_STAGES = 64  # stage labels are bounded: a pipeline has at most this many stages
KNOWN_ERROR_KINDS = ("runner_failed", "engine_exception", "api_exception")


class PlacementRow(NamedTuple):
    """One rank of one model instance, as `flock_placement_info` shows it."""

    model: str
    instance_id: str
    node: str
    rank: int
    layer_start: int
    layer_end: int


def status_class(status: int | str) -> str:
    """HTTP status 429 -> "4xx"; a value that is not a status code -> "other"."""
    try:
        code = int(status)
    except (TypeError, ValueError):
        return OTHER
    return f"{code // 100}xx" if 100 <= code <= 599 else OTHER


class _RequestChildren:
    """Label children of one (api, model) pair, resolved once so per-token calls skip lookups."""

    __slots__ = ("api", "cached", "duration", "generated", "itl", "model", "prompt", "ttft")

    def __init__(self, metrics: FlockMetrics, api: str, model: str) -> None:
        self.api = api
        self.model = model
        self.ttft = metrics.time_to_first_token.labels(api, model)
        self.itl = metrics.inter_token_latency.labels(api, model)
        self.duration = metrics.request_duration.labels(api, model)
        self.generated = metrics.generated_tokens.labels(model)
        self.prompt = metrics.prompt_tokens.labels(model)
        self.cached = metrics.cached_prompt_tokens.labels(model)


class RequestMetrics:
    """Timing of one API request: time to first token, inter-token gaps, total duration."""

    __slots__ = ("_children", "_clock", "_done", "_last", "_metrics", "_start")

    def __init__(self, metrics: FlockMetrics, children: _RequestChildren, start: float) -> None:
        self._metrics = metrics
        self._children = children
        self._clock = metrics.clock
        self._start = start
        self._last: float | None = None
        self._done = False

    def tokens(self, n: int = 1) -> None:
        """Call for every chunk of generated tokens streamed to the client (n = tokens in it)."""
        if n <= 0:
            return
        now = self._clock()
        c = self._children
        if self._last is None:
            c.ttft.observe(now - self._start)
        else:
            # A chunk can carry several tokens; each gets an equal share of the gap so the
            # histogram counts tokens, not chunks.
            gap = (now - self._last) / n
            for _ in range(n):
                c.itl.observe(gap)
        self._last = now
        c.generated.inc(n)

    def done(self, status: int | str, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        """Call once when the response ends: HTTP status (499 for a client that went away)."""
        if self._done:
            return
        self._done = True
        c = self._children
        c.duration.observe(self._clock() - self._start)
        if prompt_tokens > 0:
            c.prompt.inc(prompt_tokens)
        if cached_tokens > 0:
            c.cached.inc(cached_tokens)
        self._metrics.requests.labels(c.api, c.model, status_class(status)).inc()

    def __enter__(self) -> RequestMetrics:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Only a block that forgot to call done() gets a status guessed from how it ended.
        self.done(500 if exc_type is not None else 200)


class FlockMetrics:
    """The node's metrics in their own registry (tests create as many as they like)."""

    enabled = True
    # The classic text format, which every Prometheus reads; flock's names need none of the
    # escaping that newer format versions (prometheus-client's default) announce.
    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The process's own CPU, memory and file descriptors (Linux /proc; empty elsewhere).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

        # Latency, by external API and model.
        self.request_duration = Histogram(
            "flock_request_duration_seconds",
            "Time from accepting a generation request to the end of its response.",
            ["api", "model"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "flock_time_to_first_token_seconds",
            "Time from accepting a generation request to its first generated token.",
            ["api", "model"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "flock_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request, as streamed.",
            ["api", "model"], buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip

        # Throughput.
        self.prompt_tokens = Counter(
            "flock_prompt_tokens_total", "Prompt tokens of finished requests.", ["model"],
            registry=r,
        )  # fmt: skip
        self.cached_prompt_tokens = Counter(
            "flock_cached_prompt_tokens_total",
            "Prompt tokens served from the prefix cache instead of prefilled.", ["model"],
            registry=r,
        )  # fmt: skip
        self.generated_tokens = Counter(
            "flock_generated_tokens_total", "Tokens generated and streamed to clients.",
            ["model"], registry=r,
        )  # fmt: skip
        # `instance` would collide with the target label Prometheus attaches to every series.
        self.decode_rate = Gauge(
            "flock_decode_tokens_per_second",
            "Decode throughput of a model instance's runner, as it last reported.",
            ["model", "instance_id"], registry=r,
        )  # fmt: skip

        # KV cache and scheduler pressure, summed over this node's runners of a model.
        self.kv_used = Gauge(
            "flock_kv_cache_used_bytes", "KV cache bytes in use.", ["model"], registry=r
        )
        self.kv_capacity = Gauge(
            "flock_kv_cache_capacity_bytes", "KV cache bytes the runners may use.", ["model"],
            registry=r,
        )  # fmt: skip
        self.kv_pressure = Gauge(
            "flock_kv_cache_pressure_ratio", "KV cache used / capacity (0..1).", ["model"],
            registry=r,
        )  # fmt: skip
        self.sequences_active = Gauge(
            "flock_sequences_active", "Sequences being decoded.", ["model"], registry=r
        )
        self.sequences_queued = Gauge(
            "flock_sequences_queued", "Sequences waiting for a batch slot or KV space.",
            ["model"], registry=r,
        )  # fmt: skip
        self.prefix_hits = Counter(
            "flock_prefix_cache_hits_total", "Requests whose prompt prefix was cached.",
            ["model"], registry=r,
        )  # fmt: skip
        self.prefix_misses = Counter(
            "flock_prefix_cache_misses_total", "Requests whose prompt prefix was not cached.",
            ["model"], registry=r,
        )  # fmt: skip
        self.kv_evictions = Counter(
            "flock_kv_evictions_total", "KV cache entries evicted to make room.", ["model"],
            registry=r,
        )  # fmt: skip
        # Speculative decoding (prompt lookup, predictions): drafted tokens, those verification
        # kept, and the passes that carried a draft.
        self.drafted_tokens = Counter(
            "flock_draft_tokens_total", "Tokens drafted for speculative decoding.", ["model"],
            registry=r,
        )  # fmt: skip
        self.accepted_draft_tokens = Counter(
            "flock_draft_accepted_tokens_total", "Drafted tokens that verification kept.",
            ["model"], registry=r,
        )  # fmt: skip
        self.draft_passes = Counter(
            "flock_draft_passes_total", "Verification passes of a sequence that carried a draft.",
            ["model"], registry=r,
        )  # fmt: skip
        self.draft_acceptance = Gauge(
            "flock_draft_acceptance_ratio",
            "Drafted tokens kept / drafted, since the model's runners started (0 without drafts).",
            ["model"], registry=r,
        )  # fmt: skip

        # Outcomes.
        self.requests = Counter(
            "flock_requests_total", "Generation requests by API, model and HTTP status class.",
            ["api", "model", "status"], registry=r,
        )  # fmt: skip
        self.rejections = Counter(
            "flock_rejections_total", "Requests turned away before any work started.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "flock_errors_total", "Internal errors by kind.", ["type"], registry=r
        )
        self.runner_restarts = Counter(
            "flock_runner_restarts_total", "Runner processes restarted after dying.", ["model"],
            registry=r,
        )  # fmt: skip

        # The node and its cluster.
        self.node_memory = Gauge(
            "flock_node_memory_bytes", "Memory of this node (kind: total | available).",
            ["kind"], registry=r,
        )  # fmt: skip
        self.peer_rtt = Gauge(
            "flock_peer_rtt_seconds", "Last measured round trip to a peer node.", ["peer"],
            registry=r,
        )  # fmt: skip
        self.placement = Gauge(
            "flock_placement_info", "1 for each model rank this node runs, with its layers.",
            ["model", "instance_id", "node", "rank", "layer_start", "layer_end"], registry=r,
        )  # fmt: skip
        self.build = Info("flock_build", "Version and compute backend of this node.", registry=r)
        # Replicas: where this node routed requests and why, retries, scaling, measured loads.
        self.replica_requests = Counter(
            "flock_replica_requests_total", "Requests this node routed, by replica and reason "
            "(only | soonest | prefix).", ["model", "instance_id", "reason"], registry=r)
        self.replica_retries = Counter(
            "flock_replica_retries_total", "Requests moved off a replica that failed them "
            "before their first token.", ["model", "instance_id"], registry=r)
        self.replica_scale_events = Counter(
            "flock_replica_scale_events_total", "Scale-on-load changes by their cause (add: "
            "queue_wait, drain: idle, remove: drained, undrain: load_back | floor).",
            ["model", "change", "reason"], registry=r)
        self.replicas = Gauge("flock_replicas", "Replicas placed per model.", ["model"], registry=r)
        # Pipelines: how busy each stage is and how many micro-batches are in the ring.
        self.stage_busy = Counter(
            "flock_stage_busy_seconds_total", "Seconds each pipeline stage spent computing "
            "(stage 0 is the head), as the instance's head reports it.",
            ["model", "instance_id", "stage"], registry=r)
        self.microbatches_in_flight = Gauge(
            "flock_pipeline_microbatches_in_flight", "Micro-batches of a pipeline instance in "
            "its ring when its head last reported.", ["model", "instance_id"], registry=r)
        self.replica_load = Gauge(
            "flock_replica_load", "Measured load of each replica headed on this node (kind: "
            "running | queued | in_flight | outstanding_tokens | queue_wait_seconds | "
            "idle_seconds | requests).", ["model", "instance_id", "kind"], registry=r)

        for reason in REJECTION_REASONS:  # zero series exist from the start, so rate() works
            self.rejections.labels(reason)
        self._models: set[str] = set()
        self._error_kinds: set[str] = set(KNOWN_ERROR_KINDS)
        # Known kinds start at 0, so dashboards and alerts see a series before the first error.
        for kind in KNOWN_ERROR_KINDS:
            self.errors.labels(kind)
        self._request_children: dict[tuple[str, str], _RequestChildren] = {}
        # Latest snapshot and last cumulative totals per (model, instance_id).
        self._runner_gauges: dict[tuple[str, str], dict[str, float]] = {}
        self._runner_totals: dict[tuple[str, str], dict[str, float]] = {}

    # -- requests -------------------------------------------------------------------------------

    def request(self, api: str, model: str) -> RequestMetrics:
        """Start timing a generation request (call when it is parsed and about to be queued)."""
        # Keyed by the bounded labels, so random model names cannot grow this cache either.
        key = (api if api in API_NAMES else OTHER, self._model_label(model))
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = _RequestChildren(self, *key)
        return RequestMetrics(self, children, self.clock())

    def rejected(self, reason: str) -> None:
        """A request refused before work: overloaded | too_long | unauthorized | bad_request."""
        self.rejections.labels(reason if reason in REJECTION_REASONS else OTHER).inc()

    def error(self, kind: str) -> None:
        """An internal error of some kind (a short snake_case word, e.g. "runner_crash")."""
        if kind not in self._error_kinds:
            if _ERROR_KIND.fullmatch(kind) and len(self._error_kinds) < MAX_ERROR_KINDS:
                self._error_kinds.add(kind)
            else:
                kind = OTHER
        self.errors.labels(kind).inc()

    # -- runners --------------------------------------------------------------------------------

    def observe_runner_stats(
        self, model: str, stats: Mapping[str, float], instance_id: str = "0"
    ) -> None:
        """Take a runner's periodic snapshot.

        Keys (any may be missing): kv_used_bytes, kv_capacity_bytes, active, queued (current
        values); prefix_hits, prefix_misses, evictions, drafted_tokens_total,
        accepted_draft_tokens_total, draft_passes_total (cumulative totals since the runner
        started); decode_tokens_per_second. Totals become counter increments; a total lower than
        the last one means the runner restarted and counted again from zero.
        """
        model = self._model_label(model)
        key = (model, instance_id)
        gauges = self._runner_gauges.setdefault(key, {})
        for name in RUNNER_GAUGE_KEYS:
            value = _finite(stats.get(name))
            if value is not None:
                gauges[name] = value
        totals = self._runner_totals.setdefault(key, {})
        for name, counter in (
            ("prefix_hits", self.prefix_hits),
            ("prefix_misses", self.prefix_misses),
            ("evictions", self.kv_evictions),
            ("drafted_tokens_total", self.drafted_tokens),
            ("accepted_draft_tokens_total", self.accepted_draft_tokens),
            ("draft_passes_total", self.draft_passes),
        ):
            child = counter.labels(model)  # the series exists from the first report on
            value = _finite(stats.get(name))
            if value is None or value < 0:
                continue
            last = totals.get(name, 0.0)
            increase = value - last if value >= last else value
            if increase > 0:
                child.inc(increase)
            totals[name] = value
        self._observe_stages(model, instance_id, stats, totals)
        # A zero series before the first restart lets increase() see that first restart.
        self.runner_restarts.labels(model)
        rate = _finite(stats.get(RUNNER_RATE_KEY))
        if rate is not None:
            self.decode_rate.labels(model, instance_id).set(rate)
        self._publish_model_gauges(model)

    def _observe_stages(self, model: str, instance_id: str, stats: Mapping[str, float],
                        totals: dict[str, float]) -> None:
        """A pipeline head's per-stage busy totals (counter increments, as above) and its
        micro-batches in flight."""
        for name, raw in stats.items():
            if not name.startswith(STAGE_BUSY_PREFIX):
                continue
            stage = name[len(STAGE_BUSY_PREFIX):]
            value = _finite(raw)
            if not stage.isdigit() or int(stage) >= MAX_STAGES or value is None or value < 0:
                continue
            child = self.stage_busy.labels(model, instance_id, stage)
            last = totals.get(name, 0.0)
            increase = value - last if value >= last else value
            if increase > 0:
                child.inc(increase)
            totals[name] = value
        in_flight = _finite(stats.get(IN_FLIGHT_KEY))
        if in_flight is not None:
            self.microbatches_in_flight.labels(model, instance_id).set(in_flight)

    def runner_restarted(self, model: str, instance_id: str = "0") -> None:
        """The agent restarted a runner: count it and expect its totals to start from zero."""
        model = self._model_label(model)
        self.runner_restarts.labels(model).inc()
        self._runner_totals.pop((model, instance_id), None)

    def forget_runner(self, model: str, instance_id: str = "0") -> None:
        """An instance was removed from this node: drop its share of the model's gauges."""
        model = self._model_label(model)
        self._runner_gauges.pop((model, instance_id), None)
        self._runner_totals.pop((model, instance_id), None)
        _remove(self.decode_rate, model, instance_id)
        _remove(self.microbatches_in_flight, model, instance_id)
        for stage in range(MAX_STAGES):
            _remove(self.stage_busy, model, instance_id, str(stage))
        if any(m == model for m, _ in self._runner_gauges):
            self._publish_model_gauges(model)
            return
        for gauge in (
            self.kv_used, self.kv_capacity, self.kv_pressure,
            self.sequences_active, self.sequences_queued, self.draft_acceptance,
        ):  # fmt: skip
            _remove(gauge, model)

    def _publish_model_gauges(self, model: str) -> None:
        snapshots = [g for (m, _), g in self._runner_gauges.items() if m == model]
        used = sum(g.get("kv_used_bytes", 0.0) for g in snapshots)
        capacity = sum(g.get("kv_capacity_bytes", 0.0) for g in snapshots)
        self.kv_used.labels(model).set(used)
        self.kv_capacity.labels(model).set(capacity)
        self.kv_pressure.labels(model).set(used / capacity if capacity > 0 else 0.0)
        self.sequences_active.labels(model).set(sum(g.get("active", 0.0) for g in snapshots))
        self.sequences_queued.labels(model).set(sum(g.get("queued", 0.0) for g in snapshots))
        totals = [t for (m, _), t in self._runner_totals.items() if m == model]
        drafted = sum(t.get("drafted_tokens_total", 0.0) for t in totals)
        kept = sum(t.get("accepted_draft_tokens_total", 0.0) for t in totals)
        self.draft_acceptance.labels(model).set(kept / drafted if drafted > 0 else 0.0)

    # -- node and cluster -----------------------------------------------------------------------

    def set_build_info(self, version: str, backend: str, blas: str) -> None:
        """Once at startup: flock version, MLX backend (metal | cuda | cpu), BLAS in use."""
        self.build.info({"version": version, "backend": backend, "blas": blas})

    def set_node_memory(self, total_bytes: float, available_bytes: float) -> None:
        self.node_memory.labels("total").set(total_bytes)
        self.node_memory.labels("available").set(available_bytes)

    def set_peer_rtt(self, peer: str, seconds: float) -> None:
        """Last round trip to a peer (membership heartbeats); peers are bounded by cluster size."""
        self.peer_rtt.labels(peer).set(seconds)

    def forget_peer(self, peer: str) -> None:
        """A peer left the cluster: stop exporting a stale round trip for it."""
        _remove(self.peer_rtt, peer)

    def set_placements(self, rows: Iterable[PlacementRow]) -> None:
        """Replace the placement series with this node's current ranks (after each reconcile)."""
        self.placement.clear()
        for row in rows:
            self.placement.labels(
                row.model, row.instance_id, row.node,
                str(row.rank), str(row.layer_start), str(row.layer_end),
            ).set(1)  # fmt: skip

    def replica_routed(self, model: str, instance_id: str, reason: str) -> None:
        model = self._model_label(model)
        self.replica_requests.labels(model, instance_id, reason).inc()
        self.replica_retries.labels(model, instance_id)  # a zero series before the first retry

    def replica_retried(self, model: str, instance_id: str) -> None:
        self.replica_retries.labels(self._model_label(model), instance_id).inc()

    def replica_scaled(self, model: str, change: str, reason: str) -> None:
        self.replica_scale_events.labels(self._model_label(model), change, reason[:24]).inc()

    def set_replica_counts(self, counts: Mapping[str, int]) -> None:
        """Replicas placed per model; each model's scale-event series start at zero."""
        self.replicas.clear()
        for model, count in counts.items():
            label = self._model_label(model)
            self.replicas.labels(label).set(count)
            for change, cause in SCALE_CAUSES:
                self.replica_scale_events.labels(label, change, cause)

    def set_replica_loads(self, rows: Iterable[tuple[str, str, Mapping[str, float]]]) -> None:
        """Replace the replica-load series: (model, instance id, kind -> value) per local head."""
        self.replica_load.clear()
        for model, instance_id, kinds in rows:
            for kind, value in kinds.items():
                self.replica_load.labels(self._model_label(model), instance_id, kind).set(value)

    # -- exposition -----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition (serve it with `content_type`)."""
        return generate_latest(self.registry)

    def _model_label(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODEL_LABELS or not model:
            return OTHER
        model = model[:MAX_LABEL_LENGTH]
        self._models.add(model)
        return model


# (change, cause) of every scale-on-load event (agent/cluster/autoscale.py).
SCALE_CAUSES = (("add", "queue_wait"), ("drain", "idle"), ("remove", "drained"),
                ("undrain", "load_back"), ("undrain", "floor"))


def _finite(value: object) -> float | None:
    """A float for numbers that are finite; None for missing or broken values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _remove(metric: Gauge | Counter, *labels: str) -> None:
    # Older prometheus-client raises KeyError for labels never set: nothing to remove then.
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
