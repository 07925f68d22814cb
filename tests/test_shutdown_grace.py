"""Shutdown past the grace bound, on a real agent (SmolLM2) with `--shutdown-grace 3`.

Requests that would outlast the grace period are not cut: shortly before it ends, each is ended
with a "server shutting down" error in its API's own format (OpenAI SSE `error` data, Anthropic
`event: error` of type `overloaded_error`, an Ollama NDJSON `{"error": ...}` line; 503 in each
API's error body when not streaming), the response completes properly (no dropped connection),
and the agent exits 0. A request that arrives during the drain is refused.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_agent import LiveAgent, metric_total, start_agent, wait_until

from agent.server import abort_margin_s

pytestmark = pytest.mark.slow

GRACE_S = 3.0
# Greedy SmolLM2 runs this past 400 tokens (counting to 500 stops after ~120).
STORY = [{"role": "user", "content": "Write the numbers from 1 to 1000, separated by commas, on "
                                     "one line. Do not stop early."}]
LONG = 4000  # tokens: far more than a few seconds of decoding here


@dataclass
class Call:
    api: str
    path: str
    body: dict[str, Any]
    stream: bool
    started: threading.Event = field(default_factory=threading.Event)
    status: int = 0
    text: str = ""
    error: str | None = None
    ended_at: float = 0.0


def _calls(model: str) -> list[Call]:
    calls = []
    for stream in (True, False):
        calls += [
            Call("openai", "/v1/chat/completions",
                 {"model": model, "messages": STORY, "stream": stream, "temperature": 0,
                  "max_tokens": LONG}, stream),
            Call("anthropic", "/v1/messages",
                 {"model": model, "messages": STORY, "stream": stream, "temperature": 0,
                  "max_tokens": LONG}, stream),
            Call("ollama", "/api/chat",
                 {"model": model, "messages": STORY, "stream": stream,
                  "options": {"temperature": 0, "num_predict": LONG}}, stream),
        ]
    return calls


def _has_content(call: Call) -> bool:
    marker = {"openai": '"content":"', "anthropic": '"text_delta"', "ollama": '"content":"'}
    # OpenAI's first chunk carries the role and an empty content.
    return call.text.count(marker[call.api]) > (1 if call.api == "openai" else 0)


def _run(url: str, call: Call) -> None:
    if not call.stream:
        call.started.set()  # the answer comes at the end
    try:
        with httpx.stream("POST", url + call.path, json=call.body, timeout=120) as response:
            call.status = response.status_code
            for chunk in response.iter_text():  # a dropped connection raises here
                call.text += chunk
                if call.stream and _has_content(call):
                    call.started.set()
    except httpx.HTTPError as exc:
        call.error = f"{type(exc).__name__}: {exc}"
    finally:
        call.ended_at = time.monotonic()
        call.started.set()


def _ended_with_shutdown_error(call: Call) -> str | None:
    """None when the call ended with its API's "server shutting down" error."""
    if call.error:
        return call.error
    text = call.text
    if not call.stream:
        if call.status != 503:
            return f"status {call.status}: {text[:300]!r}"
        body = json.loads(text)
        if call.api == "openai":
            ok = body["error"]["code"] == "server_shutting_down" \
                and body["error"]["type"] == "server_error"
        elif call.api == "anthropic":
            ok = body["type"] == "error" and body["error"]["type"] == "overloaded_error"
        else:
            ok = isinstance(body["error"], str)
        return None if ok and "shutting down" in text else f"body {text[:300]!r}"
    if call.status != 200:
        return f"status {call.status}: {text[:300]!r}"
    if call.api == "openai":
        last = [line for line in text.splitlines() if line.startswith("data: ")][-1]
        error = json.loads(last.removeprefix("data: ")).get("error") or {}
        ok = error.get("code") == "server_shutting_down" and "shutting down" in error["message"]
    elif call.api == "anthropic":
        events = [block for block in text.strip().split("\n\n") if block]
        name, data = events[-1].split("\n", 1)
        body = json.loads(data.removeprefix("data: "))
        ok = name == "event: error" and body["error"]["type"] == "overloaded_error" \
            and "shutting down" in body["error"]["message"]
    else:
        last = json.loads(text.strip().splitlines()[-1])
        ok = "shutting down" in last.get("error", "")
    return None if ok else f"did not end with the shutdown error: ...{text[-300:]!r}"


def _refused(url: str, model: str) -> str | None:
    """None when a new request is refused (connection refused or 503), else what happened."""
    try:
        response = httpx.post(url + "/v1/chat/completions", timeout=5, json={
            "model": model, "messages": STORY, "max_tokens": 4})
    except httpx.ConnectError:
        return None
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if response.status_code == 503 else f"answered {response.status_code}"


def _refused_or_fail(url: str, model: str) -> bool:
    """True once a new request is refused; fails at once when one is served during the drain
    (before the listener closes, a request may still fail otherwise: then ask again)."""
    outcome = _refused(url, model)
    assert outcome is None or not outcome.startswith("answered 2"), \
        f"a new request was served during the drain: {outcome}"
    return outcome is None


def _admitted(url: str) -> float:
    """Sequences the runner decodes or queues, as its last stats report says."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return (metric_total(text, "flock_sequences_active")
            + metric_total(text, "flock_sequences_queued"))


@pytest.fixture
def agent(smollm2_dir: Path, tmp_path: Path) -> Any:
    live = start_agent(tmp_path / "state", model=str(smollm2_dir),
                       args=["--no-discovery", "--shutdown-grace", str(GRACE_S)])
    try:
        yield live
    finally:
        live.stop(10)


def test_requests_past_the_grace_end_with_a_shutdown_error_and_the_agent_exits_0(
        agent: LiveAgent) -> None:
    model = str(agent.model)
    calls = _calls(model)
    threads = [threading.Thread(target=_run, args=(agent.url, c), daemon=True) for c in calls]
    for thread in threads:
        thread.start()
    for call in calls:
        assert call.started.wait(120), f"{call.api} never started"
    # The non-streaming ones are admitted too: the runner reports all six (about once a second).
    wait_until(lambda: _admitted(agent.url) >= len(calls), 30, "the runner to admit every call")
    assert all(not c.ended_at for c in calls), [(c.api, c.stream, c.error, c.text[-200:])
                                                for c in calls if c.ended_at]

    signalled = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    # A request that reaches the agent before its loop has run the signal handler is still
    # served; once the agent says it is shutting down, no new one may be.
    wait_until(lambda: "shutting down: waiting" in agent.log_text(), 10, "the drain to begin")
    wait_until(lambda: _refused_or_fail(agent.url, model), 10, "new requests to be refused")

    for thread in threads:
        thread.join(GRACE_S + 10)
    problems = [f"{c.api} stream={c.stream}: {p}" for c in calls
                if (p := _ended_with_shutdown_error(c))]
    assert not problems, "\n".join(problems) + "\n" + agent.log_text()[-2000:]
    # Ended shortly before the grace ran out, not at once and not after it.
    for call in calls:
        took = call.ended_at - signalled
        assert GRACE_S - abort_margin_s(GRACE_S) - 0.5 < took < GRACE_S + 2, (call.api, took)

    code = agent.process.wait(30)
    assert code == 0, agent.log_text()[-3000:]
    assert "ended 6 request(s) still in flight" in agent.log_text()
