"""The dashboard in a real headless Chromium against a live local 3-node cluster (loopback):
the page shows the nodes and a placement's layer ranges, places a pipeline (and /cluster
changes), streams a chat, turns a killed node dead; with API keys it asks for one and shows
nothing without it. Screenshots are saved (tests/ui_browser.py says where).

Skipped only when Chromium, its driver or selenium are missing (`.ci/run` / `make test` install
them from Debian's packages as root first).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster_tools import MODEL, LoopbackCluster, loopback_cluster, shared_models_dir
from tests.live_agent import wait_until
from tests.ui_browser import browser_missing, console_errors, screenshot, start_browser

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(browser_missing() is not None,
                                 reason=f"browser tests skipped: {browser_missing()}")]


@pytest.fixture(scope="module")
def models_dir(smollm2_dir: Path) -> Path:
    return shared_models_dir(smollm2_dir.parents[1] / "cluster-models", smollm2_dir)


@pytest.fixture(scope="module")
def cluster(models_dir: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[LoopbackCluster]:
    with loopback_cluster(tmp_path_factory.mktemp("ui"), models_dir) as c:
        c.discovery_interval_s = 0.5  # a killed node is declared dead within seconds
        for name in ("node0", "node1", "node2"):
            c.start(name)
        c.wait_up(120)
        yield c


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()


def js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def node_rows(driver: Any) -> dict[str, str]:
    """Node name -> status, as the page's node table shows them."""
    rows = js(driver, """return [...document.querySelectorAll('#nodes tbody tr')].map(
        r => [r.querySelector('th').textContent, r.dataset.status]);""")
    return {name.replace(" (leader)", ""): status for name, status in rows}


def test_page_shows_nodes_places_a_pipeline_and_draws_its_layers(
        cluster: LoopbackCluster, browser: Any) -> None:
    head = cluster.agents[0]
    browser.get(head.url + "/ui")
    wait_until(lambda: len(node_rows(browser)) == 3
               and set(node_rows(browser).values()) <= {"self", "alive"}, 30,
               "the page to show 3 live nodes", describe=lambda: str(node_rows(browser)))
    assert js(browser, "return document.querySelectorAll('#graph .graph-node').length") == 3

    # Place a pipeline over the three nodes from the page's form.
    ids = cluster.node_ids()
    js(browser, f"""
        document.getElementById('place-model').value = {MODEL!r};
        document.getElementById('place-strategy').value = 'pipeline';
        document.querySelectorAll('input[name=place-node]').forEach(b => b.checked = true);""")
    wait_until(lambda: js(browser, "return document.getElementById('place-model').value")
               == MODEL, 10, "the model list to fill")
    browser.find_element("css selector", "#place-form button[type=submit]").click()
    wait_until(lambda: "placed" in js(browser,
               "return document.getElementById('place-status').textContent"), 60,
               "the page to report the placement",
               describe=lambda: js(browser, "return document.getElementById('place-status')"
                                            ".textContent"))
    placement = cluster.wait_serving(head, nodes=3, strategy="pipeline", timeout=300)
    assert sorted(n for s in placement["stages"] for n in s["nodes"]) == sorted(ids.values())
    expected = sorted(f"{s['layer_start']}-{s['layer_stop'] - 1}" for s in placement["stages"])

    box = f'[data-instance="{placement["instance_id"]}"]'

    def drawn() -> bool:
        layers = js(browser, f"""return [...document.querySelectorAll(
            '{box} .stage')].map(s => s.dataset.layers);""")
        states = js(browser, f"""return [...document.querySelectorAll(
            '{box} .ranks span')].map(s => s.textContent);""")
        return sorted(layers) == expected and states == ["ready"] * 3

    wait_until(drawn, 30, "the page to draw the pipeline's layer ranges with ready ranks")
    screenshot(browser, "dashboard-pipeline")
    assert not console_errors(browser)
    # Every control is labelled (for screen readers and keyboard users).
    unlabelled = js(browser, """return [...document.querySelectorAll('input, select, textarea')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
        .map(e => e.id || e.outerHTML.slice(0, 60));""")
    assert unlabelled == []
    # Dark and light both: the toggle flips the theme the page is drawn in.
    before = js(browser, "return getComputedStyle(document.body).backgroundColor")
    browser.find_element("id", "theme").click()
    after = js(browser, "return getComputedStyle(document.body).backgroundColor")
    assert before != after
    screenshot(browser, "dashboard-theme-toggled")


