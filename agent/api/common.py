"""What every adapter does the same way: find the model, template or tokenize the prompt, size
the completion against the context, and run the engine until `Finished` or a client disconnect.

Nothing here knows a wire format; failures are raised as `ApiError` for the adapter's own
exception handler to render.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from litestar import Request, Response
from litestar.di import NamedDependency

from agent.api.errors import ApiError, ApiName, error_status, from_failed, invalid, model_not_found
from agent.api.sse import ClosingStream, aclose, prepend, until_disconnect
from agent.engine import ChatMessage, Engine, ModelInfo, ModelNotFound
from agent.generation import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenChunk,
    TokenLogprob,
)
from agent.metrics import FlockMetrics, RequestMetrics
from agent.settings import NodeSettings

Pull = Callable[[str], Awaitable[ModelInfo]]
AnyRequest = Request[Any, Any, Any]


@dataclass(frozen=True)
class Services:
    """What the controllers need, injected into handlers as the `services` dependency."""

    engine: Engine
    settings: NodeSettings
    ready: Callable[[], bool]
    metrics: FlockMetrics
    pull: Pull | None = None


# How handlers declare the injected services (Litestar wants named dependencies marked).
ServicesDep = NamedDependency[Services]


def request_id() -> str:
    return uuid.uuid4().hex


def resolve_model(engine: Engine, name: str, *, to_run: bool = True) -> ModelInfo:
    """The model a request names; one nothing here can run is a 400 at once when the request
    would run it (`to_run`), before any templating or placement."""
    if not name:
        raise invalid("'model' must name a model", param="model")
    try:
        info = engine.get_model(name)
    except ModelNotFound:
        raise model_not_found(name) from None
    if to_run and info.refusal:
        raise invalid(f"model '{name}' cannot be served: {info.refusal}", param="model")
    return info


def _template_errors() -> tuple[type[BaseException], ...]:
    # Chat templates are Jinja; a conversation the template refuses (e.g. roles that do not
    # alternate) is the client's mistake, not a server fault.
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - jinja2 ships with mlx-lm's tokenizer stack
        return (ValueError,)
    return (ValueError, TemplateError)


_TEMPLATE_ERRORS = _template_errors()


# Limits on what one request may ask of the node. Every message is templated and every stop
# string is matched against each new token in the runner's one scheduling loop, so without a
# bound one request (within the body limit) could stall the agent or every stream of its batch.
MAX_MESSAGES = 10_000
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 256


async def render_chat(engine: Engine, model: str, messages: list[ChatMessage],
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
    if len(messages) > MAX_MESSAGES:
        raise invalid(f"A conversation may have at most {MAX_MESSAGES} messages; this one has "
                      f"{len(messages)}.", param="messages")
    try:
        return await engine.render_chat(model, messages, tools)
    except ModelNotFound:
        raise model_not_found(model) from None
    except _TEMPLATE_ERRORS as exc:
        raise invalid(f"The model's chat template rejected these messages: {exc}",
                      param="messages") from None


async def tokenize(engine: Engine, model: str, text: str) -> list[int]:
    try:
        return await engine.tokenize(model, text)
    except ModelNotFound:
        raise model_not_found(model) from None
    except ValueError as exc:
        raise invalid(f"The prompt could not be tokenized: {exc}", param="prompt") from None


def completion_budget(
    info: ModelInfo,
    prompt_tokens: int,
    requested: int | None,
    default: int,
    *,
    context: int | None = None,
    prompt_param: str = "messages",
) -> int:
    """How many tokens the completion may have: what was asked (else the node default), capped by
    the room the context leaves. A prompt that leaves no room can never run, so it is a 400."""
    window = context if context is not None else info.context_length
    room = window - prompt_tokens
    if room <= 0:
        raise invalid(
            f"This model's maximum context length is {window} tokens, but the prompt has "
            f"{prompt_tokens} tokens, which leaves no room for a completion.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    # Clients routinely ask for more than a small model's context holds (max_tokens=32000);
    # generation stops at the context end with a "length" finish either way, so cap, don't fail.
    return min(requested if requested is not None else default, room)


def stop_list(stop: str | list[str] | None, param: str) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise invalid("Stop sequences must be non-empty strings.", param=param)
    unique = tuple(dict.fromkeys(stops))
    if len(unique) > MAX_STOP_STRINGS:
        raise invalid(f"At most {MAX_STOP_STRINGS} stop sequences are supported; got "
                      f"{len(unique)}.", param=param)
    if any(len(s) > MAX_STOP_CHARS for s in unique):
        raise invalid(f"Stop sequences may be at most {MAX_STOP_CHARS} characters long.",
                      param=param)
    return unique


def seed_value(seed: int | None) -> int | None:
    """A client's seed in the unsigned 64-bit range MLX keys take; negative seeds (valid in
    OpenAI's API) wrap instead of failing in the sampler."""
    return None if seed is None else seed % 2**64


