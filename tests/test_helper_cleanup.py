"""Benches and test helpers stop the agents they started when they are signalled.

A bench-like helper runs in a subprocess: it starts a real agent serving a tiny model (so the
agent has a runner) through `tests.live_agent` or through a `tests.cluster_tools` cluster, says
which pid it got, and sleeps. The test sends the helper SIGTERM or SIGINT, as a harness's timeout
or Ctrl-C would, and waits (with a deadline) for the helper, its agent and the agent's runner to
be gone.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live_agent import ROOT, gone, runner_pids, wait_until
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

HELPER = r"""
import json, sys, time
from pathlib import Path
kind, root, model = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if kind == "live_agent":
    from bench.common import bench_agent
    agent = bench_agent(root / "state", model)
    pid = agent.pid
else:
    from tests.cluster_tools import LoopbackCluster
    cluster = LoopbackCluster(root=root, models_dir=root / "models")
    agent = cluster.start("n0", model=model)
    cluster.wait_serving(agent, model, nodes=1, timeout=240)
    pid = agent.pid
print(json.dumps({"agent": pid}), flush=True)
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize(("kind", "sig"), [("live_agent", signal.SIGTERM),
                                           ("cluster_tools", signal.SIGINT)])
def test_a_signalled_helper_leaves_no_agent_or_runner(tmp_path: Path, kind: str,
                                                      sig: signal.Signals) -> None:
    model = make_tiny_model(tmp_path / "tiny")
    helper = subprocess.Popen(
        [sys.executable, "-c", HELPER, kind, str(tmp_path / "work"), str(model)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    agent = 0
    try:
        assert helper.stdout is not None
        for line in helper.stdout:  # bounded by the helper's own start-up timeouts
            if line.startswith("{"):
                agent = json.loads(line)["agent"]
                break
        assert agent, f"the helper started no agent (exit {helper.poll()})"
        runners = wait_until(lambda: runner_pids(agent), 120, "the agent's runner")

        helper.send_signal(sig)
        code = helper.wait(60)
        assert code != 0  # it was stopped, not finished
        wait_until(lambda: gone(agent), 30, f"agent {agent} to be gone")
        wait_until(lambda: all(gone(pid) for pid in runners), 30, f"runners {runners} gone")
    finally:
        if helper.poll() is None:  # the test failed early: the helper still cleans up on TERM
            helper.terminate()
            try:
                helper.wait(30)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait(10)
        if helper.stdout is not None:
            helper.stdout.close()