def test_chat_streams_into_the_page(cluster: LoopbackCluster, browser: Any) -> None:
    cluster.wait_serving(cluster.agents[0], nodes=3, timeout=300)
    browser.get(cluster.agents[0].url + "/ui#chat")
    wait_until(lambda: js(browser, "return document.getElementById('chat-model').value")
               == MODEL, 20, "the chat's model list to fill")
    browser.find_element("id", "chat-send").click()
    lengths: set[int] = set()

    def finished() -> bool:
        text = js(browser, "return document.getElementById('chat-output').textContent")
        lengths.add(len(text))
        return "done" in js(browser, "return document.getElementById('chat-stats').textContent")

    wait_until(finished, 120, "the chat to finish", interval=0.05)
    text = js(browser, "return document.getElementById('chat-output').textContent")
    stats = js(browser, "return document.getElementById('chat-stats').textContent")
    assert len(text.split()) >= 3, text  # sampled at the API's default temperature
    assert "tok/s" in stats and "TTFT" in stats
    # Streamed: the page showed partial answers before the whole one.
    assert len([n for n in lengths if 0 < n < len(text)]) >= 2, lengths
    # The head's runner reports its figures: the live table shows the model with a rate.
    wait_until(lambda: MODEL in js(browser, "return document.querySelector('#figures tbody')"
                                            ".textContent"), 30, "live figures of the model")
    # The pipeline's stage view: every stage computed for the chat (busy seconds, as the
    # instance's head reports them in flock_stage_busy_seconds_total).
    busy = "return [...document.querySelectorAll('.stages .stage-busy')].map(s => +s.dataset.busyS)"
    wait_until(lambda: len(js(browser, busy)) == 3 and min(js(browser, busy)) > 0, 30,
               "the stage view to show every stage busy", describe=lambda: str(js(browser, busy)))
    screenshot(browser, "dashboard-chat")


def test_a_killed_node_turns_dead_on_the_page(cluster: LoopbackCluster, browser: Any) -> None:
    browser.get(cluster.agents[0].url + "/ui")
    wait_until(lambda: len(node_rows(browser)) == 3, 30, "3 nodes on the page")
    victim = cluster.agents[2]
    cluster.kill(victim)
    # Beacons every 0.5 s: suspect after 3 missed, dead soon after; allow for a loaded machine.
    wait_until(lambda: node_rows(browser).get(victim.name) == "dead", 30,
               f"{victim.name} dead on the page", describe=lambda: str(node_rows(browser)))
    screenshot(browser, "dashboard-dead-node")


def test_with_api_keys_the_page_asks_for_one_and_shows_nothing_without(
        models_dir: Path, tmp_path: Path, browser: Any) -> None:
    with loopback_cluster(tmp_path, models_dir) as keyed:
        keyed.api_key = "sekrit-key-1"
        agent = keyed.start("keyed0", extra=["--api-key", keyed.api_key])
        wait_until(lambda: keyed.status(agent), 60, "the keyed agent to answer")
        assert httpx.get(agent.url + "/ui/api/overview").status_code == 401
        browser.get(agent.url + "/ui")
        wait_until(lambda: js(browser, "return !document.getElementById('login').hidden"), 20,
                   "the page to ask for a key")
        assert js(browser, "return document.getElementById('main').hidden")
        assert "keyed0" not in browser.page_source
        screenshot(browser, "dashboard-key-prompt")
        browser.find_element("id", "key-input").send_keys("wrong")
        browser.find_element("css selector", "#key-form button").click()
        wait_until(lambda: "refused" in js(browser, "return document.getElementById('key-error')"
                                                    ".textContent"), 20, "a wrong key refused")
        assert "keyed0" not in browser.page_source
        browser.find_element("id", "key-input").send_keys(keyed.api_key)
        browser.find_element("css selector", "#key-form button").click()
        wait_until(lambda: "keyed0" in node_rows(browser), 20, "the node shown with the key")
        assert js(browser, "return sessionStorage.getItem('flock-key')") == keyed.api_key
