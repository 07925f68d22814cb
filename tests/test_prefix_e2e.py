"""The prefix cache end to end: real agents (`python -m agent run`) serving SmolLM2, driven by the
official openai, anthropic and ollama clients through multi-turn conversations.

Three agents run side by side (discovery off, so none routes to another):
- `cached`: default settings;
- `uncached`: `--prefix-cache 0`, the reference every cached answer must equal;
- `small`: a prefix cache of SMALL_CACHE_TOKENS tokens, which holds one short conversation, not
  two: every new conversation evicts the one before.

Cache hits are read from usage where the API has a field (OpenAI `cached_tokens`, Anthropic
`cache_read_input_tokens`) and from `/metrics` (`flock_prefix_cache_hits_total`) for all three.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from live_agent import LiveAgent, start_agent, wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # SmolLM2-135M f32: 30 layers, 3 KV heads of 64
SMALL_CACHE_TOKENS = 400
QUESTIONS = ["Which drawer holds item 21?", "And item 35?", "Summarise what you said."]


@dataclass
class Node:
    name: str
    agent: LiveAgent

    @property
    def url(self) -> str:
        return self.agent.url

    @property
    def model(self) -> str:
        return str(self.agent.model)

    @property
    def process(self) -> Any:
        return self.agent.process

    def metric(self, name: str) -> float:
        """The sum of a metric's samples over all label sets (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    total += sample.value
        return total

    def has_metric(self, name: str) -> bool:
        return f"\n{name}" in httpx.get(f"{self.url}/metrics", timeout=10).text

    def wait_metric_above(self, name: str, floor: float, timeout: float = 15.0) -> float:
        """Runners report their counters about once a second: wait for `name` to pass `floor`
        (its value then; the last one read when the deadline passes, for the caller's assert)."""
        seen = [self.metric(name)]

        def above() -> bool:
            seen.append(self.metric(name))
            return seen[-1] > floor

        with contextlib.suppress(AssertionError):
            wait_until(above, timeout, f"{name} above {floor}")
        return seen[-1]

    def settle(self) -> None:
        """Wait for the runner's stats report that counts every request answered so far (one
        prefix-cache lookup, hit or miss, each), so metric baselines are current."""
        def current() -> bool:
            lookups = (self.metric("flock_prefix_cache_hits_total")
                       + self.metric("flock_prefix_cache_misses_total"))
            return lookups >= self.metric("flock_requests_total")

        wait_until(current, 30, f"{self.name}'s runner to report every request",
                   describe=self.log_tail)

    def log_tail(self) -> str:
        return self.agent.log_text()[-3000:]


def _start(name: str, model_dir: Path, state: Path, *extra: str) -> Node:
    agent = start_agent(state, model=str(model_dir), wait=False,
                        args=["--metrics", "--no-discovery", *extra])
    return Node(name, agent)


def _wait_ready(node: Node) -> None:
    node.agent.wait_ready(240)
    # Models load on first use: one short request loads the runner and compiles its step.
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused")
    client.chat.completions.create(model=node.model, max_tokens=2, temperature=0,
                                   messages=[{"role": "user", "content": "Hi"}])


def _stop(node: Node) -> None:
    node.agent.stop()


@dataclass
class Agents:
    cached: Node
    uncached: Node
    small: Node

    def alive(self) -> None:
        for node in (self.cached, self.uncached, self.small):
            assert node.process.poll() is None, f"agent {node.name} died: {node.log_tail()}"


