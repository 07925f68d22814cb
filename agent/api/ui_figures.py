"""The dashboard's live figures of one node: read from the node's own metrics registry (what its
runners last reported and what its requests recorded) and, for load, from the OS.

Pure reading: nothing here records anything. With metrics switched off the model figures are
empty; load is there either way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

# Runner CPU seconds by pid at the last call, to turn totals into a busy fraction of wall time.
_last_cpu: dict[str, tuple[float, float]] = {}


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a cumulative histogram [(upper bound, count <= bound)], linearly
    interpolated inside its bucket, as Prometheus' histogram_quantile does; None when empty."""
    if not buckets:
        return None
    buckets = sorted(buckets)
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound  # the highest finite bound is all that is known
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def model_figures(families: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Per model: decode tok/s (sum over its instances here), TTFT p50/p95 in seconds (since
    the node started), queued and active sequences, KV used and capacity bytes, prefix hits and
    misses, generated tokens; from prometheus_client metric families."""
    out: dict[str, dict[str, Any]] = {}
    ttft: dict[str, dict[float, float]] = {}

    def row(model: str) -> dict[str, Any]:
        return out.setdefault(model, {"decode_tps": 0.0, "ttft_p50_s": None, "ttft_p95_s": None,
                                      "queued": 0.0, "active": 0.0, "kv_used_bytes": 0.0,
                                      "kv_capacity_bytes": 0.0, "prefix_hits": 0.0,
                                      "prefix_misses": 0.0, "generated_tokens": 0.0})

    simple = {
        "flock_decode_tokens_per_second": "decode_tps",
        "flock_sequences_queued": "queued",
        "flock_sequences_active": "active",
        "flock_kv_cache_used_bytes": "kv_used_bytes",
        "flock_kv_cache_capacity_bytes": "kv_capacity_bytes",
        "flock_prefix_cache_hits_total": "prefix_hits",
        "flock_prefix_cache_misses_total": "prefix_misses",
        "flock_generated_tokens_total": "generated_tokens",
    }
    for family in families:
        for sample in family.samples:
            model = sample.labels.get("model")
            if model is None:
                continue
            if sample.name in simple:
                row(model)[simple[sample.name]] += float(sample.value)
            elif sample.name == "flock_time_to_first_token_seconds_bucket":
                bound = float(sample.labels["le"])
                by_bound = ttft.setdefault(model, {})
                by_bound[bound] = by_bound.get(bound, 0.0) + float(sample.value)
    for model, by_bound in ttft.items():
        buckets = sorted(by_bound.items())
        row(model)["ttft_p50_s"] = quantile(buckets, 0.5)
        row(model)["ttft_p95_s"] = quantile(buckets, 0.95)
    for figures in out.values():
        asked = figures["prefix_hits"] + figures["prefix_misses"]
        figures["prefix_hit_rate"] = figures["prefix_hits"] / asked if asked else None
    return out


def stage_figures(families: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Per pipeline head runner here (by its key, instance/rank): each stage's busy seconds so
    far (by stage index, 0 the head) and its micro-batches in flight, from
    flock_stage_busy_seconds_total and flock_pipeline_microbatches_in_flight. The page turns
    busy seconds into a busy fraction."""
    out: dict[str, dict[str, Any]] = {}

    def row(instance: str) -> dict[str, Any]:
        return out.setdefault(instance, {"busy_s": {}, "in_flight": None})

    for family in families:
        for sample in family.samples:
            instance = sample.labels.get("instance_id")
            if instance is None:
                continue
            if sample.name == "flock_stage_busy_seconds_total":
                row(instance)["busy_s"][sample.labels["stage"]] = float(sample.value)
            elif sample.name == "flock_pipeline_microbatches_in_flight":
                row(instance)["in_flight"] = float(sample.value)
    return out


def _children_cpu_s(parent: int) -> dict[str, float]:
    """CPU seconds (user + system) of each direct child of `parent` (its runners), from /proc;
    empty where there is no /proc (macOS)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, float] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces
        if len(fields) > 12 and int(fields[1]) == parent:
            out[entry] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def load_figures(now: float | None = None) -> dict[str, Any]:
    """The machine's load averages and the runners' busy fraction of wall time since the last
    call (CPU seconds of this agent's child processes per wall second and runner; None the
    first time)."""
    now = time.monotonic() if now is None else now
    try:
        load1, load5, load15 = os.getloadavg()
    except OSError:
        load1 = load5 = load15 = 0.0
    cpu = _children_cpu_s(os.getpid())
    busy: float | None = None
    fractions = []
    for pid, seconds in cpu.items():
        last = _last_cpu.get(pid)
        if last is not None and now > last[1]:
            fractions.append(max(0.0, (seconds - last[0]) / (now - last[1])))
    if fractions:
        busy = min(1.0, sum(fractions) / len(fractions))
    _last_cpu.clear()
    _last_cpu.update({pid: (seconds, now) for pid, seconds in cpu.items()})
    return {"load_avg": [load1, load5, load15], "cpu_count": os.cpu_count() or 1,
            "runner_busy": busy, "runners": len(cpu)}


def versions() -> dict[str, str | None]:
    """flock's and MLX's versions here (MLX's from its distribution: the agent never imports
    it), so `flock doctor` can compare nodes."""
    import importlib.metadata

    from agent import __version__

    try:
        mlx: str | None = importlib.metadata.version("mlx")
    except importlib.metadata.PackageNotFoundError:
        mlx = None
    return {"flock": __version__, "mlx": mlx}


def node_figures(metrics: Any) -> dict[str, Any]:
    """Everything the dashboard shows live for this node."""
    families = list(metrics.registry.collect()) if getattr(metrics, "enabled", False) else []
    return {"models": model_figures(families), "stages": stage_figures(families),
            "load": load_figures(), "versions": versions(),
            "metrics": bool(getattr(metrics, "enabled", False)), "time": time.time()}
