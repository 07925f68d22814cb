"""deploy/: examples in sync, Prometheus config and alerts valid, dashboard queries real metrics.

The last test runs a real Prometheus with the shipped prometheus.yml and alerts.yml against a
loopback exporter serving flock's metrics, and runs every dashboard query on it.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_tools import (
    PrometheusServer,
    dashboard_expressions,
    ensure_prometheus,
    ensure_promtool,
    exercise_every_metric,
    promql_grouping_labels,
    promql_metric_names,
    promql_selector_labels,
    substitute_grafana_variables,
)

from agent.metrics import FlockMetrics
from agent.metrics_off import create_metrics
from agent.service import ScrapeTarget, example_files, prometheus_targets, write_prometheus_targets

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "flock.json"

# Series Prometheus itself adds to every target, and labels file_sd / scraping attach.
SYNTHETIC_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
TARGET_LABELS = {"job", "instance", "node", "cluster"}


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def alert_expressions() -> Iterator[tuple[str, str]]:
    text = (PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8")
    yaml = pytest.importorskip("yaml")
    for group in yaml.safe_load(text)["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]


def exported_series() -> dict[str, set[str]]:
    """Every series name a fully exercised registry exposes, with its label names."""
    metrics = exercise_every_metric(create_metrics(True))
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def all_expressions() -> list[tuple[str, str]]:
    return [*dashboard_expressions(load_dashboard()), *alert_expressions()]


# -- static checks -----------------------------------------------------------------------------


def test_deploy_examples_are_rendered_from_agent_service() -> None:
    for relative, text in example_files().items():
        shipped = (DEPLOY / relative).read_text(encoding="utf-8")
        assert shipped == text, f"deploy/{relative} is stale: run agent.service.write_examples"


def test_promql_parser_finds_metrics_and_labels() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(flock_x_bucket{node=~"$node", '
        'model="a{b}"}[5m]))) / on (model) group_left flock_y unless flock_z offset 1h > 1e3'
    )
    assert promql_metric_names(expr) == {"flock_x_bucket", "flock_y", "flock_z"}
    assert promql_selector_labels(expr) == {"flock_x_bucket": {"node", "model"}}
    assert promql_grouping_labels(expr) == {"le", "model"}


def test_dashboard_and_alerts_name_only_exported_metrics() -> None:
    series = exported_series()
    known = set(series) | SYNTHETIC_SERIES
    all_labels = set().union(*series.values()) | TARGET_LABELS
    checked = 0
    for where, expr in all_expressions():
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        unknown = names - known
        assert not unknown, f"{where} names metrics flock does not export: {sorted(unknown)}"
        for name, labels in promql_selector_labels(expr).items():
            allowed = series.get(name, set()) | TARGET_LABELS
            assert labels <= allowed, f"{where}: {name} has no label {sorted(labels - allowed)}"
        grouping = promql_grouping_labels(expr)
        assert grouping <= all_labels, f"{where}: unknown labels {sorted(grouping - all_labels)}"
        checked += 1
    assert checked >= 30


def test_dashboard_layout_and_datasource_wiring() -> None:
    yaml = pytest.importorskip("yaml")
    dashboard = load_dashboard()
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        mine = {(x, y) for x in xs for y in ys}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("tok/s", "first token", "inter-token", "kv cache pressure", "queued",
                  "errors", "memory", "round trip", "placements"):  # fmt: skip
        assert topic in titles, topic

    provisioning = DEPLOY / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "flock.yml").read_text())
    uid = source["datasources"][0]["uid"]
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == uid
    provider = yaml.safe_load((provisioning / "dashboards" / "flock.yml").read_text())
    assert provider["providers"][0]["type"] == "file"


def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = ensure_promtool()
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        result = subprocess.run(
            [promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """Each dashboard query, as a recording rule, through promtool's real PromQL parser."""
    promtool = ensure_promtool()
    rules = [
        {"record": f"flock:dashboard_check:{i}", "expr": substitute_grafana_variables(expr)}
        for i, (_, expr) in enumerate(dashboard_expressions(load_dashboard()))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- a real Prometheus -------------------------------------------------------------------------


class _Exporter:
    """Serves a FlockMetrics on loopback the way the agent's /metrics does."""

    def __init__(self, metrics: FlockMetrics) -> None:
        outer = metrics

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = outer.render()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", outer.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Exporter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _traffic(metrics: FlockMetrics, stop: threading.Event) -> None:
    """Requests and runner reports while Prometheus scrapes, so rates are not all zero."""
    hits = 0
    while not stop.is_set():
        request = metrics.request("openai", "smollm2-135m")
        for _ in range(5):
            request.tokens(1)
        request.done(200, prompt_tokens=20, cached_tokens=10)
        hits += 1
        metrics.observe_runner_stats(
            "smollm2-135m",
            {"kv_used_bytes": 2e6, "kv_capacity_bytes": 4e6, "active": 1, "queued": 0,
             "prefix_hits": hits, "prefix_misses": hits // 2, "evictions": hits // 5},
        )  # fmt: skip
        stop.wait(0.1)


def test_real_prometheus_scrapes_flock_with_the_shipped_config(tmp_path: Path) -> None:
    ensure_prometheus()
    metrics = exercise_every_metric(create_metrics(True))
    stop = threading.Event()
    traffic = threading.Thread(target=_traffic, args=(metrics, stop), daemon=True)

    config = (PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8")
    fast, replaced = re.subn(r"(scrape_interval|evaluation_interval): 15s", r"\1: 1s", config)
    assert replaced == 2
    (tmp_path / "prometheus.yml").write_text(fast, encoding="utf-8")
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")

    with _Exporter(metrics) as exporter:
        write_prometheus_targets(
            tmp_path / "targets.json",
            prometheus_targets([ScrapeTarget("node-a", "127.0.0.1", exporter.port)]),
        )
        traffic.start()
        try:
            with PrometheusServer(tmp_path) as prometheus:
                _check_scrape(prometheus)
        finally:
            stop.set()
            traffic.join()


def _check_scrape(prometheus: PrometheusServer) -> None:
    prometheus.wait_for('count_over_time(up{job="flock"}[1m]) >= 4', timeout=60)
    up = prometheus.query('up{job="flock"}')
    assert [s["value"][1] for s in up] == ["1"], up

    # The file_sd label names the node on every series; the metric's own `node` label
    # (placement) is honoured, not renamed to exported_node.
    (build,) = prometheus.query("flock_build_info")
    assert build["metric"]["node"] == "node-a"
    assert build["metric"]["version"] == "0.1.0"
    (placement,) = prometheus.query("flock_placement_info")
    assert placement["metric"]["node"] == "node-a"
    assert "exported_node" not in placement["metric"]

    tokens = prometheus.query("sum(rate(flock_generated_tokens_total[1m]))")
    assert float(tokens[0]["value"][1]) > 0

    # Every dashboard query runs on the real engine and finds series to draw.
    for where, expr in dashboard_expressions(load_dashboard()):
        if where.startswith("annotation"):
            continue  # an annotation query is empty until something happens
        result = prometheus.query(substitute_grafana_variables(expr))
        assert result, f"{where}: no data for {expr}"

    # The alert rules load and evaluate without errors.
    deadline = time.monotonic() + 30
    while True:
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule["health"] == "ok" for rule in rules):
            break
        assert time.monotonic() < deadline, f"rules not healthy: {rules}"
        time.sleep(0.5)
    assert len(rules) == 6
