"""Anthropic adapter: /v1/messages and /v1/messages/count_tokens.

Requests become one `GenerationRequest`; the engine's events become a message object, or the
Messages streaming event sequence: message_start, content_block_start, ping,
content_block_delta..., content_block_stop, message_delta, message_stop.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from litestar import Controller, Response, post
from litestar.params import JSONBody

from agent.api.anthropic_schema import (
    ContentBlockDelta,
    ContentBlockIn,
    ContentBlockStart,
    ContentBlockStop,
    CountTokensRequest,
    CountTokensResponse,
    DeltaUsage,
    MessageDelta,
    MessageDeltaBody,
    MessageOut,
    MessagesRequest,
    MessageStart,
    MessageStop,
    Ping,
    StopReason,
    TextBlock,
    TextDelta,
    UsageOut,
)
from agent.api.common import (
    AnyRequest,
    Collected,
    ServicesDep,
    collect,
    completion_budget,
    join_text,
    render_chat,
    request_id,
    resolve_model,
    start_stream,
    stop_list,
)
from agent.api.errors import (
    ApiError,
    anthropic_error_body,
    anthropic_exception_handler,
    from_failed,
    invalid,
    to_api_error,
    unsupported_field,
)
from agent.api.sse import SSE_MEDIA_TYPE, ClosingStream, aclose, sse_event
from agent.engine import ChatMessage
from agent.generation import (
    Failed,
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
    Usage,
)

DEFAULT_TEMPERATURE = 1.0

# --- request checks and conversion (pure) -----------------------------------------------------


def _blocks_text(blocks: str | list[ContentBlockIn], where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    texts = []
    for j, block in enumerate(blocks):
        if block.type != "text" or block.text is None:
            raise invalid(
                f"Content block type '{block.type}' is not supported; only 'text' blocks are.",
                param=f"{where}[{j}]")
        texts.append(block.text)
    return join_text(texts)


def check_conversation(req: MessagesRequest | CountTokensRequest) -> None:
    """Reject what flock accepts only in its neutral form, naming the field."""
    if not req.messages:
        raise invalid("'messages' must contain at least one message.", param="messages")
    if req.tools:
        raise unsupported_field("tools", "(tool use) is not supported yet")
    if req.tool_choice is not None and req.tool_choice.get("type") not in ("auto", "none"):
        raise unsupported_field("tool_choice", "(tool use) is not supported yet")
    if req.thinking is not None and req.thinking.get("type") != "disabled":
        raise unsupported_field("thinking", "(extended thinking) is not supported")
    if req.output_config is not None and req.output_config.effort is not None:
        raise unsupported_field("output_config.effort", "is not supported")
    if req.output_config is not None and req.output_config.format is not None:
        raise unsupported_field("output_config.format", "(structured output) is not supported yet")
    if isinstance(req, MessagesRequest) and req.container is not None:
        raise unsupported_field("container", "(code execution) is not supported")
    if req.messages[-1].role == "assistant":
        # Prefill would need the template to continue the last turn instead of opening one.
        raise invalid("A final assistant message (prefill) is not supported yet.",
                      param=f"messages[{len(req.messages) - 1}]")


def chat_messages(req: MessagesRequest | CountTokensRequest) -> list[ChatMessage]:
    out = []
    if req.system is not None:
        system = _blocks_text(req.system, "system")
        if system:
            out.append(ChatMessage(role="system", content=system))
    for i, message in enumerate(req.messages):
        where = f"messages[{i}].content"
        out.append(ChatMessage(role=message.role, content=_blocks_text(message.content, where)))
    return out


def sampling_params(req: MessagesRequest, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        stop=stop_list(req.stop_sequences, "stop_sequences"),
    )


# --- responses (pure) -----------------------------------------------------------------------


def stop_reason(finished: Finished) -> tuple[StopReason, str | None]:
    if finished.reason == "length":
        return "max_tokens", None
    if finished.stop_sequence is not None:
        return "stop_sequence", finished.stop_sequence
    return "end_turn", None


@dataclass(frozen=True)
class ResponseMeta:
    id: str
    model: str
    input_tokens: int


def message_out(result: Collected, meta: ResponseMeta) -> MessageOut:
    reason, sequence = stop_reason(result.finished)
    usage = result.finished.usage
    return MessageOut(
        id=meta.id, content=[TextBlock(text=result.text)] if result.text else [],
        model=meta.model,
        stop_reason=reason, stop_sequence=sequence,
        usage=UsageOut(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens),
    )


async def message_sse(events: AsyncIterator[GenerationEvent], meta: ResponseMeta,
                      ) -> AsyncGenerator[bytes, None]:
    try:
        yield sse_event("message_start", MessageStart(message=MessageOut(
            id=meta.id, content=[], model=meta.model, stop_reason=None, stop_sequence=None,
            usage=UsageOut(input_tokens=meta.input_tokens, output_tokens=0))))
        yield sse_event("content_block_start",
                        ContentBlockStart(index=0, content_block=TextBlock(text="")))
        yield sse_event("ping", Ping())
        async for event in events:
            if isinstance(event, TokenChunk):
                if event.text:
                    yield sse_event("content_block_delta",
                                    ContentBlockDelta(index=0, delta=TextDelta(text=event.text)))
            elif isinstance(event, Failed):
                yield sse_event("error", anthropic_error_body(from_failed(event)))
                return
            else:
                reason, sequence = stop_reason(event)
                yield sse_event("content_block_stop", ContentBlockStop(index=0))
                yield sse_event("message_delta", MessageDelta(
                    delta=MessageDeltaBody(stop_reason=reason, stop_sequence=sequence),
                    usage=DeltaUsage(output_tokens=event.usage.completion_tokens)))
                yield sse_event("message_stop", MessageStop())
                return
        yield sse_event("error", anthropic_error_body(
            ApiError("internal", "The generation ended without finishing.")))
    except Exception as exc:  # the status line is sent: report a broken engine in-band
        yield sse_event("error", anthropic_error_body(to_api_error(exc)))
    finally:
        await aclose(events)


def _nothing_to_generate(rid: str, meta: ResponseMeta, stream: bool) -> Response[MessageOut]:
    """max_tokens 0: the answer to a cache warm-up, which flock's automatic prefix cache needs
    no help with."""
    done = Finished(id=rid, reason="length",
                    usage=Usage(prompt_tokens=meta.input_tokens, completion_tokens=0))
    if stream:
        return ClosingStream(message_sse(_just(done), meta), media_type=SSE_MEDIA_TYPE)
    return Response(message_out(Collected("", [], done), meta))


async def _just(event: GenerationEvent) -> AsyncGenerator[GenerationEvent, None]:
    yield event


# --- routes ---------------------------------------------------------------------------------


class AnthropicController(Controller):
    path = "/v1/messages"
    tags = ["Anthropic"]
    exception_handlers = {Exception: anthropic_exception_handler}

    @post("", status_code=200, summary="Create a message")
    async def create_message(
        self, request: AnyRequest, services: ServicesDep, data: JSONBody[MessagesRequest],
    ) -> Response[MessageOut]:
        check_conversation(data)
        engine = services.engine
        info = resolve_model(engine, data.model)
        prompt = await render_chat(engine, info.name, chat_messages(data))
        max_tokens = completion_budget(info, len(prompt), data.max_tokens,
                                       services.settings.max_tokens_default)
        rid = request_id()
        meta = ResponseMeta(id=f"msg_{rid}", model=info.name, input_tokens=len(prompt))
        if data.max_tokens == 0:
            return _nothing_to_generate(rid, meta, bool(data.stream))
        generation = GenerationRequest(id=rid, model=info.name, prompt_tokens=prompt,
                                       sampling=sampling_params(data, max_tokens))
        if data.stream:
            events = await start_stream(request, services, "anthropic", generation)
            return ClosingStream(message_sse(events, meta), media_type=SSE_MEDIA_TYPE)
        result = await collect(request, services, "anthropic", generation)
        return Response(message_out(result, meta))

    @post("/count_tokens", status_code=200, summary="Count the tokens of a message")
    async def count_tokens(self, services: ServicesDep, data: JSONBody[CountTokensRequest],
                           ) -> CountTokensResponse:
        check_conversation(data)
        info = resolve_model(services.engine, data.model)
        prompt = await render_chat(services.engine, info.name, chat_messages(data))
        return CountTokensResponse(input_tokens=len(prompt))
