"""The agent (control plane) imports no MLX: only its runner subprocesses compute.

A real `flock run` with SmolLM2 placed serves a chat request (so the model's tokenizer is
loaded, its prompt templated and a runner routed to), then the agent process itself reports
which modules it holds. A second check imports every control-plane module the server wires.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from live_agent import free_data_port_base, free_port

ROOT = Path(__file__).resolve().parents[1]
COMPUTE = ("mlx", "mlx_lm", "torch")

# Runs `flock run` in this process; a thread waits for /readyz, chats, and reports modules.
_AGENT = """
import json, os, signal, sys, threading, time
import httpx
from agent.cli import main

url, model = sys.argv[1], sys.argv[2]

def probe():
    report = {"ready": False}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    report["ready"] = True
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 3,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        report["status"] = reply.status_code
        report["modules"] = sorted(m for m in sys.modules
                                   if m.split(".")[0] in ("mlx", "mlx_lm", "torch"))
    finally:
        print("REPORT " + json.dumps(report), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
sys.exit(main(sys.argv[3:]))
"""


def test_serving_agent_holds_no_mlx(smollm2_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-c", _AGENT, url, str(smollm2_dir), "run", "--host", "127.0.0.1",
            "--port", str(port), "--state-dir", str(tmp_path / "state"),
            "--models-dir", str(tmp_path / "models"), "--data-port",
            str(free_data_port_base()), "--model", str(smollm2_dir), "--log-level", "info"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=400, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, f"no report (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    report = json.loads(lines[-1].removeprefix("REPORT "))
    assert report["ready"] and report["status"] == 200, done.stderr[-3000:]
    assert report["modules"] == []


def test_control_plane_modules_import_no_mlx() -> None:
    code = (
        "import sys, json\n"
        "import agent.server, agent.cli, agent.cluster.controller\n"
        "import agent.serving.engine, agent.serving.pool, agent.serving.router\n"
        "import agent.cluster.shard_source, agent.cluster.shape, agent.api.app\n"
        "import agent.api.shards, agent.api.cluster, agent.models.store, agent.models.fetch\n"
        "import agent.models.tokenizer, agent.models.arch, agent.models.shards, agent.spec\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{COMPUTE!r})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert json.loads(done.stdout) == []
