"""Graceful shutdown of a real agent (SmolLM2): SIGTERM stops accepting connections, lets the
in-flight requests finish (streams of all three APIs run to their end), then the agent exits 0
and its runner processes are gone — none is left orphaned.
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
from live_agent import LiveAgent, runner_pids, start_agent

from agent.server import SHUTDOWN_GRACE_S

pytestmark = pytest.mark.slow

STORY = [{"role": "user", "content": "Count from 1 to 500, separating the numbers with commas."}]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # greedy decoding goes on and on
# Streams must still run when SIGTERM arrives and finish within the grace period; how many
# tokens that is depends on the machine's load, so it is measured first (`_stream_tokens`).
MIN_TOKENS, MAX_TOKENS = 6, 64
EXIT_MARGIN_S = 20.0  # stopping runners and the cluster after the last request


@dataclass
class Stream:
    api: str
    path: str
    body: dict[str, Any]
    first_chunk: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    error: str | None = None
    ended_at: float = 0.0


def _streams(model: str, tokens: int) -> list[Stream]:
    return [
        Stream("openai", "/v1/chat/completions",
               {"model": model, "messages": STORY, "stream": True, "temperature": 0,
                "max_tokens": tokens}),
        Stream("anthropic", "/v1/messages",
               {"model": model, "messages": STORY, "stream": True, "temperature": 0,
                "max_tokens": tokens}),
        Stream("ollama", "/api/chat",
               {"model": model, "messages": STORY, "stream": True,
                "options": {"temperature": 0, "num_predict": tokens}}),
    ]


def _stream_tokens(url: str, model: str) -> int:
    """Tokens per stream such that three streams take about a third of the grace period here
    and now (shared CI machines decode anywhere from 1 to 100 tokens per second)."""
    probe = 8
    body = {"model": model, "messages": STORY, "temperature": 0, "max_tokens": probe}
    started = time.monotonic()
    threads = [threading.Thread(target=httpx.post, args=(url + "/v1/chat/completions",),
                                kwargs={"json": body, "timeout": 120}) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    per_token = (time.monotonic() - started) / probe
    return max(MIN_TOKENS, min(MAX_TOKENS, int(SHUTDOWN_GRACE_S / 3 / per_token)))


def _consume(url: str, stream: Stream) -> None:
    try:
        with httpx.stream("POST", url + stream.path, json=stream.body, timeout=120) as response:
            if response.status_code != 200:
                stream.error = f"status {response.status_code}: {response.read()[:300]!r}"
                return
            for chunk in response.iter_text():
                stream.text += chunk
                if _has_content(stream):
                    stream.first_chunk.set()
    except httpx.HTTPError as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
    finally:
        stream.ended_at = time.monotonic()
        stream.first_chunk.set()


def _has_content(stream: Stream) -> bool:
    """Generated text has arrived (not only the opening events)."""
    if stream.path == "/v1/completions":
        return '"text":"' in stream.text
    marker = {"openai": '"content":"', "anthropic": '"text_delta"', "ollama": '"content":"'}
    # OpenAI's first chunk carries the role and an empty content.
    return stream.text.count(marker[stream.api]) > (1 if stream.api == "openai" else 0)


def _finished_problem(stream: Stream) -> str | None:
    """None when the stream reached its API's normal end."""
    if stream.error:
        return stream.error
    text = stream.text
    if stream.api == "openai":
        ok = text.rstrip().endswith("data: [DONE]") and '"finish_reason":"' in text \
            and '"error"' not in text
    elif stream.api == "anthropic":
        ok = "event: message_stop" in text and "event: error" not in text
    else:
        last = json.loads(text.strip().splitlines()[-1])
        ok = last.get("done") is True and "error" not in last
    return None if ok else f"cut short: ...{text[-300:]!r}"


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


def _gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still running (zombies count as gone) after waiting up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if pid in runner_pids()]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _start(smollm2_dir: Path, state: Path) -> LiveAgent:
    return start_agent(state, model=str(smollm2_dir), args=["--no-discovery"])


