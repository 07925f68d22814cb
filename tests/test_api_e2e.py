"""End to end through the real engine: `python -m agent run` with SmolLM2 as a subprocess, asked
one question through the official openai, anthropic and ollama clients, streaming and not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anthropic
import ollama
import openai
import pytest
from live_agent import LiveAgent

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 24


@dataclass
class Node:
    url: str
    model: str


@pytest.fixture(scope="module")
def node(smollm2_agent: LiveAgent, smollm2_dir: Path) -> Node:
    """The session's shared SmolLM2 agent (tests/conftest.py): this module, the structured
    output and the tools modules only ask it questions, so they share one start."""
    return Node(smollm2_agent.url, str(smollm2_dir))


def test_openai_client_answers_paris(node: Node) -> None:
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused")
    reply = client.chat.completions.create(model=node.model, messages=QUESTION,  # type: ignore[arg-type]
                                           temperature=0, max_tokens=MAX_TOKENS)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.usage is not None
    assert reply.usage.completion_tokens <= MAX_TOKENS
    chunks = list(client.chat.completions.create(
        model=node.model, messages=QUESTION, temperature=0,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_anthropic_client_answers_paris(node: Node) -> None:
    client = anthropic.Anthropic(base_url=node.url, api_key="unused")
    message = client.messages.create(model=node.model, max_tokens=MAX_TOKENS,
                                     messages=QUESTION,  # type: ignore[arg-type]
                                     extra_body={"temperature": 0})
    text = message.content[0].text  # type: ignore[union-attr]
    assert "Paris" in text
    assert message.stop_reason in ("end_turn", "max_tokens")
    counted = client.messages.count_tokens(model=node.model, messages=QUESTION)  # type: ignore[arg-type]
    # Anthropic's split: tokens read from the prefix cache are not counted as input_tokens.
    assert counted.input_tokens == (message.usage.input_tokens
                                    + (message.usage.cache_read_input_tokens or 0))
    with client.messages.stream(model=node.model, max_tokens=MAX_TOKENS,
                                messages=QUESTION,  # type: ignore[arg-type]
                                extra_body={"temperature": 0}) as stream:
        assert "".join(stream.text_stream) == text


def test_ollama_client_answers_paris(node: Node) -> None:
    client = ollama.Client(host=node.url)
    reply = client.chat(model=node.model, messages=QUESTION,
                        options={"temperature": 0, "num_predict": MAX_TOKENS})
    assert "Paris" in (reply.message.content or "")
    assert reply.eval_count is not None
    assert reply.eval_count <= MAX_TOKENS
    parts = list(client.generate(model=node.model, prompt=QUESTION[0]["content"], stream=True,
                                 options={"temperature": 0, "num_predict": MAX_TOKENS}))
    assert "Paris" in "".join(p.response or "" for p in parts)
    assert parts[-1].done


def test_greedy_answers_agree_across_the_three_apis(node: Node) -> None:
    """The same conversation and greedy sampling reach the engine identically from every API."""
    chat = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused").chat.completions.create(
        model=node.model, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)  # type: ignore[arg-type]
    message = anthropic.Anthropic(base_url=node.url, api_key="unused").messages.create(
        model=node.model, max_tokens=MAX_TOKENS, messages=QUESTION,  # type: ignore[arg-type]
        extra_body={"temperature": 0})
    reply = ollama.Client(host=node.url).chat(
        model=node.model, messages=QUESTION, options={"temperature": 0, "num_predict": MAX_TOKENS})
    assert chat.choices[0].message.content == message.content[0].text  # type: ignore[union-attr]
    assert chat.choices[0].message.content == reply.message.content
