"""EchoEngine: a deterministic in-memory test double of the `Engine` protocol, for API adapter
tests only (wire shapes, error formats, event order, validation). It is not a model: it
"generates" by echoing the last user turn through a one-character-per-token fake tokenizer.

Markers in the prompt steer it: "[overloaded]" / "[bad_request]" / "[not_found]" fail up front,
"[break]" fails after a few tokens, "[crash]" raises mid-stream, "[slow]" repeats the reply
slowly until max_tokens (to test cancellation), "TEMPLATE_ERROR" makes the chat template refuse.
Its tool format is `tool_format_name` ("hermes" unless a test sets another: its template
ignores `tools`, which keeps prompts inside the echo model's small context), so a user turn
holding a call in that format comes back as a call.

`running_server` serves an app with a real uvicorn server on a free loopback port.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from agent.engine import ChatMessage, LoadedModel, ModelInfo, ModelNotFound
from agent.generation import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from agent.tools.types import ToolFormat

ECHO_MODEL = ModelInfo(
    name="echo",
    architecture="llama",
    parameters=135_000_000,
    quantization="F32",
    size_bytes=540_000_000,
    context_length=256,
    digest="sha256:" + "ab" * 32,
    modified_at=1_700_000_000.0,
    chat_template="{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}",
)

ASSISTANT = "<|assistant|>"
FAIL_MARKERS = {"[overloaded]": "overloaded", "[bad_request]": "bad_request",
                "[not_found]": "not_found"}


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(tokens: list[int]) -> str:
    return "".join(chr(t) for t in tokens)


def render(messages: list[ChatMessage]) -> str:
    return "".join(f"<|{m.role}|>{m.content}\n" for m in messages) + ASSISTANT


def reply_for(prompt: str) -> str:
    """The last user turn of a templated prompt, or a raw prompt as it is."""
    if not prompt.endswith(ASSISTANT):
        return prompt
    start = prompt.rfind("<|user|>")
    if start < 0:
        return ""
    turn = prompt[start + len("<|user|>"):]
    return turn[: turn.find("\n")] if "\n" in turn else turn


def _logprob(c: str, top: int) -> TokenLogprob:
    alternatives = [TopLogprob(ord(c), c, -0.25), TopLogprob(ord("?"), "?", -1.5),
                    TopLogprob(ord("!"), "!", -2.5)]
    return TokenLogprob(ord(c), c, -0.25, alternatives[:top])


class EchoEngine:
    """Implements `agent.engine.Engine`; records every request and every closed stream."""

    def __init__(self, token_delay: float = 0.02) -> None:
        self.token_delay = token_delay  # used by "[slow]" prompts only
        self.requests: list[GenerationRequest] = []
        self.closed: list[str] = []
        self.cancelled: list[str] = []
        self.pulled: list[str] = []
        self.tool_format_name: ToolFormat = "hermes"
        self.rendered_tools: list[list[dict[str, Any]] | None] = []  # `tools` of each render

    def list_models(self) -> list[ModelInfo]:
        return [ECHO_MODEL]

    def get_model(self, name: str) -> ModelInfo:
        if name != ECHO_MODEL.name:
            raise ModelNotFound(name)
        return ECHO_MODEL

    def loaded_models(self) -> list[LoadedModel]:
        return [LoadedModel(name=ECHO_MODEL.name, size_bytes=ECHO_MODEL.size_bytes)]

    async def render_chat(self, model: str, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        self.get_model(model)
        if any("TEMPLATE_ERROR" in m.content for m in messages):
            raise ValueError("Conversation roles must alternate user/assistant")
        self.rendered_tools.append(tools)
        return encode(render(messages))

    async def tool_format(self, model: str) -> ToolFormat:
        self.get_model(model)
        return self.tool_format_name

    async def tokenize(self, model: str, text: str) -> list[int]:
        self.get_model(model)
        return encode(text)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self.requests.append(request)
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        finished = False
        try:
            prompt = decode(request.prompt_tokens)
            for marker, code in FAIL_MARKERS.items():
                if marker in prompt:
                    finished = True
                    yield Failed(id=request.id, code=code, message=f"echo refused: {code}")  # type: ignore[arg-type]
                    return
            sampling = request.sampling
            reply = reply_for(prompt)
            slow = "[slow]" in prompt
            if slow:
                reply = (reply * (sampling.max_tokens // max(len(reply), 1) + 1))
            reason, stop_sequence = "stop", None
            hits = [(reply.find(s), s) for s in sampling.stop if s in reply]
            if hits:
                at, stop_sequence = min(hits)
                reply = reply[:at]
            if len(reply) > sampling.max_tokens:
                reply, reason, stop_sequence = reply[: sampling.max_tokens], "length", None
            for i, c in enumerate(reply):
                if slow:
                    await asyncio.sleep(self.token_delay)
                if "[break]" in prompt and i == 3:
                    finished = True
                    yield Failed(id=request.id, code="internal", message="echo runner broke")
                    return
                if "[crash]" in prompt and i == 2:
                    raise RuntimeError("echo engine crashed")
                yield TokenChunk(
                    id=request.id, text=c, token_ids=[ord(c)],
                    logprobs=[_logprob(c, sampling.top_logprobs)] if sampling.logprobs else None,
                )
            if stop_sequence is not None:
                # A real scheduler holds text back while a stop string is undecided.
                yield TokenChunk(id=request.id, text="", token_ids=[0])
            finished = True
            yield Finished(
                id=request.id, reason=reason,  # type: ignore[arg-type]
                usage=Usage(prompt_tokens=len(request.prompt_tokens),
                            completion_tokens=len(reply)),
                stop_sequence=stop_sequence,
            )
        finally:
            self.closed.append(request.id)
            if not finished:
                self.cancelled.append(request.id)

    async def pull(self, name: str) -> ModelInfo:
        """A `pull` callable for create_app: knows only the echo model."""
        self.pulled.append(name)
        if name == "broken":
            raise OSError("network unreachable")
        return self.get_model(name)


@contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())
