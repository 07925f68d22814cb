"""Streaming plumbing shared by the adapters: SSE and NDJSON framing, a streaming response that
always closes its generator, and races against the client going away.

A request's engine stream must be closed as soon as its client disconnects, since closing it is
what cancels the generation. Litestar cancels the task iterating a streaming body on disconnect,
which can leave the body generator suspended at a `yield` until garbage collection, so
`ClosingStream` closes it explicitly. Non-streaming requests have no body iterator to cancel, so
they await the engine under `until_disconnect`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import anyio
import msgspec
from litestar import Request
from litestar.enums import MediaType
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Send

from agent.api.errors import ApiError, ClientDisconnected, from_failed, to_api_error
from agent.generation import Failed, Finished, GenerationEvent, TokenChunk

T = TypeVar("T")

SSE_MEDIA_TYPE = "text/event-stream"
NDJSON_MEDIA_TYPE = "application/x-ndjson"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

_encoder = msgspec.json.Encoder()


def sse_data(payload: Any) -> bytes:
    """One `data:` event (OpenAI style); JSON never contains a raw newline, so one line is safe."""
    return b"data: " + _encoder.encode(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_event(event: str, payload: Any) -> bytes:
    """One named event (Anthropic style)."""
    return b"event: " + event.encode() + b"\ndata: " + _encoder.encode(payload) + b"\n\n"


def ndjson_line(payload: Any) -> bytes:
    return _encoder.encode(payload) + b"\n"


async def aclose(stream: object) -> None:
    """Close an async iterator if it can be closed, even while our own task is being cancelled."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


class _ClosingASGIStream(ASGIStreamingResponse):
    async def send_body(self, send: Send, receive: Receive) -> None:
        try:
            await super().send_body(send, receive)
        finally:
            await aclose(self.iterator)


class ClosingStream(Stream):
    """A streaming response whose body generator is closed however the response ends."""

    def __init__(self, content: AsyncGenerator[bytes, None], *, media_type: str,
                 headers: dict[str, str] | None = None) -> None:
        extra = _SSE_HEADERS if media_type == SSE_MEDIA_TYPE else {}
        super().__init__(content, media_type=media_type, headers={**extra, **(headers or {})},
                         status_code=200)

    def to_asgi_response(  # type: ignore[override]
        self,
        app: Any,
        request: Request[Any, Any, Any],
        *,
        encoded_headers: Iterable[tuple[bytes, bytes]] | None = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        **_: Any,
    ) -> ASGIResponse:
        return _ClosingASGIStream(
            iterator=self.iterator,  # type: ignore[arg-type]
            content_length=0,
            cookies=self.cookies,
            encoded_headers=encoded_headers,
            encoding=self.encoding,
            headers={**(headers or {}), **self.headers},
            is_head_response=is_head_response,
            media_type=str(self.media_type or MediaType.JSON),
            status_code=self.status_code,
        )


async def _wait_for_disconnect(request: Request[Any, Any, Any]) -> None:
    # Called only after the body has been read, so the server has nothing else to deliver.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientDisconnected) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
    if task in done:
        return task.result()
    raise ClientDisconnected


async def prepend(first: T, rest: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """`first`, then everything from `rest`; closing this closes `rest`."""
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await aclose(rest)


UNFINISHED = ApiError("internal", "The generation ended without finishing.")


async def relay(
    events: AsyncIterator[GenerationEvent],
    *,
    token: Callable[[TokenChunk], Iterable[bytes]],
    finish: Callable[[Finished], Iterable[bytes]],
    error: Callable[[ApiError], bytes],
    start: Callable[[], Iterable[bytes]] = lambda: (),
) -> AsyncGenerator[bytes, None]:
    """The body of a streamed response: `start` frames, then each token's frames until the
    finish frames; a failure ends it with the API's error frame. The status line is sent by
    then, so a broken engine (or a stream that stops without finishing) is reported in-band,
    and the engine's stream is closed however the body ends."""
    try:
        for data in start():
            yield data
        async for event in events:
            if isinstance(event, TokenChunk):
                for data in token(event):
                    yield data
            elif isinstance(event, Failed):
                yield error(from_failed(event))
                return
            else:
                for data in finish(event):
                    yield data
                return
        yield error(UNFINISHED)
    except Exception as exc:
        yield error(to_api_error(exc))
    finally:
        await aclose(events)
