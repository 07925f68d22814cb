"""A real agent, scraped by a real Prometheus: the metrics flock ships work end to end.

One `python -m agent run` (a tiny random model from its own store, discovery off so it stays a
one-node cluster whatever else runs on the machine) answers one chat request. Then:

- a real Prometheus, started with the shipped prometheus.yml and alerts.yml (intervals cut to 1s)
  and the target list `flock prometheus targets` prints, returns the request's generated tokens
  through its query API;
- the agent's own /metrics passes `promtool check metrics`, without even lint notes;
- every metric the Grafana dashboard's PromQL names is in the agent's exposition (the link
  round trip, which needs a peer, on two agents of a cluster of their own).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from deploy_tools import (
    PrometheusServer,
    dashboard_expressions,
    ensure_prometheus,
    ensure_promtool,
    promql_metric_names,
)
from live_agent import running_agent
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "flock.json"
# Series Prometheus itself makes for every target; the agent does not export them.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
MODEL = "tiny-prom"
MAX_TOKENS = 8

# Dashboard metrics a lone node cannot export: a round trip needs a peer, and this node runs
# with discovery off (so that other agents on this machine cannot join it). The dashboard test
# leaves them out; the two-node test at the end checks them. Every other dashboard metric must
# be present after one request.
# Metrics only a node with peers exports: link round trips, and a pipeline head's stages.
NEEDS_PEERS = {"flock_peer_rtt_seconds", "flock_stage_busy_seconds_total",
               "flock_pipeline_microbatches_in_flight"}

# Runner snapshots arrive about once a second; metrics fed by them appear after the first one.
EXPOSITION_WAIT_S = 20.0


@dataclass
class Agent:
    url: str
    port: int
    state_dir: Path
    completion_tokens: int

    def metrics_text(self) -> str:
        response = httpx.get(f"{self.url}/metrics", timeout=10)
        assert response.status_code == 200, response.text
        return response.text


def _exposed_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@contextlib.contextmanager
def _running_agent(
    state: Path, args: Sequence[str], env: Mapping[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """`python -m agent run` on loopback with its own state, port and data ports until the
    block ends; yields (url, port) once it is ready. Stops only the process it started."""
    with running_agent(state, model=None, args=["--metrics", *args], env=env) as agent:
        yield agent.url, agent.port


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    from tiny_models import make_tiny_model

    from agent.models.store import ModelStore

    state = tmp_path_factory.mktemp("prom-agent")
    ModelStore(state / "models").add(MODEL, lambda d: make_tiny_model(d, seed=7), source="test")
    with _running_agent(state, ["--model", MODEL, "--no-discovery"]) as (url, port):
        reply = httpx.post(
            f"{url}/v1/chat/completions", timeout=120,
            json={"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0,
                  "messages": [{"role": "user", "content": "Count to ten."}]},
        )
        assert reply.status_code == 200, reply.text
        completion_tokens = reply.json()["usage"]["completion_tokens"]
        assert 1 <= completion_tokens <= MAX_TOKENS
        yield Agent(url, port, state, completion_tokens)


def test_real_prometheus_reads_the_agents_token_counter(agent: Agent, tmp_path: Path) -> None:
    ensure_prometheus()
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8")
    fast, replaced = re.subn(r"(scrape_interval|evaluation_interval): 15s", r"\1: 1s", config)
    assert replaced == 2
    (tmp_path / "prometheus.yml").write_text(fast, encoding="utf-8")
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    # The target list as a user makes it: `flock prometheus targets` asks the running node.
    targets = subprocess.run(
        [sys.executable, "-m", "agent", "prometheus", "targets", "--url", agent.url],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert targets.returncode == 0, targets.stderr
    assert f"127.0.0.1:{agent.port}" in targets.stdout, targets.stdout
    (tmp_path / "targets.json").write_text(targets.stdout, encoding="utf-8")

    with PrometheusServer(tmp_path) as prometheus:
        prometheus.wait_for('up{job="flock"} == 1', timeout=60)
        result = prometheus.wait_for("sum(flock_generated_tokens_total) > 0", timeout=60)
        # Exactly the tokens the one request generated, by this node and model.
        assert float(result[0]["value"][1]) == agent.completion_tokens
        (series,) = prometheus.query(f'flock_generated_tokens_total{{model="{MODEL}"}}')
        assert series["metric"]["job"] == "flock"
        assert series["metric"]["node"]  # file_sd's node id label
        (requests,) = prometheus.query('flock_requests_total{api="openai",status="2xx"}')
        assert float(requests["value"][1]) == 1
        ttft = prometheus.query("sum(flock_time_to_first_token_seconds_count)")
        assert float(ttft[0]["value"][1]) == 1


def test_agent_metrics_pass_promtool_check_metrics(agent: Agent) -> None:
    promtool = ensure_promtool()
    exposition = httpx.get(f"{agent.url}/metrics", timeout=10)
    assert exposition.status_code == 200
    assert exposition.headers["content-type"].startswith("text/plain; version=0.0.4")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition.content, capture_output=True,
        timeout=60,
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, output
    assert output.strip() == "", output  # not even lint notes


def _dashboard_metrics() -> set[str]:
    names: set[str] = set()
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for _, expr in dashboard_expressions(dashboard):
        names |= promql_metric_names(expr)
    return names - PROMETHEUS_SERIES


def test_every_dashboard_metric_is_exported_by_a_running_agent(agent: Agent) -> None:
    wanted = _dashboard_metrics()
    assert len(wanted) >= 20
    assert wanted >= NEEDS_PEERS  # the exemption names metrics the dashboard really uses
    deadline = time.monotonic() + EXPOSITION_WAIT_S
    while True:
        missing = wanted - _exposed_names(agent.metrics_text()) - NEEDS_PEERS
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, (
        f"the dashboard names metrics a running agent does not export: {sorted(missing)}"
    )


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_nodes_export_their_link_round_trips(tmp_path: Path) -> None:
    """The metrics the single node above cannot have: two agents of a cluster of their own
    (a unique name and discovery port, so no other test's agents join) find each other on
    loopback and each exports its round trip to the other."""
    env = {
        "FLOCK_CLUSTER_NAME": f"prom{os.getpid()}{secrets.token_hex(3)}",
        "FLOCK_DISCOVERY_PORT": str(_free_udp_port()),
        "FLOCK_DISCOVERY_INTERVAL_S": "0.5",
        "FLOCK_MODEL": "",  # no model, no runners: this is about the nodes' links
    }
    with contextlib.ExitStack() as stack:
        urls = {
            name: stack.enter_context(
                _running_agent(tmp_path / name, ["--node-name", name], env)
            )[0]
            for name in ("node-a", "node-b")
        }
        deadline = time.monotonic() + 60
        while True:
            peers = {
                name: {
                    s.labels["peer"]: s.value
                    for family in text_string_to_metric_families(
                        httpx.get(f"{url}/metrics", timeout=10).text)
                    for s in family.samples if s.name in NEEDS_PEERS
                }
                for name, url in urls.items()
            }
            if (peers["node-a"].keys() == {"node-b"} and peers["node-b"].keys() == {"node-a"}) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert peers["node-a"].keys() == {"node-b"}, peers
    assert peers["node-b"].keys() == {"node-a"}, peers
    for rtts in peers.values():
        assert all(0 < rtt < 5 for rtt in rtts.values()), peers
