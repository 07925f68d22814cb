"""Dashboard and doctor figures of the dashboard issue, on this machine with loopback agents.

    .venv/bin/python -m bench.dashboard [--rounds 5] [--tokens 128] [--quick]

Prints `name: value` lines:
  dashboard_first_paint_ms  headless Chromium (warm browser, cache cleared before each load):
                            navigation start to the page's `flock-nodes-3` performance mark
                            (3 nodes drawn), median of the rounds (target <= 1000)
  dashboard_bytes           bytes transferred (navigation + resources, transferSize) up to that
                            first paint, i.e. until the page is first idle (target <= 500000)
  dashboard_decode_cost     one stream's decode tok/s with 3 dashboards open and polling / with
                            none; Chromium pinned to another core than the runner (taskset),
                            interleaved rounds, medians (target >= 0.95)
  doctor_s                  `flock doctor` wall time against the healthy 3-node cluster, median
                            of 3 (target <= 5)
Three agents on loopback (one BLAS thread each, discovery on loopback, a cluster named for this
run); SmolLM2 placed on the first node only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import bench_models, chat_body, emit, stream_chat, warn_if_busy  # noqa: E402
from tests.cluster_tools import MODEL, LoopbackCluster  # noqa: E402
from tests.live_agent import runner_pids, wait_until  # noqa: E402
from tests.ui_browser import CHROMIUM, DRIVER, browser_missing  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
BROWSER_FLAGS = ["--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                 "--disable-backgrounding-occluded-windows"]


def pinned_chromium(core: int, tmp: Path) -> Path:
    """A wrapper that starts Chromium under `taskset -c core` (its children inherit it)."""
    chromium = next(p for n in CHROMIUM if (p := shutil.which(n)))
    wrapper = tmp / "chromium-pinned"
    wrapper.write_text(f'#!/bin/sh\nexec taskset -c {core} {chromium} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def first_paint(driver: Any, url: str) -> tuple[float, int]:
    """(ms from navigation to 3 nodes drawn, bytes transferred until then), empty cache."""
    driver.execute_cdp_cmd("Network.clearBrowserCache", {})
    driver.get("about:blank")
    driver.get(url)
    mark = wait_until(lambda: driver.execute_script(
        "const m = performance.getEntriesByName('flock-nodes-3'); "
        "return m.length ? m[0].startTime : null;"), 30, "3 nodes drawn", interval=0.05)
    size = driver.execute_script("""
        const t = arguments[0];
        const nav = performance.getEntriesByType('navigation')[0];
        let bytes = nav ? nav.transferSize : 0;
        for (const r of performance.getEntriesByType('resource'))
            if (r.startTime <= t) bytes += r.transferSize;
        return bytes;""", mark)
    return float(mark), int(size)


def decode_tps(url: str, tokens: int) -> float:
    with httpx.Client(base_url=url, timeout=300, trust_env=False) as client:
        timing = stream_chat(client, chat_body(MODEL, PROMPT, tokens))
    if timing.tokens < 2:
        raise RuntimeError(f"too few tokens streamed ({timing.tokens})")
    return timing.decode_tok_s


def doctor_seconds(url: str, runs: int = 3) -> float:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLOCK_")},
           "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "agent", "doctor", "--url", url,
                        "--discovery-interface", "127.0.0.1/8"], cwd=ROOT, env=env,
                       capture_output=True, timeout=120, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 64 tokens")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens = 3, 64
    missing = browser_missing()
    if missing:
        print(f"bench.dashboard: {missing}", file=sys.stderr)
        return 2
    warn_if_busy()
    models_dir, _ = bench_models()
    with tempfile.TemporaryDirectory(prefix="flock-bench-ui-") as tmp_name:
        tmp = Path(tmp_name)
        cluster = LoopbackCluster(root=tmp, models_dir=models_dir)
        try:
            agents = [cluster.start(f"n{i}") for i in range(3)]
            cluster.wait_up(120)
            head = agents[0]
            ids = cluster.node_ids()
            placed = httpx.post(head.url + "/cluster/instances", timeout=60,
                                json={"model": MODEL, "nodes": [ids["n0"]]})
            placed.raise_for_status()
            cluster.wait_serving(head, nodes=1, timeout=300)
            cores = os.sched_getaffinity(0)
            runner_core, browser_core = min(cores), max(cores)
            for pid in runner_pids(head.pid):
                subprocess.run(["taskset", "-a", "-p", "-c", str(runner_core), str(pid)],
                               capture_output=True, check=False)
            driver = _pinned_browser(browser_core, tmp)
            try:
                url = head.url + "/ui"
                first_paint(driver, url)  # warm the browser
                paints = [first_paint(driver, url) for _ in range(args.rounds)]
                emit("dashboard_first_paint_ms", statistics.median(p[0] for p in paints), 0)
                emit("dashboard_bytes", int(statistics.median(p[1] for p in paints)), 0)
                decode_tps(head.url, 16)  # warm the runner
                without, with_ui = [], []
                for _ in range(args.rounds):
                    _close_tabs(driver)
                    without.append(decode_tps(head.url, args.tokens))
                    _open_tabs(driver, url, 3)
                    time.sleep(2.0)  # the dashboards are polling when the stream starts
                    with_ui.append(decode_tps(head.url, args.tokens))
                emit("decode_tok_s_without_dashboards", statistics.median(without), 1)
                emit("decode_tok_s_with_3_dashboards", statistics.median(with_ui), 1)
                emit("dashboard_decode_cost",
                     statistics.median(with_ui) / statistics.median(without), 3)
            finally:
                driver.quit()
            emit("doctor_s", doctor_seconds(head.url), 2)
        finally:
            cluster.close()
    return 0


def _pinned_browser(core: int, tmp: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(pinned_chromium(core, tmp))
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1400", *BROWSER_FLAGS):
        options.add_argument(flag)
    driver_path = next(p for n in DRIVER if (p := shutil.which(n)))
    return webdriver.Chrome(service=Service(driver_path), options=options)


def _open_tabs(driver: Any, url: str, n: int) -> None:
    for _ in range(n):
        driver.switch_to.new_window("tab")
        driver.get(url)


def _close_tabs(driver: Any) -> None:
    """Leave one tab, on about:blank: no dashboard polls."""
    handles = driver.window_handles
    for handle in handles[1:]:
        driver.switch_to.window(handle)
        driver.close()
    driver.switch_to.window(handles[0])
    driver.get("about:blank")


if __name__ == "__main__":
    sys.exit(main())
