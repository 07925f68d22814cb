"""The dashboard's server side without a browser: its figures as pure functions over a real
metrics registry, and one real agent (no model) for the routes' rules: `/` for browsers and for
heartbeats, static files, admin calls with a foreign Origin refused, the agent-to-agent live
figures signed, and with API keys nothing readable without one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.api.ui_figures import load_figures, model_figures, quantile, stage_figures
from agent.cluster.auth import secret_from_key
from agent.cluster.peers import signed_headers
from agent.metrics_off import create_metrics
from tests.cluster_tools import Agent, LoopbackCluster, loopback_cluster
from tests.live_agent import wait_until

KEY = "ui-test-key"


def test_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (float("inf"), 20.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.5)
    assert quantile(buckets, 0.25) == pytest.approx(0.3)
    assert quantile(buckets, 0.95) == pytest.approx(0.95)
    assert quantile([], 0.5) is None
    assert quantile([(1.0, 0.0), (float("inf"), 0.0)], 0.5) is None
    # Everything above the last finite bound: that bound is all that is known.
    assert quantile([(1.0, 0.0), (float("inf"), 4.0)], 0.5) == 1.0


def test_model_figures_from_a_real_registry() -> None:
    metrics = create_metrics(enabled=True)
    metrics.observe_runner_stats("m", {"kv_used_bytes": 100, "kv_capacity_bytes": 1000,
                                       "active": 2, "queued": 1, "prefix_hits": 3,
                                       "prefix_misses": 1, "decode_tokens_per_second": 12.5},
                                 "api-m-0/0")
    for ttft in (0.05, 0.2, 0.2, 0.3):
        metrics.time_to_first_token.labels("openai", "m").observe(ttft)
    figures = model_figures(metrics.registry.collect())["m"]
    assert figures["decode_tps"] == 12.5
    assert (figures["active"], figures["queued"]) == (2, 1)
    assert (figures["kv_used_bytes"], figures["kv_capacity_bytes"]) == (100, 1000)
    assert figures["prefix_hit_rate"] == pytest.approx(0.75)
    assert 0.05 <= figures["ttft_p50_s"] <= 0.3
    assert figures["ttft_p50_s"] <= figures["ttft_p95_s"]
    assert model_figures([]) == {}


def test_stage_figures_follow_a_pipeline_heads_reports() -> None:
    metrics = create_metrics(enabled=True)
    report = {"stage_busy_seconds_total_0": 1.5, "stage_busy_seconds_total_1": 1.0,
              "microbatches_in_flight": 2.0}
    metrics.observe_runner_stats("m", report, "api-m-0/0")
    metrics.observe_runner_stats("m", {**report, "stage_busy_seconds_total_1": 2.5},
                                 "api-m-0/0")
    figures = stage_figures(metrics.registry.collect())["api-m-0/0"]
    assert figures == {"busy_s": {"0": 1.5, "1": 2.5}, "in_flight": 2.0}
    # A runner restarted counts from zero again: its new total is all increase.
    metrics.runner_restarted("m", "api-m-0/0")
    metrics.observe_runner_stats("m", {"stage_busy_seconds_total_0": 0.5}, "api-m-0/0")
    assert stage_figures(metrics.registry.collect())["api-m-0/0"]["busy_s"]["0"] == 2.0
    metrics.forget_runner("m", "api-m-0/0")
    assert stage_figures(metrics.registry.collect()) == {}
    # Bad stage labels are not series.
    metrics.observe_runner_stats("m", {"stage_busy_seconds_total_x": 1.0}, "i")
    assert stage_figures(metrics.registry.collect()) == {}


def test_load_figures_report_load_and_a_busy_fraction_after_two_calls() -> None:
    first = load_figures(now=time.monotonic())
    assert len(first["load_avg"]) == 3 and first["cpu_count"] >= 1
    second = load_figures(now=time.monotonic() + 1.0)
    assert second["runner_busy"] is None or 0.0 <= second["runner_busy"] <= 1.0


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, Agent, Agent]]:
    """(open mode, keys-only mode, secret mode without keys) agents, no model."""
    root = tmp_path_factory.mktemp("ui-routes")
    spec = root / "secret.toml"
    spec.write_text('[cluster]\nname = "ui-secret"\nsecret = "a-cluster-secret"\n')
    with loopback_cluster(root, root / "models") as open_cluster, \
            loopback_cluster(root / "k", root / "models") as keyed_cluster, \
            loopback_cluster(root / "s", root / "models") as secret_cluster:
        opened = open_cluster.start("open0")
        keyed = keyed_cluster.start("keyed0", extra=["--api-key", KEY])
        secret = secret_cluster.start("secret0", cluster_file=spec)
        for cluster, agent in ((open_cluster, opened), (keyed_cluster, keyed),
                               (secret_cluster, secret)):
            _wait_answering(cluster, agent)
        yield opened, keyed, secret


def _wait_answering(cluster: LoopbackCluster, agent: Agent) -> None:
    def up() -> bool:
        try:
            return httpx.get(agent.url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 60, f"{agent.name} to answer", describe=agent.log_tail)


def test_root_serves_the_page_to_browsers_and_the_heartbeat_to_everyone_else(
        agents: tuple[Agent, Agent, Agent]) -> None:
    opened, _, _ = agents
    page = httpx.get(opened.url + "/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/ui/static/app.js" in page.text
    beat = httpx.get(opened.url + "/")
    assert beat.text == "flock is running"
    assert httpx.head(opened.url + "/").status_code == 200
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        asset = httpx.get(opened.url + f"/ui/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    assert httpx.get(opened.url + "/ui/static/secret.txt").status_code == 404


def test_admin_calls_with_a_foreign_origin_are_refused(agents: tuple[Agent, Agent, Agent]) -> None:
    opened, keyed, _ = agents
    evil = {"Origin": "http://evil.example"}
    for agent, auth in ((opened, {}), (keyed, {"Authorization": f"Bearer {KEY}"})):
        placed = httpx.post(agent.url + "/cluster/instances", json={"model": "nope"},
                            headers={**evil, **auth})
        assert placed.status_code == 403, placed.text
        assert "Origin" in placed.json()["error"]["message"]
        assert httpx.delete(agent.url + "/cluster/instances/x",
                            headers={**evil, **auth}).status_code == 403
        assert httpx.delete(agent.url + "/ui/api/models/x",
                            headers={**evil, **auth}).status_code == 403
        assert httpx.post(agent.url + "/ui/api/pull", json={"name": "x"},
                          headers={"Origin": "null", **auth}).status_code == 403
        # The page's own origin passes the Origin check (and then the API's rules apply).
        same = {"Origin": agent.url, **auth}
        assert httpx.delete(agent.url + "/cluster/instances/x", headers=same).status_code == 404


def test_with_api_keys_nothing_is_readable_without_one(agents: tuple[Agent, Agent, Agent]) -> None:
    _, keyed, _ = agents
    auth = httpx.get(keyed.url + "/ui/api/auth").json()
    assert auth["keys_required"] and not auth["key_ok"] and auth["admin"] == "key"
    assert "keyed0" not in httpx.get(keyed.url + "/ui/api/auth").text
    for path in ("/ui/api/overview", "/cluster"):
        assert httpx.get(keyed.url + path).status_code == 401
        assert httpx.get(keyed.url + path,
                         headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(keyed.url + "/ui/api/doctor").status_code == 401
    good = httpx.get(keyed.url + "/ui/api/overview", headers={"Authorization": f"Bearer {KEY}"})
    assert good.status_code == 200
    body = good.json()
    assert body["status"]["nodes"][0]["name"] == "keyed0"
    assert body["auth"]["admin"] == "key"
    assert body["status"]["node_id"] in body["live"]


def test_live_figures_are_agent_to_agent_and_signed(agents: tuple[Agent, Agent, Agent]) -> None:
    opened, keyed, _ = agents
    assert httpx.get(opened.url + "/ui/api/live").status_code == 200  # open mode: anyone
    # Keys-only mode: members sign with the secret derived from the first key.
    assert httpx.get(keyed.url + "/ui/api/live").status_code == 401
    wrong = signed_headers(secret_from_key("another-key"), "peer", "GET", "/ui/api/live", b"")
    assert httpx.get(keyed.url + "/ui/api/live", headers=wrong).status_code == 401
    right = signed_headers(secret_from_key(KEY), "peer", "GET", "/ui/api/live", b"")
    answer = httpx.get(keyed.url + "/ui/api/live", headers=right)
    assert answer.status_code == 200 and "load" in answer.json()


def test_open_mode_admin_rule_is_loopback(agents: tuple[Agent, Agent, Agent]) -> None:
    opened, _, _ = agents
    auth = httpx.get(opened.url + "/ui/api/auth").json()
    assert (auth["mode"], auth["admin"], auth["keys_required"]) == ("open", "loopback", False)


def test_static_files_are_package_data() -> None:
    from importlib import resources

    text = Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text()
    assert '"**/*.js"' in text and '"**/*.css"' in text
    for name in ("index.html", "app.js", "app.css"):
        assert resources.files("agent.ui").joinpath(name).is_file()


def test_shard_transfers_in_flight_are_seen_from_their_staging_files(tmp_path: Path) -> None:
    from agent.api.ui_transfers import in_flight, rate_line
    from agent.models.arch import LayerRange
    from agent.models.shards import shard_dir

    target = shard_dir(tmp_path, "smollm2-135m", LayerRange(10, 20), embeds=False,
                       projects=False)
    staging = target.parent / f".{target.name}.part-1234"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"\0" * 3_000_000)
    target.mkdir()  # an installed shard beside it is not in flight
    [transfer] = in_flight(tmp_path)
    assert (transfer["model"], transfer["layers"], transfer["bytes"]) == \
        ("smollm2-135m", "10-20", 3_000_000)
    line = rate_line(transfer, now=transfer["started"] + 2)
    assert "3.0 MB" in line and "1.5 MB/s" in line
    assert in_flight(tmp_path / "nothing") == []


def test_status_command_reads_the_node_and_its_transfers(agents: tuple[Agent, Agent, Agent],
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    from agent.cli import main

    opened, _, _ = agents
    assert main(["status", "--url", opened.url]) == 0
    out = capsys.readouterr().out
    assert "open0" in out and "transfer on" not in out
    live = httpx.get(opened.url + "/ui/api/overview").json()["live"]
    assert all(figures["transfers"] == [] for figures in live.values())


def test_secret_mode_without_keys_disables_admin_actions_with_a_note(
        agents: tuple[Agent, Agent, Agent]) -> None:
    _, _, secret = agents
    auth = httpx.get(secret.url + "/ui/api/auth").json()
    assert (auth["mode"], auth["admin"]) == ("secret", "disabled")
    assert "--api-key" in auth["note"]
    refused = httpx.post(secret.url + "/ui/api/pull", json={"name": "smollm2-135m"})
    assert refused.status_code == 401


def test_pull_and_remove_from_the_page_report_errors(agents: tuple[Agent, Agent, Agent]) -> None:
    opened, _, _ = agents
    with httpx.stream("POST", opened.url + "/ui/api/pull", json={"name": "no-such-model"},
                      headers={"Origin": opened.url}) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert "unknown model" in lines[-1]["error"]
    assert httpx.delete(opened.url + "/ui/api/models/no-such-model").status_code == 404
    assert httpx.post(opened.url + "/ui/api/pull", content=b"{").status_code == 400


def test_flock_run_logs_transfers_in_flight(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import logging

    from agent.api.ui_transfers import log_transfers

    staging = tmp_path / ".shards" / "m-12345678" / ".0-10-e.part-99"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"\0" * 2_000_000)

    async def briefly() -> None:
        task = asyncio.create_task(log_transfers(tmp_path, interval=0.01))
        await asyncio.sleep(0.2)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="flock.shards"):
        asyncio.run(briefly())
    assert any("fetching m layers 0-10-e from a peer: 2.0 MB" in r.getMessage()
               for r in caplog.records)
