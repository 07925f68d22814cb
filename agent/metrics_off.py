"""Metrics switched off (`metrics_enabled = false`): a stand-in whose every method returns at
once, and `create_metrics`, which picks it or the real registry."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType

from prometheus_client import CollectorRegistry

from agent.metrics import FlockMetrics, PlacementRow, RequestMetrics


class _NullRequest(RequestMetrics):
    __slots__ = ()

    def __init__(self) -> None:  # no children, no clock: nothing is recorded
        pass

    def tokens(self, n: int = 1) -> None:
        pass

    def done(self, status: int | str, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        pass

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass


_NULL_REQUEST = _NullRequest()


class NullMetrics(FlockMetrics):
    """Metrics switched off: every method returns at once and nothing is allocated per call."""

    enabled = False

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)  # stays empty

    def request(self, api: str, model: str) -> RequestMetrics:
        return _NULL_REQUEST

    def rejected(self, reason: str) -> None:
        pass

    def error(self, kind: str) -> None:
        pass

    def observe_runner_stats(
        self, model: str, stats: Mapping[str, float], instance_id: str = "0"
    ) -> None:
        pass

    def runner_restarted(self, model: str, instance_id: str = "0") -> None:
        pass

    def forget_runner(self, model: str, instance_id: str = "0") -> None:
        pass

    def set_build_info(self, version: str, backend: str, blas: str) -> None:
        pass

    def set_node_memory(self, total_bytes: float, available_bytes: float) -> None:
        pass

    def set_peer_rtt(self, peer: str, seconds: float) -> None:
        pass

    def forget_peer(self, peer: str) -> None:
        pass

    def set_placements(self, rows: Iterable[PlacementRow]) -> None:
        pass

    def replica_routed(self, model: str, instance_id: str, reason: str) -> None:
        pass

    def replica_retried(self, model: str, instance_id: str) -> None:
        pass

    def replica_scaled(self, model: str, change: str, reason: str) -> None:
        pass

    def set_replica_counts(self, counts: Mapping[str, int]) -> None:
        pass

    def set_replica_loads(self, rows: Iterable[tuple[str, str, Mapping[str, float]]]) -> None:
        pass

    def render(self) -> bytes:
        return b""


def create_metrics(enabled: bool, clock: Callable[[], float] = time.perf_counter) -> FlockMetrics:
    """The node's metrics, or a do-nothing stand-in when `metrics_enabled` is off."""
    return FlockMetrics(clock) if enabled else NullMetrics(clock)
