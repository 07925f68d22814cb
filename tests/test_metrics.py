"""agent.metrics: the exposition a real promtool accepts, timings, runner snapshots, bounds."""

from __future__ import annotations

import inspect
import subprocess
import time

import pytest
from deploy_tools import ensure_promtool, exercise_every_metric
from prometheus_client.parser import text_string_to_metric_families

from agent import metrics as metrics_module
from agent.metrics import (
    ITL_BUCKETS,
    MAX_MODEL_LABELS,
    TTFT_BUCKETS,
    FlockMetrics,
    PlacementRow,
    status_class,
)
from agent.metrics_off import NullMetrics, create_metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def value(m: FlockMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def samples(m: FlockMetrics) -> dict[str, list[dict[str, str]]]:
    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample.labels)
    return found


def test_exposition_passes_promtool_check_metrics() -> None:
    promtool = ensure_promtool()
    exposition = exercise_every_metric(create_metrics(True)).render()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""  # not even lint notes


def test_every_flock_family_is_exported_with_its_expected_name() -> None:
    names = set(samples(exercise_every_metric(create_metrics(True))))
    expected = {
        "flock_request_duration_seconds_bucket", "flock_time_to_first_token_seconds_bucket",
        "flock_inter_token_latency_seconds_bucket", "flock_prompt_tokens_total",
        "flock_generated_tokens_total", "flock_cached_prompt_tokens_total",
        "flock_decode_tokens_per_second", "flock_kv_cache_used_bytes",
        "flock_kv_cache_capacity_bytes", "flock_kv_cache_pressure_ratio", "flock_sequences_active",
        "flock_sequences_queued", "flock_prefix_cache_hits_total",
        "flock_prefix_cache_misses_total", "flock_kv_evictions_total", "flock_requests_total",
        "flock_rejections_total", "flock_errors_total", "flock_runner_restarts_total",
        "flock_node_memory_bytes", "flock_peer_rtt_seconds", "flock_placement_info",
        "flock_build_info",
    }  # fmt: skip
    assert expected <= names
    # _created series would double the series count for nothing.
    assert not [n for n in names if n.endswith("_created")]


def test_labels_never_include_prometheus_target_labels() -> None:
    for name, label_sets in samples(exercise_every_metric(create_metrics(True))).items():
        for labels in label_sets:
            assert not {"instance", "job"} & labels.keys(), name


def test_ttft_and_inter_token_latency_follow_the_clock() -> None:
    clock = FakeClock()
    m = create_metrics(True, clock=clock)
    # Binary fractions, so the bucket edges are not at the mercy of float rounding.
    request = m.request("openai", "m")
    clock.advance(0.25)
    request.tokens(1)  # first token after 250 ms
    clock.advance(0.0078125)
    request.tokens(1)  # a 7.8 ms gap
    clock.advance(0.046875)
    request.tokens(3)  # three tokens in one chunk: 15.6 ms each
    clock.advance(0.125)
    request.done(200, prompt_tokens=7, cached_tokens=3)

    ttft = "flock_time_to_first_token_seconds"
    itl = "flock_inter_token_latency_seconds"
    assert value(m, f"{ttft}_count", api="openai", model="m") == 1
    assert value(m, f"{ttft}_sum", api="openai", model="m") == 0.25
    assert value(m, f"{ttft}_bucket", api="openai", model="m", le="0.1") == 0
    assert value(m, f"{ttft}_bucket", api="openai", model="m", le="0.25") == 1
    assert value(m, f"{itl}_count", api="openai", model="m") == 4
    assert value(m, f"{itl}_sum", api="openai", model="m") == 0.0546875
    assert value(m, f"{itl}_bucket", api="openai", model="m", le="0.0075") == 0
    assert value(m, f"{itl}_bucket", api="openai", model="m", le="0.01") == 1
    assert value(m, f"{itl}_bucket", api="openai", model="m", le="0.015") == 1
    assert value(m, f"{itl}_bucket", api="openai", model="m", le="0.02") == 4
    assert value(m, "flock_request_duration_seconds_sum", api="openai", model="m") == 0.4296875
    assert value(m, "flock_generated_tokens_total", model="m") == 5
    assert value(m, "flock_prompt_tokens_total", model="m") == 7
    assert value(m, "flock_cached_prompt_tokens_total", model="m") == 3
    assert value(m, "flock_requests_total", api="openai", model="m", status="2xx") == 1