@pytest.fixture(scope="module")
def agents(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    small_bytes = SMALL_CACHE_TOKENS * KV_BYTES_PER_TOKEN
    nodes = [
        _start("cached", smollm2_dir, tmp_path_factory.mktemp("cached")),
        _start("uncached", smollm2_dir, tmp_path_factory.mktemp("uncached"),
               "--prefix-cache", "0"),
        _start("small", smollm2_dir, tmp_path_factory.mktemp("small"),
               "--prefix-cache", str(small_bytes)),
    ]
    try:
        for node in nodes:
            _wait_ready(node)
        yield Agents(*nodes)
    finally:
        for node in nodes:
            _stop(node)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Any:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(smollm2_dir)


def _notes(tokenizer: Any, topic: str, tokens: int) -> str:
    """A system prompt of about `tokens` tokens that no other conversation starts with."""
    text = f"{topic.capitalize()} desk. You answer questions about the {topic} archive."
    i = 0
    while len(tokenizer.encode(text)) < tokens:
        block = " ".join(f"Fact {j}: the {topic} archive lists item {j * 7} in drawer {j % 5}."
                         for j in range(i, i + 5))
        text, i = f"{text} {block}", i + 5
    return text


# ---- OpenAI --------------------------------------------------------------------------------


def _openai_turns(node: Node, system: str) -> list[tuple[str, int, int]]:
    """(reply, prompt_tokens, cached_tokens) of each turn of one conversation; turn 2 streams
    (its usage comes in the last chunk), the others do not."""
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused")
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    turns = []
    for index, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": question})
        if index == 1:
            chunks = list(client.chat.completions.create(
                model=node.model, messages=messages, temperature=0,  # type: ignore[arg-type]
                max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            reply = client.chat.completions.create(
                model=node.model, messages=messages, temperature=0,  # type: ignore[arg-type]
                max_tokens=MAX_TOKENS)
            text, usage = reply.choices[0].message.content or "", reply.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        turns.append((text, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0))
        messages.append({"role": "assistant", "content": text})
    return turns


def test_openai_conversation_hits_the_cache_from_turn_two_and_answers_as_uncached(
    agents: Agents, tokenizer: Any
) -> None:
    system = _notes(tokenizer, "library", 300)
    agents.cached.settle()
    hits_before = agents.cached.metric("flock_prefix_cache_hits_total")
    turns = _openai_turns(agents.cached, system)
    reference = _openai_turns(agents.uncached, system)
    agents.alive()
    assert [cached for _, _, cached in reference] == [0, 0, 0]
    # Turn 1 is new; every later turn reuses at least the whole previous prompt.
    assert turns[0][2] == 0
    for previous, turn in itertools.pairwise(turns):
        assert previous[1] <= turn[2] < turn[1]
    assert [text for text, _, _ in turns] == [text for text, _, _ in reference]
    assert [p for _, p, _ in turns] == [p for _, p, _ in reference]
    assert agents.cached.wait_metric_above("flock_prefix_cache_hits_total", hits_before + 1) \
        == hits_before + 2
    assert agents.cached.metric("flock_cached_prompt_tokens_total") >= turns[1][2] + turns[2][2]


# ---- Anthropic -----------------------------------------------------------------------------


def _anthropic_turns(node: Node, system: str) -> list[tuple[str, Any]]:
    """(reply, usage) of each turn of one conversation."""
    client = anthropic.Anthropic(base_url=node.url, api_key="unused")
    messages: list[dict[str, str]] = []
    turns = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        message = client.messages.create(model=node.model, max_tokens=MAX_TOKENS,
                                         system=system,
                                         messages=messages,  # type: ignore[arg-type]
                                         extra_body={"temperature": 0})
        text = "".join(getattr(block, "text", "") for block in message.content)
        turns.append((text, message.usage))
        messages.append({"role": "assistant", "content": text})
    return turns


def test_anthropic_conversation_hits_the_cache_from_turn_two_and_answers_as_uncached(
    agents: Agents, tokenizer: Any
) -> None:
    system = _notes(tokenizer, "museum", 300)
    cached = agents.cached
    cached.settle()
    hits_before = cached.metric("flock_prefix_cache_hits_total")
    misses_before = cached.metric("flock_prefix_cache_misses_total")
    turns = [text for text, _ in _anthropic_turns(cached, system)]
    # Turn 1 misses, turns 2 and 3 hit.
    assert cached.wait_metric_above("flock_prefix_cache_hits_total", hits_before + 1) \
        == hits_before + 2
    assert cached.metric("flock_prefix_cache_misses_total") == misses_before + 1
    assert turns == [text for text, _ in _anthropic_turns(agents.uncached, system)]
    agents.alive()


def test_anthropic_usage_reports_cache_read_input_tokens(agents: Agents, tokenizer: Any) -> None:
    system = _notes(tokenizer, "observatory", 200)
    turns = _anthropic_turns(agents.cached, system)
    assert turns[0][1].cache_read_input_tokens == 0
    client = anthropic.Anthropic(base_url=agents.cached.url, api_key="unused")
    messages: list[dict[str, str]] = []
    for (text, usage), question in zip(turns, QUESTIONS, strict=True):
        messages.append({"role": "user", "content": question})
        counted = client.messages.count_tokens(model=agents.cached.model, system=system,
                                               messages=messages)  # type: ignore[arg-type]
        # Anthropic's split: the prompt is input_tokens + cache_read_input_tokens.
        assert usage.input_tokens + usage.cache_read_input_tokens == counted.input_tokens
        messages.append({"role": "assistant", "content": text})
    for _, usage in turns[1:]:
        assert usage.cache_read_input_tokens > 0
    # A stream reports the same split in its final message_delta.
    with client.messages.stream(model=agents.cached.model, max_tokens=MAX_TOKENS, system=system,
                                messages=messages[:1],  # type: ignore[arg-type]
                                extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens > 0
    prompt = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert prompt == turns[0][1].input_tokens


# ---- Ollama --------------------------------------------------------------------------------


def _ollama_turns(node: Node, system: str) -> list[str]:
    client = ollama.Client(host=node.url)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    replies = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        reply = client.chat(model=node.model, messages=messages,
                            options={"temperature": 0, "num_predict": MAX_TOKENS})
        replies.append(reply.message.content or "")
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def test_ollama_conversation_hits_the_cache_from_turn_two_and_answers_as_uncached(
    agents: Agents, tokenizer: Any
) -> None:
    """Ollama's API has no cached-tokens field: the hits are read from /metrics."""
    system = _notes(tokenizer, "garden", 300)
    cached = agents.cached
    cached.settle()
    hits_before = cached.metric("flock_prefix_cache_hits_total")
    misses_before = cached.metric("flock_prefix_cache_misses_total")
    replies = _ollama_turns(cached, system)
    assert cached.wait_metric_above("flock_prefix_cache_hits_total", hits_before + 1) \
        == hits_before + 2
    assert cached.metric("flock_prefix_cache_misses_total") == misses_before + 1
    assert replies == _ollama_turns(agents.uncached, system)
    agents.alive()


# ---- eviction under a small byte bound -------------------------------------------------------


def _short_turn(node: Node, messages: list[dict[str, str]]) -> tuple[str, int, int]:
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused")
    reply = client.chat.completions.create(model=node.model, messages=messages,  # type: ignore[arg-type]
                                           temperature=0, max_tokens=MAX_TOKENS)
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    return (reply.choices[0].message.content or "", reply.usage.prompt_tokens,
            reply.usage.prompt_tokens_details.cached_tokens or 0)


def test_eviction_under_a_small_bound_keeps_answers_identical(
    agents: Agents, tokenizer: Any
) -> None:
    """Conversations on the small agent: one fits its prefix cache, two do not, so every new one
    evicts the one before. Turn 2 of each hits and answers as the uncached agent does; after the
    evictions the first conversation's turn 2 is computed from scratch and answers the same."""
    small = agents.small
    small.settle()
    evictions_before = small.metric("flock_kv_evictions_total")
    names = ["Ada", "Grace", "Edsger", "Barbara"]
    second_turns: list[tuple[list[dict[str, str]], str]] = []
    for name in names:
        notes = _notes(tokenizer, f"{name}'s notebook", SMALL_CACHE_TOKENS * 4 // 10)
        messages = [
            {"role": "system", "content": f"{notes} Answer briefly."},
            {"role": "user", "content": f"Write one sentence about {name}'s favourite number."},
        ]
        text, prompt_tokens, cached_tokens = _short_turn(small, messages)
        assert cached_tokens == 0
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": "Now say it again in French."}]
        answer, prompt2_tokens, cached_tokens = _short_turn(small, messages)
        assert cached_tokens >= prompt_tokens  # the conversation fits the bound ...
        # ... but its newest entry and any other conversation's first turn do not, together.
        assert prompt2_tokens + prompt_tokens > SMALL_CACHE_TOKENS
        assert prompt2_tokens + MAX_TOKENS <= SMALL_CACHE_TOKENS
        assert answer == _short_turn(agents.uncached, messages)[0]
        second_turns.append((messages, answer))
    evictions = small.wait_metric_above("flock_kv_evictions_total",
                                        evictions_before + len(names) - 2)
    assert evictions >= evictions_before + len(names) - 1
    # The first conversations are gone from the cache; their answers come out the same.
    for messages, answer in second_turns[:2]:
        again, _, cached_tokens = _short_turn(small, messages)
        assert cached_tokens == 0
        assert again == answer
    agents.alive()
    # KV figures stay within the budget throughout.
    assert small.metric("flock_kv_cache_used_bytes") <= small.metric(
        "flock_kv_cache_capacity_bytes")
    if small.has_metric("flock_prefix_cache_bytes"):  # not exported yet (see the report)
        assert small.metric("flock_prefix_cache_bytes") <= SMALL_CACHE_TOKENS * KV_BYTES_PER_TOKEN