def join_text(parts: list[str]) -> str:
    return "\n".join(parts)


@dataclass
class Timing:
    """Monotonic marks of one request, for APIs that report durations (Ollama)."""

    received_ns: int = field(default_factory=time.monotonic_ns)
    started_ns: int = 0
    first_event_ns: int = 0
    finished_ns: int = 0


@dataclass
class Collected:
    """A whole completion gathered from the engine for a non-streaming response."""

    text: str
    logprobs: list[TokenLogprob]
    finished: Finished


async def metered(
    events: AsyncIterator[GenerationEvent], meter: RequestMetrics, metrics: FlockMetrics,
    api: ApiName,
) -> AsyncGenerator[GenerationEvent, None]:
    """The engine's events, timed for the metrics; a stream closed before its end is a client
    that went away (499)."""
    try:
        async for event in events:
            if isinstance(event, TokenChunk):
                meter.tokens(len(event.token_ids))
            elif isinstance(event, Finished):
                meter.done(200, prompt_tokens=event.usage.prompt_tokens,
                           cached_tokens=event.usage.cached_tokens)
            elif isinstance(event, Failed):
                if event.code == "internal":
                    metrics.error("runner_failed")
                meter.done(error_status(api, from_failed(event)))
            yield event
    except Exception:
        metrics.error("engine_exception")
        meter.done(500)
        raise
    finally:
        meter.done(499)  # no-op when the request already ended
        await aclose(events)


def _events(services: Services, api: ApiName, generation: GenerationRequest,
            timing: Timing | None) -> AsyncGenerator[GenerationEvent, None]:
    if timing is not None:
        timing.started_ns = time.monotonic_ns()
    meter = services.metrics.request(api, generation.model)
    return metered(services.engine.generate(generation), meter, services.metrics, api)


async def _gather(events: AsyncIterator[GenerationEvent], timing: Timing | None) -> Collected:
    texts: list[str] = []
    logprobs: list[TokenLogprob] = []
    try:
        async for event in events:
            if timing is not None and not timing.first_event_ns:
                timing.first_event_ns = time.monotonic_ns()
            if isinstance(event, TokenChunk):
                texts.append(event.text)
                logprobs.extend(event.logprobs or ())
            elif isinstance(event, Finished):
                if timing is not None:
                    timing.finished_ns = time.monotonic_ns()
                return Collected("".join(texts), logprobs, event)
            elif isinstance(event, Failed):
                raise from_failed(event)
    finally:
        await aclose(events)
    raise ApiError("internal", "The generation ended without finishing.")


async def collect(
    request: AnyRequest,
    services: Services,
    api: ApiName,
    generation: GenerationRequest,
    timing: Timing | None = None,
) -> Collected:
    """Run a request to its end; a client that disconnects first cancels it."""
    events = _events(services, api, generation, timing)
    return await until_disconnect(request, _gather(events, timing))


async def _first(events: AsyncIterator[GenerationEvent]) -> GenerationEvent:
    try:
        return await anext(events)
    except StopAsyncIteration:
        raise ApiError("internal", "The generation ended without any event.") from None


async def start_stream(
    request: AnyRequest,
    services: Services,
    api: ApiName,
    generation: GenerationRequest,
    timing: Timing | None = None,
) -> AsyncIterator[GenerationEvent]:
    """Start a request and wait for its first event before any response is sent, so a request
    refused up front (overloaded, too long, no such model) gets a real HTTP error status."""
    events = _events(services, api, generation, timing)
    try:
        first = await until_disconnect(request, _first(events))
    except BaseException:
        await aclose(events)
        raise
    if timing is not None:
        timing.first_event_ns = time.monotonic_ns()
    if isinstance(first, Failed):
        await aclose(events)
        raise from_failed(first)
    return prepend(first, events)


async def respond(
    request: AnyRequest,
    services: Services,
    api: ApiName,
    generation: GenerationRequest,
    *,
    stream: bool,
    frames: Callable[[AsyncIterator[GenerationEvent]], AsyncGenerator[bytes, None]],
    media_type: str,
    whole: Callable[[Collected], Any],
    timing: Timing | None = None,
) -> Response[Any]:
    """Run a request as the client asked: streamed as the API's `frames`, or collected and
    answered as one `whole` object."""
    if stream:
        events = await start_stream(request, services, api, generation, timing)
        return ClosingStream(frames(events), media_type=media_type)
    result = await collect(request, services, api, generation, timing)
    return Response(whole(result))