def test_buckets_span_the_documented_ranges() -> None:
    assert ITL_BUCKETS[0] == 0.001 and ITL_BUCKETS[-1] == 2.0
    assert TTFT_BUCKETS[0] == 0.01 and TTFT_BUCKETS[-1] == 60.0


def test_done_counts_once_and_the_context_manager_reports_failures() -> None:
    m = create_metrics(True)
    request = m.request("anthropic", "m")
    request.done(429)
    request.done(200)  # a second call (e.g. from a finally block) changes nothing
    assert value(m, "flock_requests_total", api="anthropic", model="m", status="4xx") == 1
    assert value(m, "flock_requests_total", api="anthropic", model="m", status="2xx") is None

    with pytest.raises(RuntimeError), m.request("ollama", "m"):
        raise RuntimeError("runner died")
    assert value(m, "flock_requests_total", api="ollama", model="m", status="5xx") == 1
    with m.request("ollama", "m") as request:
        request.done(499)  # the client went away: done() already said so
    assert value(m, "flock_requests_total", api="ollama", model="m", status="4xx") == 1


def test_status_class() -> None:
    assert status_class(200) == "2xx"
    assert status_class("503") == "5xx"
    assert status_class(499) == "4xx"
    assert status_class(42) == "other"
    assert status_class("teapot") == "other"


def test_runner_totals_become_increments_across_restarts() -> None:
    m = create_metrics(True)
    hits = "flock_prefix_cache_hits_total"
    m.observe_runner_stats("m", {"prefix_hits": 10, "prefix_misses": 4, "evictions": 0})
    m.observe_runner_stats("m", {"prefix_hits": 15, "prefix_misses": 4, "evictions": 2})
    assert value(m, hits, model="m") == 15
    assert value(m, "flock_kv_evictions_total", model="m") == 2
    # The runner died and its replacement counts from zero: 3 new hits, not -12.
    m.observe_runner_stats("m", {"prefix_hits": 3})
    assert value(m, hits, model="m") == 18
    # The agent knows about the restart before the next report: even a total above the old
    # one is all new.
    m.runner_restarted("m")
    m.observe_runner_stats("m", {"prefix_hits": 20})
    assert value(m, hits, model="m") == 38
    assert value(m, "flock_runner_restarts_total", model="m") == 1
    # Broken values are ignored rather than poisoning the counter.
    m.observe_runner_stats("m", {"prefix_hits": float("nan"), "prefix_misses": -1})
    assert value(m, hits, model="m") == 38
    assert value(m, "flock_prefix_cache_misses_total", model="m") == 4


def test_runner_gauges_sum_instances_and_compute_pressure() -> None:
    m = create_metrics(True)
    m.observe_runner_stats(
        "m", {"kv_used_bytes": 30, "kv_capacity_bytes": 100, "active": 2, "queued": 1}, "i0"
    )
    m.observe_runner_stats(
        "m",
        {"kv_used_bytes": 50, "kv_capacity_bytes": 100, "active": 1, "queued": 0,
         "decode_tokens_per_second": 42.5},
        "i1",
    )  # fmt: skip
    assert value(m, "flock_kv_cache_used_bytes", model="m") == 80
    assert value(m, "flock_kv_cache_capacity_bytes", model="m") == 200
    assert value(m, "flock_kv_cache_pressure_ratio", model="m") == pytest.approx(0.4)
    assert value(m, "flock_sequences_active", model="m") == 3
    assert value(m, "flock_sequences_queued", model="m") == 1
    assert value(m, "flock_decode_tokens_per_second", model="m", instance_id="i1") == 42.5
    # A snapshot that leaves keys out keeps the instance's earlier values.
    m.observe_runner_stats("m", {"queued": 4}, "i1")
    assert value(m, "flock_sequences_queued", model="m") == 5
    assert value(m, "flock_kv_cache_used_bytes", model="m") == 80

    m.forget_runner("m", "i1")
    assert value(m, "flock_kv_cache_used_bytes", model="m") == 30
    assert value(m, "flock_decode_tokens_per_second", model="m", instance_id="i1") is None
    m.forget_runner("m", "i0")
    assert value(m, "flock_kv_cache_used_bytes", model="m") is None
    assert value(m, "flock_kv_cache_pressure_ratio", model="m") is None
    m.forget_runner("never-seen", "x")  # harmless


