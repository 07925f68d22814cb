"""Overload: 64 concurrent requests against a small batch, a short queue and a small KV budget
(`kv_budget_bytes`), on a real agent with a tiny model.

Every request either completes or is rejected promptly, before any work starts, with its API's
overload answer (OpenAI 429, Anthropic 529 `overloaded_error`, Ollama 503), each with
Retry-After; nothing hangs (every request has a bounded wait). A request that can never fit (over
the context, or over the whole KV budget) gets 400.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from live_agent import LiveAgent, start_agent, wait_until
from tiny_models import make_tiny_model

pytestmark = pytest.mark.slow

CONCURRENCY = 64
MAX_BATCH = 4
MAX_QUEUE = 4
MAX_TOKENS = 100  # per request: with the tiny model's ~30-token prompt, ~130 tokens of KV
KV_BYTES_PER_TOKEN = 512  # the tiny model: 2 layers x 2 KV heads x 16 dims x (K, V) x 4 bytes
# Room for two requests at once (a third would exceed it) though the batch has four rows; a
# request of ~480 tokens fits the 512-token context but never this budget.
KV_BUDGET_BYTES = 300 * KV_BYTES_PER_TOKEN

REQUEST_TIMEOUT_S = 120.0  # no request may wait longer: a hang fails the test
REJECT_WITHIN_S = 5.0  # an overload answer comes this fast, even while the batch is busy
OVERLOAD = {"openai": 429, "anthropic": 529, "ollama": 503}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAgent]:
    root = tmp_path_factory.mktemp("overload")
    model = make_tiny_model(root / "tiny")
    env = {"FLOCK_MAX_QUEUE": str(MAX_QUEUE), "FLOCK_KV_BUDGET_BYTES": str(KV_BUDGET_BYTES)}
    agent = start_agent(root / "state", model=str(model),
                        args=["--no-discovery", "--max-batch", str(MAX_BATCH)], env=env)
    try:
        yield agent
    finally:
        agent.stop()


@dataclass
class Outcome:
    api: str
    stream: bool
    status: int
    elapsed: float
    headers: httpx.Headers
    body: bytes
    error: str | None = None  # a transport failure or timeout


def request_for(i: int, model: str,
                max_tokens: int = MAX_TOKENS) -> tuple[str, str, dict[str, Any]]:
    """The i-th request of the burst: the three APIs, streaming and not, in turn."""
    api = ("openai", "anthropic", "ollama")[i % 3]
    stream = (i // 3) % 2 == 1
    user = [{"role": "user", "content": "Tell me a story."}]
    if api == "openai":
        return api, "/v1/chat/completions", {"model": model, "messages": user, "stream": stream,
                                             "max_tokens": max_tokens, "temperature": 0}
    if api == "anthropic":
        return api, "/v1/messages", {"model": model, "messages": user, "stream": stream,
                                     "max_tokens": max_tokens, "temperature": 0}
    return api, "/api/chat", {"model": model, "messages": user, "stream": stream,
                              "options": {"num_predict": max_tokens, "temperature": 0}}


async def send(client: httpx.AsyncClient, api: str, path: str, body: dict[str, Any]) -> Outcome:
    started = time.monotonic()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            response = await client.post(path, json=body)
            return Outcome(api, bool(body.get("stream")), response.status_code,
                           time.monotonic() - started, response.headers, response.content)
    except (TimeoutError, httpx.HTTPError) as exc:
        return Outcome(api, bool(body.get("stream")), 0, time.monotonic() - started,
                       httpx.Headers(), b"", error=f"{type(exc).__name__}: {exc}")


def completed_problem(outcome: Outcome) -> str | None:
    """None when a 200 is a whole answer (a stream that reached its end, without an error)."""
    text = outcome.body.decode(errors="replace")
    if outcome.api == "openai":
        if outcome.stream:
            return None if text.rstrip().endswith("data: [DONE]") and '"error"' not in text \
                else f"unfinished stream: {text[-300:]!r}"
        return None if json.loads(text)["choices"][0]["finish_reason"] else text[:300]
    if outcome.api == "anthropic":
        if outcome.stream:
            return None if "event: message_stop" in text and "event: error" not in text \
                else f"unfinished stream: {text[-300:]!r}"
        return None if json.loads(text)["stop_reason"] else text[:300]
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else {}
    return None if last.get("done") and "error" not in last else f"unfinished: {text[-300:]!r}"


def overload_problem(outcome: Outcome) -> str | None:
    """None when a rejection is the API's overload answer, with Retry-After, in its format."""
    if outcome.status != OVERLOAD[outcome.api]:
        return f"status {outcome.status}: {outcome.body[:300]!r}"
    if not outcome.headers.get("retry-after", "").isdigit():
        return f"no Retry-After: {dict(outcome.headers)}"
    body = json.loads(outcome.body)
    if outcome.api == "openai":
        ok = body["error"]["code"] == "overloaded" and body["error"]["type"] == "server_error"
    elif outcome.api == "anthropic":
        ok = body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    else:
        ok = isinstance(body.get("error"), str)
    return None if ok else f"wrong error shape: {body!r}"


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (r"\{[^}]*" + re.escape(labels) + r"[^}]*\}" if labels else
                                 r"(\{[^}]*\})?") + r" ([0-9.e+-]+)"
    return sum(float(m.group(m.lastindex or 1)) for m in re.finditer(pattern, text))


def scrape(node: LiveAgent) -> str:
    return httpx.get(f"{node.url}/metrics", timeout=30).text


