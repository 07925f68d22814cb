"""Requests to a test cluster's agents and faults struck while they stream: greedy chat and
completion calls, one streamed request per API recorded with its times (`StreamRecord`), and
`fault_during_streams` / `first_success` for the fault tests and benches. The clusters
themselves are in `tests.cluster_tools`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.cluster_tools import MODEL, QUESTION, Agent, ClusterBase
from tests.live_agent import wait_until

# ---- requests ---------------------------------------------------------------------------------


def chat(client: httpx.Client, *, model: str = MODEL, messages: list[dict[str, str]] | None = None,
         max_tokens: int = 24, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": messages or QUESTION, "temperature": 0,
            "max_tokens": max_tokens, **extra}
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def complete(client: httpx.Client, prompt: str, *, model: str = MODEL, max_tokens: int = 24
             ) -> tuple[str, int]:
    """(text, completion tokens) of a greedy /v1/completions request."""
    body = {"model": model, "prompt": prompt, "temperature": 0, "max_tokens": max_tokens}
    response = client.post("/v1/completions", json=body)
    response.raise_for_status()
    data = response.json()
    return data["choices"][0]["text"], data["usage"]["completion_tokens"]


@dataclass
class StreamRecord:
    """What happened to one streamed request, with monotonic times."""

    started: float = 0.0
    first_token: float = 0.0
    ended: float = 0.0
    text: str = ""
    lines: list[str] = field(default_factory=list)
    error: str | None = None  # the API's error event, when one came
    status: int = 0
    transport_error: str | None = None


COUNTING = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]


def stream_api(client: httpx.Client, api: str, record: StreamRecord, *, model: str = MODEL,
               max_tokens: int = 400, messages: list[dict[str, str]] | None = None,
               on_token: Callable[[StreamRecord], None] | None = None) -> StreamRecord:
    """Stream a chat through `api` ("openai", "anthropic" or "ollama") into `record`.

    `record.error` is set when the stream carries an error in that API's own format: an SSE
    `data: {"error": ...}` chunk (OpenAI), an SSE `event: error` (Anthropic), an NDJSON line
    with "error" (Ollama).
    """
    messages = messages or COUNTING
    if api == "openai":
        path = "/v1/chat/completions"
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0,
                                "max_tokens": max_tokens, "stream": True}
    elif api == "anthropic":
        path = "/v1/messages"
        body = {"model": model, "messages": messages, "temperature": 0,
                "max_tokens": max_tokens, "stream": True}
    elif api == "ollama":
        path = "/api/chat"
        body = {"model": model, "messages": messages, "stream": True,
                "options": {"temperature": 0, "num_predict": max_tokens}}
    else:
        raise ValueError(api)
    record.started = time.monotonic()
    event = ""

    def got_text(piece: str) -> None:
        if not piece:
            return
        record.text += piece
        if not record.first_token:
            record.first_token = time.monotonic()
            if on_token is not None:
                on_token(record)

    try:
        with client.stream("POST", path, json=body) as response:
            record.status = response.status_code
            for line in response.iter_lines():
                if not line:
                    continue
                record.lines.append(line)
                if api == "ollama":
                    data = json.loads(line)
                    if "error" in data:
                        record.error = json.dumps(data)
                    else:
                        got_text(data.get("message", {}).get("content", ""))
                    continue
                if line.startswith("event: "):
                    event = line[7:]
                    continue
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if api == "anthropic":
                    if event == "error" and data.get("type") == "error":
                        record.error = json.dumps(data)
                    elif data.get("type") == "content_block_delta":
                        got_text(data["delta"].get("text", ""))
                elif "error" in data:
                    record.error = json.dumps(data)
                else:
                    for choice in data.get("choices", []):
                        got_text(choice.get("delta", {}).get("content") or "")
    except httpx.HTTPError as exc:
        record.transport_error = f"{type(exc).__name__}: {exc}"
    record.ended = time.monotonic()
    return record


def stream_chat(client: httpx.Client, record: StreamRecord, *, model: str = MODEL,
                max_tokens: int = 400, on_token: Callable[[StreamRecord], None] | None = None,
                messages: list[dict[str, str]] | None = None) -> StreamRecord:
    """Stream an OpenAI chat completion into `record` (SSE lines kept; `error` set from an
    `{"error": ...}` event)."""
    body = {"model": model, "messages": messages or [
        {"role": "user", "content": "Count from 1 to 500, one number per line."}],
        "temperature": 0, "max_tokens": max_tokens, "stream": True}
    record.started = time.monotonic()
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            record.status = response.status_code
            for line in response.iter_lines():
                if not line:
                    continue
                record.lines.append(line)
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    record.error = json.dumps(data["error"])
                    continue
                for choice in data.get("choices", []):
                    piece = choice.get("delta", {}).get("content") or ""
                    if piece:
                        record.text += piece
                        if not record.first_token:
                            record.first_token = time.monotonic()
                            if on_token is not None:
                                on_token(record)
    except httpx.HTTPError as exc:
        record.transport_error = f"{type(exc).__name__}: {exc}"
    record.ended = time.monotonic()
    return record


# ---- faults -----------------------------------------------------------------------------------

APIS = ("openai", "anthropic", "ollama")


def fault_during_streams(cluster: ClusterBase, entry: Agent | list[Agent],
                         fault: Callable[[], None], *, apis: tuple[str, ...] = APIS,
                         timeout: float = 180.0) -> tuple[float, dict[str, StreamRecord]]:
    """Start one long stream per API through each entry node; once each has streamed a token,
    run `fault()`; return when every stream has ended: (when the fault struck, the records by
    "api@node")."""
    entries = entry if isinstance(entry, list) else [entry]
    keys = [(f"{api}@{agent.name}", api, agent) for agent in entries for api in apis]
    records = {key: StreamRecord() for key, _, _ in keys}
    started = {key: threading.Event() for key, _, _ in keys}
    futures = [
        cluster.submit(agent, lambda c, key=key, api=api: stream_api(  # type: ignore[misc]
            c, api, records[key], on_token=lambda _r, key=key: started[key].set()))
        for key, api, agent in keys
    ]
    deadline = time.monotonic() + timeout
    for key, _, _ in keys:
        if not started[key].wait(max(0.1, deadline - time.monotonic())):
            raise AssertionError(f"the {key} stream produced no token: {records[key]}")
    # A few more tokens each: the fault strikes mid-stream.
    streamed = {key: len(records[key].text) for key, _, _ in keys}
    wait_until(lambda: all(len(records[k].text) > streamed[k] + 2 or records[k].ended
                           for k in streamed), 60, "more tokens on every stream")
    fault()
    struck = time.monotonic()
    for future in futures:
        future.result(timeout=max(1.0, deadline - time.monotonic()) + 60)
    return struck, records


def first_success(cluster: ClusterBase, entry: Agent, *, timeout: float = 180.0,
                  interval: float = 0.25) -> tuple[float, list[str]]:
    """Ask `entry` until a greedy chat answers; (when it did, the errors before it)."""
    deadline = time.monotonic() + timeout
    errors: list[str] = []
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 16}
    while time.monotonic() < deadline:
        try:
            response = cluster.post(entry, "/v1/chat/completions", json=body, timeout=120)
            if response.status_code == 200 and response.json()["choices"][0]["message"]["content"]:
                return time.monotonic(), errors
            errors.append(f"{response.status_code} {response.text[:200]}")
        except (httpx.HTTPError, TimeoutError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        time.sleep(interval)
    raise AssertionError(f"no success within {timeout:.0f}s: {errors[-5:]}\n{cluster.describe()}")