def test_zero_capacity_reports_no_pressure() -> None:
    m = create_metrics(True)
    m.observe_runner_stats("m", {"kv_used_bytes": 0, "kv_capacity_bytes": 0})
    assert value(m, "flock_kv_cache_pressure_ratio", model="m") == 0


def test_label_values_from_outside_are_bounded() -> None:
    m = create_metrics(True)
    for i in range(MAX_MODEL_LABELS + 50):
        m.request("openai", f"random-{i}").done(404)
    models = {labels["model"] for labels in samples(m)["flock_requests_total"]}
    assert len(models) == MAX_MODEL_LABELS + 1
    assert "other" in models
    assert len(m._request_children) == MAX_MODEL_LABELS + 1  # the cache is bounded too

    m.request("grpc", "random-0").done(200)
    assert value(m, "flock_requests_total", api="other", model="random-0", status="2xx") == 1
    m.rejected("because")
    assert value(m, "flock_rejections_total", reason="other") == 1
    assert value(m, "flock_rejections_total", reason="too_long") == 0  # present from the start
    m.error("runner_crash")
    m.error("Traceback (most recent call last) ...")
    for i in range(100):
        m.error(f"kind_{i}")
    kinds = {labels["type"] for labels in samples(m)["flock_errors_total"]}
    assert "runner_crash" in kinds and "other" in kinds
    assert len(kinds) <= metrics_module.MAX_ERROR_KINDS + 1


def test_peers_and_placements_are_replaced_not_accumulated() -> None:
    m = create_metrics(True)
    m.set_peer_rtt("b", 0.002)
    m.set_peer_rtt("c", 0.004)
    m.forget_peer("c")
    m.forget_peer("never-seen")
    assert value(m, "flock_peer_rtt_seconds", peer="b") == 0.002
    assert value(m, "flock_peer_rtt_seconds", peer="c") is None

    m.set_placements(
        [PlacementRow("m", "i0", "a", 0, 0, 16), PlacementRow("m", "i0", "a", 1, 16, 30)]
    )
    m.set_placements([PlacementRow("m", "i1", "a", 0, 0, 30)])
    rows = samples(m)["flock_placement_info"]
    assert rows == [
        {"model": "m", "instance_id": "i1", "node": "a", "rank": "0", "layer_start": "0",
         "layer_end": "30"}
    ]  # fmt: skip


def test_build_and_memory() -> None:
    m = create_metrics(True)
    m.set_build_info("1.2.3", "metal", "accelerate")
    m.set_node_memory(64e9, 40e9)
    assert value(m, "flock_build_info", version="1.2.3", backend="metal", blas="accelerate") == 1
    assert value(m, "flock_node_memory_bytes", kind="available") == 40e9


def test_registries_are_independent() -> None:
    a, b = create_metrics(True), create_metrics(True)
    a.rejected("overloaded")
    assert value(a, "flock_rejections_total", reason="overloaded") == 1
    assert value(b, "flock_rejections_total", reason="overloaded") == 0
    assert a.content_type == "text/plain; version=0.0.4; charset=utf-8"


def test_null_metrics_override_every_public_method() -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")
        }

    real, null = public(FlockMetrics), public(NullMetrics)
    assert real == null  # same names, same signatures: a new method must get its no-op too


def test_disabled_metrics_do_nothing_cheaply() -> None:
    m = exercise_every_metric(create_metrics(False))
    assert isinstance(m, NullMetrics) and not m.enabled
    assert m.render() == b""
    request = m.request("openai", "m")
    assert request is m.request("anthropic", "x")  # one shared no-op, nothing allocated
    with request:
        request.tokens(3)
        request.done(200)
    start = time.perf_counter()
    for _ in range(100_000):
        request.tokens(1)
    # A no-op call costs tens of nanoseconds; 100k of them far below this even on a busy box.
    assert time.perf_counter() - start < 0.5