def settled(node: LiveAgent, requests: float, timeout: float = 30.0) -> str:
    """A scrape once the agent has counted `requests` requests in all and the runner's last
    report shows nothing running or queued."""
    def check() -> str | None:
        text = scrape(node)
        done = metric(text, "flock_requests_total") >= requests
        idle = metric(text, "flock_sequences_active") + metric(text, "flock_sequences_queued")
        return text if done and idle == 0 else None

    return wait_until(check, timeout, f"{requests:.0f} requests counted and an idle runner")


async def burst(node: LiveAgent, n: int) -> list[Outcome]:
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=node.url, limits=limits, timeout=None) as client:
        requests = [request_for(i, str(node.model)) for i in range(n)]
        return await asyncio.gather(*(send(client, *r) for r in requests))


def test_64_concurrent_requests_complete_or_are_rejected_promptly(node: LiveAgent) -> None:
    before = scrape(node)
    started = time.monotonic()
    outcomes = asyncio.run(burst(node, CONCURRENCY))
    wall = time.monotonic() - started

    hung = [o for o in outcomes if o.error is not None]
    assert not hung, f"requests without an answer: {[o.error for o in hung]}"
    done = [o for o in outcomes if o.status == 200]
    rejected = [o for o in outcomes if o.status != 200]
    problems = [f"{o.api} stream={o.stream}: {p}" for o in done if (p := completed_problem(o))]
    problems += [f"{o.api} stream={o.stream}: {p}" for o in rejected if (p := overload_problem(o))]
    assert not problems, "\n".join(problems)
    # The batch and queue hold a few; 64 at once must overflow them, and some must get through.
    assert done and rejected, (len(done), len(rejected))
    slow = [round(o.elapsed, 2) for o in rejected if o.elapsed > REJECT_WITHIN_S]
    assert not slow, f"rejections slower than {REJECT_WITHIN_S}s: {slow}"
    print(f"\n{len(done)} completed, {len(rejected)} rejected in {wall:.1f}s; slowest rejection "
          f"{max(o.elapsed for o in rejected):.2f}s, slowest completion "
          f"{max(o.elapsed for o in done):.2f}s")

    # Rejected before any work: the runner admitted (and prefilled) only the requests that
    # completed. Every request has the same prompt, so its admitted prompt tokens tell.
    # Runner stats arrive about once a second: wait for every request to be counted and the
    # runner's report from after the burst.
    after = settled(node, metric(before, "flock_requests_total") + CONCURRENCY)
    prompt_tokens = json.loads(asyncio.run(_one(node)).body)["usage"]["prompt_tokens"]
    final = settled(node, metric(after, "flock_requests_total") + 1)
    admitted = (metric(after, "flock_prompt_tokens_total")
                - metric(before, "flock_prompt_tokens_total"))
    assert admitted == prompt_tokens * len(done), (admitted, prompt_tokens, len(done))
    assert metric(final, "flock_prompt_tokens_total") - metric(after, "flock_prompt_tokens_total") \
        == prompt_tokens
    overloaded = (metric(after, "flock_rejections_total", 'reason="overloaded"')
                  - metric(before, "flock_rejections_total", 'reason="overloaded"'))
    assert overloaded == len(rejected)
    # Nothing left behind in the runner.
    assert metric(final, "flock_sequences_active") == 0
    assert metric(final, "flock_sequences_queued") == 0


async def _one(node: LiveAgent) -> Outcome:
    async with httpx.AsyncClient(base_url=node.url, timeout=REQUEST_TIMEOUT_S) as client:
        outcome = await send(client, *request_for(0, str(node.model)))
    assert outcome.status == 200, outcome.body
    return outcome


def test_a_request_over_the_context_is_a_400_in_each_api(node: LiveAgent) -> None:
    long = "x " * 2000  # ~4000 tokens against a 512-token context
    model = str(node.model)
    with httpx.Client(base_url=node.url, timeout=60) as client:
        for path, body in [
            ("/v1/chat/completions", {"model": model, "max_tokens": 5,
                                      "messages": [{"role": "user", "content": long}]}),
            ("/v1/completions", {"model": model, "max_tokens": 5, "prompt": long}),
            ("/v1/messages", {"model": model, "max_tokens": 5,
                              "messages": [{"role": "user", "content": long}]}),
            ("/api/chat", {"model": model, "stream": True, "options": {"num_predict": 5},
                           "messages": [{"role": "user", "content": long}]}),
            ("/api/generate", {"model": model, "stream": False, "prompt": long}),
        ]:
            started = time.monotonic()
            response = client.post(path, json=body)
            assert response.status_code == 400, (path, response.text)
            assert "context" in response.text, response.text
            assert time.monotonic() - started < REJECT_WITHIN_S


def test_a_request_over_the_whole_kv_budget_is_a_400_in_each_api(node: LiveAgent) -> None:
    """~480 tokens fit the 512-token context but never the 300-token KV budget."""
    model = str(node.model)
    with httpx.Client(base_url=node.url, timeout=60) as client:
        for i in range(6):
            api, path, body = request_for(i, model, max_tokens=450)
            started = time.monotonic()
            response = client.post(path, json=body)
            assert response.status_code == 400, (api, body.get("stream"), response.text)
            assert "KV" in response.text, response.text
            assert time.monotonic() - started < REJECT_WITHIN_S
        # A request that fits is served.
        outcome = asyncio.run(_one(node))
        assert completed_problem(outcome) is None


def test_the_node_serves_normally_after_the_burst(node: LiveAgent) -> None:
    outcomes = asyncio.run(burst(node, 6))  # within batch + queue: all complete
    assert [o.status for o in outcomes] == [200] * 6, [o.body[:200] for o in outcomes]
    assert all(completed_problem(o) is None for o in outcomes)
    assert node.alive()
