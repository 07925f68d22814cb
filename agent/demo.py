"""`flock demo` (the README's first command): pull the default model, start a node in the
background, stream a chat answer to the terminal, and leave the node running with its URL printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import httpx

from agent.chat_client import stream_chat
from agent.settings import DEFAULT_MODEL, load_settings

READY_TIMEOUT_S = 300.0


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def run_demo(args: argparse.Namespace) -> int:
    from agent.models.fetch import pull
    from agent.models.store import ModelStore

    settings = load_settings(state_dir=args.state_dir, models_dir=args.models_dir)
    store = ModelStore(settings.models_dir)
    if DEFAULT_MODEL not in {m.name for m in store.list()}:
        print(f"pulling {DEFAULT_MODEL} ...", file=sys.stderr)
        pull(store, DEFAULT_MODEL, progress=lambda line: print(line, file=sys.stderr))
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(settings.state_dir) / "demo-agent.log"
    command = [sys.executable, "-m", "agent", "run", "--host", "127.0.0.1",
               "--port", str(args.port), "--model", DEFAULT_MODEL,
               "--state-dir", str(settings.state_dir), "--models-dir", str(settings.models_dir)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{args.port}"
    print(f"starting flock on {url} (log: {log_path}) ...", file=sys.stderr)
    if not wait_ready(url, process, READY_TIMEOUT_S):
        print(f"the agent did not become ready; see {log_path}", file=sys.stderr)
        process.terminate()
        return 1
    print(f"> {args.prompt}")
    code = stream_chat(url, DEFAULT_MODEL, args.prompt)
    print(f"\nflock is serving {DEFAULT_MODEL} at {url} (OpenAI, Anthropic and Ollama APIs; "
          f"pid {process.pid}; stop it with: kill {process.pid})")
    return code
