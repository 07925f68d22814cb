"""Test helpers for the observability and deploy files: real promtool/Prometheus, PromQL parsing.

`ensure_tool` installs Debian's `prometheus` package (promtool and the server) when it is missing
and apt can run; tests skip with the reason only where it cannot. `PrometheusServer` runs a real
Prometheus on loopback with a temporary config and answers queries through its HTTP API.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest


@functools.cache
def _install(package: str) -> str | None:
    """apt-get install the package once per test run; returns why not, or None on success."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    if os.geteuid() != 0:
        return "installing Debian packages needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # a fresh image has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return f"apt-get install {package} failed: {result.stderr.strip()[-300:]}"
    return None


def ensure_tool(name: str, package: str) -> str:
    """Path of a command-line tool, installing its Debian package if needed; else skip."""
    found = shutil.which(name)
    if found:
        return found
    reason = _install(package)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} unavailable ({reason or f'{package} has no {name}'})")
    return found


def ensure_promtool() -> str:
    return ensure_tool("promtool", "prometheus")


def ensure_prometheus() -> str:
    return ensure_tool("prometheus", "prometheus")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """A real Prometheus on 127.0.0.1, its config and data in `workdir`.

    `workdir` must already hold `prometheus.yml` (and whatever it refers to).
    """

    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        self.workdir = workdir
        self.binary = binary or ensure_prometheus()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._log = workdir / "prometheus.log"

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        log = self._log.open("wb")
        self._process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout}s: {self.log()}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def log(self) -> str:
        return self._log.read_text(errors="replace")[-2000:] if self._log.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data` of a successful answer, raises with the error."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (or scalar wrapped in a list)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data]

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until the query returns something."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result for {expr!r} in {timeout}s: {self.log()}")
            time.sleep(0.5)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- PromQL: which metrics and labels an expression names --------------------------------------

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
     "bool", "offset", "inf", "nan", "atan2"}
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(?<![\w.$:])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"(?<![\w.$:])([A-Za-z_:][\w:]*)\b(?!\s*\()")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords and labels left out)."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    return {m.group(1) for m in _IDENT.finditer(s) if m.group(1).lower() not in _KEYWORDS}


def promql_selector_labels(expr: str) -> dict[str, set[str]]:
    """metric name -> label names its selectors match on."""
    found: dict[str, set[str]] = {}
    for m in _SELECTOR.finditer(_STRING.sub('""', expr)):
        found.setdefault(m.group(1), set()).update(_MATCHER_LABEL.findall(m.group(2)))
    return found


def promql_grouping_labels(expr: str) -> set[str]:
    """Labels named in by/without/on/ignoring/group_* clauses."""
    labels: set[str] = set()
    for m in _GROUPING.finditer(_STRING.sub('""', expr)):
        labels.update(x.strip() for x in m.group(2).split(",") if x.strip())
    return labels


# -- Grafana dashboards -------------------------------------------------------------------------

GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$node": ".*",
    "$model": ".*",
}


def dashboard_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and query variable of a dashboard."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            yield f"annotation {annotation['name']!r}", annotation["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        # label_values(selector, label): the selector is the PromQL part.
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", query)
        yield f"variable {variable['name']!r}", m.group(1) if m else query


def substitute_grafana_variables(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


# -- a metrics registry with every family populated ---------------------------------------------


def exercise_every_metric(metrics: Any) -> Any:
    """Call every FlockMetrics method so each family has samples (names, labels, exposition)."""
    from agent.metrics import PlacementRow

    metrics.set_build_info("0.1.0", "cpu", "openblas")
    for api, status in (("openai", 200), ("anthropic", 200), ("ollama", 503)):
        request = metrics.request(api, "smollm2-135m")
        request.tokens(1)
        request.tokens(2)
        request.done(status, prompt_tokens=12, cached_tokens=8)
    metrics.rejected("overloaded")
    metrics.error("runner_crash")
    metrics.observe_runner_stats(
        "smollm2-135m",
        {
            "kv_used_bytes": 3e6, "kv_capacity_bytes": 4e6, "active": 2, "queued": 1,
            "prefix_hits": 5, "prefix_misses": 2, "evictions": 1,
            "decode_tokens_per_second": 80.0,
            "stage_busy_seconds_total_0": 1.5, "stage_busy_seconds_total_1": 1.2,
            "microbatches_in_flight": 2,
        },
    )  # fmt: skip
    metrics.runner_restarted("smollm2-135m")
    metrics.set_node_memory(16e9, 9e9)
    metrics.set_peer_rtt("node-b", 0.0012)
    metrics.set_placements([PlacementRow("smollm2-135m", "i0", "node-a", 0, 0, 30)])
    metrics.replica_routed("smollm2-135m", "i0", "soonest")
    metrics.replica_retried("smollm2-135m", "i0")
    metrics.set_replica_counts({"smollm2-135m": 2})
    metrics.replica_scaled("smollm2-135m", "add", "queue_wait")
    metrics.set_replica_loads([("smollm2-135m", "i0", {
        "running": 1.0, "queued": 0.0, "in_flight": 1.0, "outstanding_tokens": 40.0,
        "queue_wait_seconds": 0.0, "idle_seconds": 0.0, "requests": 3.0})])
    return metrics