def test_sigterm_lets_in_flight_streams_finish_then_exits_0(
        smollm2_dir: Path, tmp_path: Path) -> None:
    agent = _start(smollm2_dir, tmp_path / "state")
    try:
        runners = agent.runner_pids()
        assert runners, "the model's runner should be up"
        streams = _streams(str(smollm2_dir), _stream_tokens(agent.url, str(smollm2_dir)))
        threads = [threading.Thread(target=_consume, args=(agent.url, s), daemon=True)
                   for s in streams]
        for thread in threads:
            thread.start()
        for stream in streams:
            assert stream.first_chunk.wait(120), f"{stream.api} never started streaming"
        assert all(s.error is None and not s.ended_at for s in streams), \
            [(s.api, s.error, s.text[-200:]) for s in streams]

        signalled = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        # New connections are refused while the streams still run.
        refused_at = None
        while time.monotonic() - signalled < 10:
            if _refused(agent.url):
                refused_at = time.monotonic()
                break
            time.sleep(0.05)
        assert refused_at is not None, "still accepting connections 10 s after SIGTERM"
        still_streaming = [s.api for s in streams if not s.ended_at]
        assert still_streaming, "the streams ended before the listener closed: make them longer"

        for thread in threads:
            thread.join(SHUTDOWN_GRACE_S + 10)
        problems = [f"{s.api}: {p}" for s in streams if (p := _finished_problem(s))]
        assert not problems, "\n".join(problems)

        code = agent.process.wait(SHUTDOWN_GRACE_S + EXIT_MARGIN_S)
        exited = time.monotonic()
        assert code == 0, agent.log_text()[-3000:]
        assert exited - max(s.ended_at for s in streams) < EXIT_MARGIN_S
        assert not _gone(runners, 10), "runner processes outlived the agent"
    finally:
        agent.stop(10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_idle_agent_stops_at_once_and_takes_its_runner(
        smollm2_dir: Path, tmp_path: Path, sig: signal.Signals) -> None:
    agent = _start(smollm2_dir, tmp_path / "state")
    try:
        runners = agent.runner_pids()
        assert runners
        started = time.monotonic()
        agent.process.send_signal(sig)
        code = agent.process.wait(30)
        assert code == 0, agent.log_text()[-3000:]
        assert time.monotonic() - started < 15, "an idle agent took long to stop"
        assert not _gone(runners, 10), "runner processes outlived the agent"
    finally:
        agent.stop(10)


def test_a_request_longer_than_the_grace_is_cut_and_the_agent_still_exits_0(
        smollm2_dir: Path, tmp_path: Path) -> None:
    """The bound is a bound: a stream that would outlast the grace period is ended, the agent
    exits 0 soon after it, and its runner goes with it."""
    agent = _start(smollm2_dir, tmp_path / "state")
    try:
        runners = agent.runner_pids()
        stream = Stream("openai", "/v1/completions",
                        {"model": str(smollm2_dir), "prompt": COUNTING, "stream": True,
                         "temperature": 0, "max_tokens": 8000})
        thread = threading.Thread(target=_consume, args=(agent.url, stream), daemon=True)
        thread.start()
        assert stream.first_chunk.wait(120)
        signalled = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        code = agent.process.wait(SHUTDOWN_GRACE_S + EXIT_MARGIN_S)
        assert code == 0, agent.log_text()[-3000:]
        assert time.monotonic() - signalled < SHUTDOWN_GRACE_S + EXIT_MARGIN_S
        thread.join(10)
        assert stream.ended_at, "the client is still waiting after the agent exited"
        assert _finished_problem(stream) is not None  # it was cut, not finished
        assert not _gone(runners, 10), "runner processes outlived the agent"
    finally:
        agent.stop(10)


def test_sigterm_while_the_model_loads_exits_0_without_an_orphan_runner(
        smollm2_dir: Path, tmp_path: Path) -> None:
    """A service manager may stop a node that is still starting: the runner being loaded must
    not outlive the agent."""
    agent = start_agent(tmp_path / "state", model=str(smollm2_dir), args=["--no-discovery"],
                        wait=False)
    try:
        deadline = time.monotonic() + 120
        while not agent.runner_pids():
            assert agent.alive(), agent.log_text()[-3000:]
            assert time.monotonic() < deadline, "no runner was started"
            time.sleep(0.05)
        runners = agent.runner_pids()
        agent.process.send_signal(signal.SIGTERM)
        code = agent.process.wait(SHUTDOWN_GRACE_S + EXIT_MARGIN_S)
        assert code == 0, agent.log_text()[-3000:]
        assert not _gone(runners, 10), "a runner outlived the agent"
    finally:
        agent.stop(10)
