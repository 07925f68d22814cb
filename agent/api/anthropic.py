"""Anthropic adapter: /v1/messages and /v1/messages/count_tokens.

Requests become one `GenerationRequest`; the engine's events become a message object, or the
Messages streaming event sequence: message_start, content_block_start, ping,
content_block_delta..., content_block_stop, message_delta, message_stop.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

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
    InputJsonDelta,
    MessageDelta,
    MessageDeltaBody,
    MessageOut,
    MessagesRequest,
    MessageStart,
    MessageStop,
    OutBlock,
    Ping,
    SignatureDelta,
    StopReason,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
    UsageOut,
)
from agent.api.common import (
    AnyRequest,
    Collected,
    ServicesDep,
    completion_budget,
    join_text,
    request_id,
    resolve_model,
    respond,
    stop_list,
)
from agent.api.errors import (
    anthropic_error_body,
    anthropic_exception_handler,
    invalid,
    unsupported_field,
)
from agent.api.sse import SSE_MEDIA_TYPE, ClosingStream, relay, sse_event
from agent.api.tools import (
    Prompt,
    ToolPlan,
    check_choice,
    check_schema,
    check_unique,
    new_call_id,
    prepare_prompt,
    tool_spec,
)
from agent.engine import ChatMessage, Engine, ModelInfo
from agent.generation import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
    Usage,
)
from agent.tools.grammar import close_objects
from agent.tools.output import Piece
from agent.tools.reasoning import Thought
from agent.tools.types import ToolCall, ToolChoice, ToolSpec

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
    if req.thinking is not None and req.thinking.get("type") not in ("enabled", "disabled"):
        raise invalid("'thinking.type' must be 'enabled' or 'disabled'.", param="thinking.type")
    if req.output_config is not None and req.output_config.effort is not None:
        raise unsupported_field("output_config.effort", "is not supported")
    if isinstance(req, MessagesRequest) and req.container is not None:
        raise unsupported_field("container", "(code execution) is not supported")
    if req.messages[-1].role == "assistant":
        # Prefill would need the template to continue the last turn instead of opening one.
        raise invalid("A final assistant message (prefill) is not supported yet.",
                      param=f"messages[{len(req.messages) - 1}]")


def message_tools(req: MessagesRequest | CountTokensRequest) -> list[ToolSpec]:
    """The request's client tools, checked; Anthropic's server tools are not available."""
    tools = []
    for i, tool in enumerate(req.tools or []):
        where = f"tools[{i}]"
        if tool.get("type", "custom") != "custom":
            raise invalid(f"Tool type '{tool.get('type')}' (a server tool) is not supported; "
                          "only client tools with an 'input_schema' are.", param=f"{where}.type")
        if "input_schema" not in tool:
            raise invalid(f"'{where}.input_schema' is required.", param=f"{where}.input_schema")
        tools.append(tool_spec(tool.get("name"), tool.get("description"),
                               tool.get("input_schema"), where, "input_schema"))
    check_unique(tools)
    return tools


def message_tool_choice(req: MessagesRequest | CountTokensRequest,
                        tools: list[ToolSpec]) -> ToolChoice:
    choice = req.tool_choice or {"type": "auto"}
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice.get("type")
    modes = {"auto": "auto", "any": "required", "none": "none", "tool": "named"}
    if kind not in modes:
        raise invalid("'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'.",
                      param="tool_choice.type")
    if kind == "tool" and not isinstance(choice.get("name"), str):
        raise invalid("'tool_choice.name' is required for type 'tool'.", param="tool_choice.name")
    result = ToolChoice(mode=modes[kind], name=choice.get("name"),  # type: ignore[arg-type]
                        parallel=parallel and kind != "tool")
    check_choice(result, tools, "tool_choice")
    return result


def output_schema(req: MessagesRequest | CountTokensRequest) -> dict[str, Any] | None:
    """The JSON schema `output_config.format` asks the reply to follow; None for free text."""
    fmt = req.output_config.format if req.output_config is not None else None
    if fmt is None:
        return None
    if fmt.get("type") != "json_schema":
        raise invalid("'output_config.format.type' must be 'json_schema'.",
                      param="output_config.format.type")
    # Anthropic's structured outputs admit no properties beyond those listed.
    return close_objects(check_schema(fmt.get("schema"), "output_config.format.schema"))


def _tool_result_text(block: ContentBlockIn, where: str) -> str:
    content = block.content
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        parts = []
        for k, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"Tool result blocks of type '{part.get('type')}' are not "
                              "supported; only 'text' is.", param=f"{where}.content[{k}]")
            parts.append(part["text"])
        text = join_text(parts)
    return f"Error: {text}" if block.is_error else text


def _turn(role: str, blocks: str | list[ContentBlockIn], where: str,
          names: dict[str, str]) -> list[ChatMessage]:
    """One Anthropic turn as template messages: tool results become `tool` messages (before
    the user's text), tool_use blocks become the assistant's `tool_calls`."""
    if isinstance(blocks, str):
        return [ChatMessage(role=role, content=blocks)]
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[ChatMessage] = []
    for j, block in enumerate(blocks):
        at = f"{where}[{j}]"
        if block.type == "text" and block.text is not None:
            texts.append(block.text)
        elif block.type in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier reasoning is not shown to the model again
        elif block.type == "tool_use" and role == "assistant":
            if not isinstance(block.name, str) or not isinstance(block.input, dict):
                raise invalid(f"'{at}' needs a 'name' and an object 'input'.", param=at)
            calls.append(ToolCall(name=block.name, arguments=block.input,
                                  id=block.id or "").as_template_call())
            if block.id:
                names[block.id] = block.name
        elif block.type == "tool_result" and role == "user":
            if not block.tool_use_id:
                raise invalid(f"'{at}.tool_use_id' is required.", param=f"{at}.tool_use_id")
            results.append(ChatMessage(role="tool", content=_tool_result_text(block, at),
                                       tool_call_id=block.tool_use_id,
                                       name=names.get(block.tool_use_id)))
        else:
            raise invalid(f"Content block type '{block.type}' is not supported in a "
                          f"{role} turn.", param=at)
    turn = results
    if texts or calls or not results:
        turn.append(ChatMessage(role=role, content=join_text(texts), tool_calls=calls or None))
    return turn


def chat_messages(req: MessagesRequest | CountTokensRequest) -> list[ChatMessage]:
    out = []
    if req.system is not None:
        system = _blocks_text(req.system, "system")
        if system:
            out.append(ChatMessage(role="system", content=system))
    names: dict[str, str] = {}  # tool_use id -> tool name
    for i, message in enumerate(req.messages):
        out.extend(_turn(message.role, message.content, f"messages[{i}].content", names))
    return out


async def prompt_for(engine: Engine, info: ModelInfo, req: MessagesRequest | CountTokensRequest,
                     ) -> Prompt:
    tools = message_tools(req)
    choice = message_tool_choice(req, tools)
    schema = output_schema(req)
    return await prepare_prompt(engine, info, chat_messages(req), tools, choice, schema)


def shows_thinking(req: MessagesRequest, prompt: Prompt) -> bool:
    """Whether the reply has thinking blocks: when the client enables thinking. Enabling it for
    a model that writes no reasoning is a 400, as Anthropic answers for models without it."""
    if req.thinking is None or req.thinking.get("type") != "enabled":
        return False
    if prompt.plan is None or prompt.plan.reasoning.fmt == "none":
        raise invalid(f"'{req.model}' does not support thinking (its chat template writes no "
                      "reasoning).", param="thinking")
    return True


def sampling_params(req: MessagesRequest, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        stop=stop_list(req.stop_sequences, "stop_sequences"),
    )


# --- responses (pure) -----------------------------------------------------------------------


def stop_reason(finished: Finished, called: bool = False) -> tuple[StopReason, str | None]:
    if called:
        return "tool_use", None
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
    tools: ToolPlan | None = None  # set when the output may hold tool calls or reasoning
    thinking: bool = False  # return the reasoning in thinking blocks (else it is dropped)


def tool_use_block(call: ToolCall, meta: ResponseMeta) -> ToolUseBlock:
    fmt = meta.tools.fmt if meta.tools else "default"
    return ToolUseBlock(id=new_call_id("toolu_", fmt), name=call.name, input=call.arguments)


def message_out(result: Collected, meta: ResponseMeta) -> MessageOut:
    content: list[OutBlock] = [TextBlock(text=result.text)] if result.text else []
    called = False
    if meta.tools is not None:
        parsed = meta.tools.parse(result.text)
        called = bool(parsed.calls)
        # Blocks in output order, as the stream opens them.
        content = [TextBlock(text=p) if isinstance(p, str) else tool_use_block(p, meta)
                   for p in parsed.pieces]
        if parsed.reasoning and meta.thinking:
            content.insert(0, ThinkingBlock(thinking=parsed.reasoning,
                                            signature=thinking_signature(parsed.reasoning)))
    reason, sequence = stop_reason(result.finished, called)
    return MessageOut(
        id=meta.id, content=content,
        model=meta.model,
        stop_reason=reason, stop_sequence=sequence,
        usage=usage_out(result.finished.usage),
    )


def usage_out(usage: Usage) -> UsageOut:
    """Anthropic's split: `input_tokens` counts only the prompt tokens computed for this
    request; those read from the prefix cache are `cache_read_input_tokens` (flock's cache is
    automatic, so nothing is ever reported as cache creation)."""
    return UsageOut(input_tokens=usage.prompt_tokens - usage.cached_tokens,
                    output_tokens=usage.completion_tokens,
                    cache_creation_input_tokens=0,
                    cache_read_input_tokens=usage.cached_tokens)


def delta_usage(usage: Usage) -> DeltaUsage:
    final = usage_out(usage)
    return DeltaUsage(output_tokens=final.output_tokens, input_tokens=final.input_tokens,
                      cache_creation_input_tokens=final.cache_creation_input_tokens,
                      cache_read_input_tokens=final.cache_read_input_tokens)


def thinking_signature(text: str) -> str:
    """An opaque signature for a thinking block (clients only send it back)."""
    return "flock-" + hashlib.sha256(text.encode()).hexdigest()[:32]


class _Blocks:
    """Content blocks of a streamed message, opened as output arrives: text goes to an open
    text block, reasoning to an open thinking block (both opened on demand), and each call is
    a whole tool_use block."""

    def __init__(self, meta: ResponseMeta) -> None:
        self.meta = meta
        self.count = 0
        self.open: str | None = None  # "text" or "thinking" while such a block is open
        self.thought = ""  # the open thinking block's text, for its signature
        self.called = False

    def _close(self) -> list[bytes]:
        out = []
        if self.open == "thinking":
            out.append(sse_event("content_block_delta", ContentBlockDelta(
                index=self.count - 1,
                delta=SignatureDelta(signature=thinking_signature(self.thought)))))
        if self.open is not None:
            out.append(sse_event("content_block_stop", ContentBlockStop(index=self.count - 1)))
        self.open, self.thought = None, ""
        return out

    def _opened(self, kind: str) -> list[bytes]:
        if self.open == kind:
            return []
        out = self._close()
        block: OutBlock = (TextBlock(text="") if kind == "text"
                           else ThinkingBlock(thinking="", signature=""))
        out.append(sse_event("content_block_start",
                             ContentBlockStart(index=self.count, content_block=block)))
        self.open = kind
        self.count += 1
        return out

    def pieces(self, pieces: list[Piece]) -> list[bytes]:
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                out += self._opened("text")
                if piece:  # "" only opens the block
                    out.append(sse_event("content_block_delta", ContentBlockDelta(
                        index=self.count - 1, delta=TextDelta(text=piece))))
                continue
            if isinstance(piece, Thought):
                if self.meta.thinking:
                    out += self._opened("thinking")
                    self.thought += piece.text
                    out.append(sse_event("content_block_delta", ContentBlockDelta(
                        index=self.count - 1, delta=ThinkingDelta(thinking=piece.text))))
                continue
            out += self._close()
            block = tool_use_block(piece, self.meta)
            index = self.count
            self.count += 1
            self.called = True
            out.append(sse_event("content_block_start", ContentBlockStart(
                index=index, content_block=ToolUseBlock(id=block.id, name=block.name,
                                                        input={}))))
            out.append(sse_event("content_block_delta", ContentBlockDelta(
                index=index, delta=InputJsonDelta(partial_json=piece.arguments_json))))
            out.append(sse_event("content_block_stop", ContentBlockStop(index=index)))
        return out

    def close(self) -> list[bytes]:
        return self._close()


def message_sse(events: AsyncIterator[GenerationEvent], meta: ResponseMeta,
                ) -> AsyncGenerator[bytes, None]:
    """The event sequence. Without tools one text block is open from the start; with tools,
    text that may begin a call is held back until decided, and blocks open as their content
    arrives."""
    calls = meta.tools.stream() if meta.tools is not None else None
    blocks = _Blocks(meta)

    def start() -> list[bytes]:
        out = [sse_event("message_start", MessageStart(message=MessageOut(
            id=meta.id, content=[], model=meta.model, stop_reason=None, stop_sequence=None,
            usage=UsageOut(input_tokens=meta.input_tokens, output_tokens=0))))]
        if calls is None:
            out += blocks.pieces([""])  # clients expect the text block before the ping
        return [*out, sse_event("ping", Ping())]

    def token(event: TokenChunk) -> list[bytes]:
        if calls is not None:
            return blocks.pieces(calls.feed(event.text))
        return blocks.pieces([event.text]) if event.text else []

    def finish(event: Finished) -> list[bytes]:
        out = blocks.pieces(calls.finish()) if calls is not None else []
        out += blocks.close()
        reason, sequence = stop_reason(event, blocks.called)
        return [*out,
                sse_event("message_delta", MessageDelta(
                    delta=MessageDeltaBody(stop_reason=reason, stop_sequence=sequence),
                    usage=delta_usage(event.usage))),
                sse_event("message_stop", MessageStop())]

    return relay(events, start=start, token=token, finish=finish,
                 error=lambda e: sse_event("error", anthropic_error_body(e)))


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
        prompt = await prompt_for(engine, info, data)
        max_tokens = completion_budget(info, len(prompt.tokens), data.max_tokens,
                                       services.settings.max_tokens_default)
        rid = request_id()
        meta = ResponseMeta(id=f"msg_{rid}", model=info.name, input_tokens=len(prompt.tokens),
                            tools=prompt.output_plan, thinking=shows_thinking(data, prompt))
        if data.max_tokens == 0:
            return _nothing_to_generate(rid, meta, bool(data.stream))
        generation = GenerationRequest(id=rid, model=info.name, prompt_tokens=prompt.tokens,
                                       sampling=sampling_params(data, max_tokens),
                                       json_schema=prompt.json_schema, grammar=prompt.grammar)
        return await respond(request, services, "anthropic", generation,
                             stream=bool(data.stream),
                             frames=lambda events: message_sse(events, meta),
                             media_type=SSE_MEDIA_TYPE,
                             whole=lambda result: message_out(result, meta))

    @post("/count_tokens", status_code=200, summary="Count the tokens of a message")
    async def count_tokens(self, services: ServicesDep, data: JSONBody[CountTokensRequest],
                           ) -> CountTokensResponse:
        check_conversation(data)
        info = resolve_model(services.engine, data.model)
        prompt = await prompt_for(services.engine, info, data)
        return CountTokensResponse(input_tokens=len(prompt.tokens))
