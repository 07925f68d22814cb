"""OpenAI adapter: /v1/chat/completions, /v1/completions and /v1/models.

Requests become one `GenerationRequest`; the engine's events become chat or text completion
objects, or `data:` chunks ended by `data: [DONE]` when streaming.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar import Controller, Response, get, post
from litestar.params import FromPath, JSONBody

from agent.api.common import (
    AnyRequest,
    Collected,
    ServicesDep,
    completion_budget,
    join_text,
    request_id,
    resolve_model,
    respond,
    seed_value,
    stop_list,
    tokenize,
)
from agent.api.errors import (
    invalid,
    openai_error_body,
    openai_exception_handler,
    unsupported_field,
)
from agent.api.openai_schema import (
    AssistantMessageOut,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageIn,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionTokensDetails,
    Delta,
    FunctionCallDelta,
    FunctionCallOut,
    ModelCard,
    ModelList,
    Prediction,
    PromptTokensDetails,
    TextCompletion,
    TokenLogprobOut,
    ToolCallDelta,
    ToolCallOut,
    TopLogprobOut,
    UsageOut,
)
from agent.api.sse import SSE_DONE, SSE_MEDIA_TYPE, relay, sse_data
from agent.api.tools import (
    ToolPlan,
    check_choice,
    check_schema,
    check_unique,
    history_calls,
    json_mode_schema,
    new_call_id,
    prepare_prompt,
    tool_spec,
)
from agent.engine import ChatMessage, Engine, ModelInfo
from agent.generation import (
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
    Usage,
)
from agent.tools.grammar import close_objects
from agent.tools.output import Piece
from agent.tools.reasoning import Thought
from agent.tools.types import ToolCall, ToolChoice, ToolSpec

DEFAULT_TEMPERATURE = 1.0

# --- request checks and conversion (pure) -----------------------------------------------------


def _check_common(req: ChatCompletionRequest | CompletionRequest) -> None:
    if req.n not in (None, 1):
        raise invalid("Only n=1 is supported.", param="n")
    if req.logit_bias:
        raise unsupported_field("logit_bias")


def check_chat_request(req: ChatCompletionRequest) -> None:
    """Reject what flock accepts only in its neutral form, naming the field."""
    _check_common(req)
    if not req.messages:
        raise invalid("'messages' must contain at least one message.", param="messages")
    if req.modalities is not None and req.modalities != ["text"]:
        raise unsupported_field("modalities", "supports only [\"text\"]")
    if req.top_logprobs and not req.logprobs:
        raise invalid("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
    if (req.max_tokens is not None and req.max_completion_tokens is not None
            and req.max_tokens != req.max_completion_tokens):
        raise invalid("Give either 'max_tokens' or 'max_completion_tokens', not two different "
                      "values.", param="max_completion_tokens")


def chat_tools(req: ChatCompletionRequest) -> list[ToolSpec]:
    """The request's function tools, checked (a 400 names the offending tool field)."""
    tools = []
    for i, tool in enumerate(req.tools or []):
        where = f"tools[{i}]"
        if tool.get("type", "function") != "function":
            raise invalid(f"Tool type '{tool.get('type')}' is not supported; only 'function' "
                          "tools are.", param=f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"'{where}.function' must be an object.", param=f"{where}.function")
        tools.append(tool_spec(function.get("name"), function.get("description"),
                               function.get("parameters"), f"{where}.function"))
    check_unique(tools)
    return tools


def chat_tool_choice(req: ChatCompletionRequest, tools: list[ToolSpec]) -> ToolChoice:
    choice = req.tool_choice
    parallel = req.parallel_tool_calls is not False
    if choice is None or choice in ("auto", "none", "required"):
        result = ToolChoice(mode=choice or "auto", parallel=parallel)  # type: ignore[arg-type]
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
            and choice.get("type", "function") == "function":
        result = ToolChoice(mode="named", name=str(choice["function"].get("name")),
                            parallel=False)
    else:
        raise invalid("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}.",
                      param="tool_choice")
    check_choice(result, tools, "tool_choice")
    return result


def response_schema(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks the reply to follow; None for free text."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        # Any object, or the schema beside the type (vLLM's and Together's extension).
        if fmt.schema is None:
            return json_mode_schema()
        return check_schema(fmt.schema, "response_format.schema")
    if fmt.type != "json_schema":
        raise invalid(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', "
                      f"not '{fmt.type}'.", param="response_format.type")
    if not isinstance(fmt.json_schema, dict):
        raise invalid("'response_format.json_schema' is required for type 'json_schema'.",
                      param="response_format.json_schema")
    # Strict or not, the reply is generated under the schema, so it always validates, and
    # objects admit no properties beyond those listed unless the schema itself allows them
    # (`close_objects`, which the grammar applies to every schema; strict ones say so here).
    schema = check_schema(fmt.json_schema.get("schema", json_mode_schema()),
                          "response_format.json_schema.schema")
    return close_objects(schema) if fmt.json_schema.get("strict") else schema


def _message_text(message: ChatMessageIn, where: str) -> str:
    content = message.content
    if content is None:
        if message.role == "assistant":
            # A replayed assistant turn may carry only a refusal.
            return message.refusal or ""
        raise invalid(f"'{where}.content' is required for role '{message.role}'.",
                      param=f"{where}.content")
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise invalid(
                f"Content part type '{part.type}' is not supported; only 'text' parts are.",
                param=f"{where}.content[{j}]")
        texts.append(part.text)
    return join_text(texts)


def chat_messages(messages: list[ChatMessageIn]) -> list[ChatMessage]:
    """The conversation in template shape; "developer" is OpenAI's newer name for "system".
    Tool results carry the name of the function whose call they answer."""
    out = []
    names: dict[str, str] = {}  # call id -> function name, from earlier assistant turns
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role == "function" or message.function_call:
            field = f"{where}.role" if message.role == "function" else f"{where}.function_call"
            raise unsupported_field(field, "(the deprecated function calling) is not supported; "
                                    "use 'tools'")
        if message.role == "tool":
            if not message.tool_call_id:
                raise invalid(f"'{where}.tool_call_id' is required for role 'tool'.",
                              param=f"{where}.tool_call_id")
            out.append(ChatMessage(role="tool", content=_message_text(message, where),
                                   tool_call_id=message.tool_call_id,
                                   name=names.get(message.tool_call_id, message.name)))
            continue
        if message.tool_call_id:
            raise invalid(f"'{where}.tool_call_id' belongs only to role 'tool'.",
                          param=f"{where}.tool_call_id")
        calls = None
        if message.tool_calls:
            if message.role != "assistant":
                raise invalid(f"'{where}.tool_calls' belongs only to role 'assistant'.",
                              param=f"{where}.tool_calls")
            calls = history_calls(message.tool_calls, where)
            names.update({c["id"]: c["function"]["name"] for c in calls if c["id"]})
        role = "system" if message.role == "developer" else message.role
        content = "" if calls and message.content is None else _message_text(message, where)
        out.append(ChatMessage(role=role, content=content, name=message.name, tool_calls=calls))
    return out


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    *,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=given(req.temperature, DEFAULT_TEMPERATURE),
        top_p=given(req.top_p, 1.0),
        top_k=max(given(req.top_k, 0), 0),
        min_p=given(req.min_p, 0.0),
        repetition_penalty=given(req.repetition_penalty, 1.0),
        presence_penalty=given(req.presence_penalty, 0.0),
        frequency_penalty=given(req.frequency_penalty, 0.0),
        seed=seed_value(req.seed),
        stop=stop_list(req.stop, "stop"),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def chat_sampling(req: ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    want = bool(req.logprobs)
    return sampling_params(req, max_tokens, logprobs=want,
                           top_logprobs=(req.top_logprobs or 0) if want else 0)


def completion_sampling(req: CompletionRequest, max_tokens: int) -> SamplingParams:
    return sampling_params(req, max_tokens, logprobs=req.logprobs is not None,
                           top_logprobs=req.logprobs or 0)


def check_completion_request(req: CompletionRequest) -> None:
    _check_common(req)
    if req.suffix:
        raise unsupported_field("suffix", "(fill-in-the-middle) is not supported")
    if req.echo:
        raise unsupported_field("echo")
    if req.best_of not in (None, 1):
        raise invalid("Only best_of=1 is supported.", param="best_of")


def _is_token_list(value: Any) -> bool:
    # Ids beyond int32 are no token of any vocabulary (and would overflow the runner's wire).
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in value)


def completion_prompt(prompt: str | list[Any]) -> str | list[int]:
    """The one prompt of a legacy completion: text, or token ids sent as they are."""
    if isinstance(prompt, str):
        return prompt
    if prompt and _is_token_list(prompt):
        return list(prompt)
    if len(prompt) == 1:
        (only,) = prompt
        if isinstance(only, str) or (only and _is_token_list(only)):
            return only
    raise invalid("'prompt' must be a string or a list of token ids (one prompt per request).",
                  param="prompt")


# --- responses (pure) -----------------------------------------------------------------------


def finish_reason(reason: FinishReason, called: bool = False) -> str:
    if called:
        return "tool_calls"
    return "length" if reason == "length" else "stop"


def usage_out(usage: Usage) -> UsageOut:
    return UsageOut(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(
            accepted_prediction_tokens=usage.accepted_prediction_tokens,
            rejected_prediction_tokens=usage.rejected_prediction_tokens),
    )


async def prediction_tokens(engine: Engine, model: str, prediction: Prediction | None
                            ) -> list[int] | None:
    """Predicted Outputs' text as the model's tokens (drafts for speculative decoding), without
    the BOS a plain encode may put first; None without a prediction."""
    if prediction is None:
        return None
    parts = prediction.content
    text = parts if isinstance(parts, str) else "".join(p.text or "" for p in parts
                                                         if p.type == "text")
    if not text:
        return None
    tokens = await tokenize(engine, model, text)
    lead = await tokenize(engine, model, "")
    return tokens[len(lead):] if lead and tokens[:len(lead)] == lead else tokens


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(items: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprobOut(
            token=item.text, logprob=item.logprob, bytes=_utf8(item.text),
            top_logprobs=[TopLogprobOut(token=t.text, logprob=t.logprob, bytes=_utf8(t.text))
                          for t in item.top],
        )
        for item in items
    ])


def completion_logprobs(items: list[TokenLogprob], offset: int, top: bool) -> CompletionLogprobs:
    """Legacy logprobs; `offset` is where the first token starts in the completion's text."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.text)
    return CompletionLogprobs(
        tokens=[item.text for item in items],
        token_logprobs=[item.logprob for item in items],
        top_logprobs=[{t.text: t.logprob for t in item.top} for item in items] if top else None,
        text_offset=offsets,
    )


@dataclass(frozen=True)
class ResponseMeta:
    """What every object of one response repeats."""

    id: str
    created: int
    model: str
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: bool = False
    tools: ToolPlan | None = None  # set when the output may hold tool calls


def tool_call_out(call: ToolCall, meta: ResponseMeta) -> ToolCallOut:
    fmt = meta.tools.fmt if meta.tools else "default"
    return ToolCallOut(id=new_call_id("call_", fmt),
                       function=FunctionCallOut(name=call.name, arguments=call.arguments_json))


def chat_completion(result: Collected, meta: ResponseMeta) -> ChatCompletion:
    message = AssistantMessageOut(content=result.text)
    called = False
    if meta.tools is not None:
        parsed = meta.tools.parse(result.text)
        called = bool(parsed.calls)
        # OpenAI sends null content beside calls when the model wrote no text.
        message = AssistantMessageOut(content=parsed.text or None if called else parsed.text)
        if called:
            message.tool_calls = [tool_call_out(c, meta) for c in parsed.calls]
        if parsed.reasoning:
            message.reasoning_content = parsed.reasoning
    return ChatCompletion(
        id=meta.id, created=meta.created, model=meta.model,
        choices=[ChatChoice(
            index=0,
            message=message,
            logprobs=chat_logprobs(result.logprobs) if meta.logprobs else None,
            finish_reason=finish_reason(result.finished.reason, called),
        )],
        usage=usage_out(result.finished.usage),
    )


def text_completion(result: Collected, meta: ResponseMeta) -> TextCompletion:
    logprobs = (completion_logprobs(result.logprobs, 0, meta.top_logprobs)
                if meta.logprobs else None)
    return TextCompletion(
        id=meta.id, created=meta.created, model=meta.model,
        choices=[CompletionChoice(text=result.text, index=0, logprobs=logprobs,
                                  finish_reason=finish_reason(result.finished.reason))],
        usage=usage_out(result.finished.usage),
    )


def chat_sse(events: AsyncIterator[GenerationEvent], meta: ResponseMeta,
             ) -> AsyncGenerator[bytes, None]:
    """Chat chunks: a role chunk, content chunks, a finish chunk, optionally a usage chunk."""

    def chunk(delta: Delta, logprobs: ChoiceLogprobs | None = None,
              reason: str | None = None) -> bytes:
        return sse_data(ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model,
            choices=[ChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=reason)],
        ))

    # With tools, text that may begin a call is held back until the call is complete (or
    # turns out to be text); each call goes out as a name delta, then an arguments delta.
    # Reasoning goes out in `reasoning_content` deltas.
    calls = meta.tools.stream() if meta.tools is not None else None
    called = 0

    def pieces_out(pieces: list[Piece], logprobs: ChoiceLogprobs | None) -> list[bytes]:
        nonlocal called
        out = []
        for piece in pieces:
            if isinstance(piece, str | Thought):
                delta = (Delta(content=piece) if isinstance(piece, str)
                         else Delta(reasoning_content=piece.text))
                out.append(chunk(delta, logprobs))
                logprobs = None
                continue
            call = tool_call_out(piece, meta)
            out.append(chunk(Delta(tool_calls=[ToolCallDelta(
                index=called, id=call.id, type="function",
                function=FunctionCallDelta(name=call.function.name, arguments=""))])))
            out.append(chunk(Delta(tool_calls=[ToolCallDelta(
                index=called, function=FunctionCallDelta(arguments=call.function.arguments))])))
            called += 1
        if logprobs is not None:
            out.append(chunk(Delta(), logprobs))
        return out

    def token(event: TokenChunk) -> list[bytes]:
        logprobs = chat_logprobs(event.logprobs) if meta.logprobs and event.logprobs else None
        if calls is not None:
            return pieces_out(calls.feed(event.text), logprobs)
        return [chunk(Delta(content=event.text), logprobs)] if event.text or logprobs else []

    def finish(event: Finished) -> list[bytes]:
        out = pieces_out(calls.finish(), None) if calls is not None else []
        out.append(chunk(Delta(), reason=finish_reason(event.reason, called > 0)))
        if meta.include_usage:
            out.append(sse_data(ChatCompletionChunk(
                id=meta.id, created=meta.created, model=meta.model, choices=[],
                usage=usage_out(event.usage))))
        return [*out, SSE_DONE]

    return relay(events, start=lambda: [chunk(Delta(role="assistant", content=""))],
                 token=token, finish=finish, error=lambda e: sse_data(openai_error_body(e)))


def completion_sse(events: AsyncIterator[GenerationEvent], meta: ResponseMeta,
                   ) -> AsyncGenerator[bytes, None]:
    def chunk(text: str, logprobs: CompletionLogprobs | None = None,
              reason: str | None = None) -> bytes:
        return sse_data(TextCompletion(
            id=meta.id, created=meta.created, model=meta.model,
            choices=[CompletionChoice(text=text, index=0, logprobs=logprobs,
                                      finish_reason=reason)],
        ))

    offset = 0

    def token(event: TokenChunk) -> list[bytes]:
        nonlocal offset
        logprobs = (completion_logprobs(event.logprobs, offset, meta.top_logprobs)
                    if meta.logprobs and event.logprobs else None)
        offset += len(event.text)
        return [chunk(event.text, logprobs)] if event.text or logprobs else []

    def finish(event: Finished) -> list[bytes]:
        out = [chunk("", reason=finish_reason(event.reason))]
        if meta.include_usage:
            out.append(sse_data(TextCompletion(id=meta.id, created=meta.created,
                                               model=meta.model, choices=[],
                                               usage=usage_out(event.usage))))
        return [*out, SSE_DONE]

    return relay(events, token=token, finish=finish,
                 error=lambda e: sse_data(openai_error_body(e)))


def model_card(info: ModelInfo) -> ModelCard:
    return ModelCard(id=info.name, created=int(info.modified_at), engine=info.engine,
                     refusal=info.refusal)


# --- routes ---------------------------------------------------------------------------------


class OpenAIController(Controller):
    path = "/v1"
    tags = ["OpenAI"]
    exception_handlers = {Exception: openai_exception_handler}

    @post("/chat/completions", status_code=200, summary="Create a chat completion")
    async def chat_completions(
        self, request: AnyRequest, services: ServicesDep, data: JSONBody[ChatCompletionRequest],
    ) -> Response[ChatCompletion]:
        check_chat_request(data)
        engine = services.engine
        info = resolve_model(engine, data.model)
        tools = chat_tools(data)
        choice = chat_tool_choice(data, tools)
        schema = response_schema(data)
        prompt = await prepare_prompt(engine, info, chat_messages(data.messages), tools,
                                      choice, schema)
        requested = (data.max_completion_tokens if data.max_completion_tokens is not None
                     else data.max_tokens)
        max_tokens = completion_budget(info, len(prompt.tokens), requested,
                                       services.settings.max_tokens_default)
        rid = request_id()
        generation = GenerationRequest(id=rid, model=info.name, prompt_tokens=prompt.tokens,
                                       sampling=chat_sampling(data, max_tokens),
                                       json_schema=prompt.json_schema, grammar=prompt.grammar,
                                       prediction_tokens=await prediction_tokens(
                                           engine, info.name, data.prediction))
        meta = ResponseMeta(
            id=f"chatcmpl-{rid}", created=int(time.time()), model=info.name,
            include_usage=bool(data.stream_options and data.stream_options.include_usage),
            logprobs=bool(data.logprobs), tools=prompt.output_plan,
        )
        return await respond(request, services, "openai", generation, stream=bool(data.stream),
                             frames=lambda events: chat_sse(events, meta),
                             media_type=SSE_MEDIA_TYPE,
                             whole=lambda result: chat_completion(result, meta))

    @post("/completions", status_code=200, summary="Create a text completion (legacy)")
    async def completions(
        self, request: AnyRequest, services: ServicesDep, data: JSONBody[CompletionRequest],
    ) -> Response[TextCompletion]:
        check_completion_request(data)
        engine = services.engine
        info = resolve_model(engine, data.model)
        prompt = completion_prompt(data.prompt)
        tokens = prompt if isinstance(prompt, list) else await tokenize(engine, info.name, prompt)
        if not tokens:
            raise invalid("The prompt is empty.", param="prompt")
        max_tokens = completion_budget(info, len(tokens), data.max_tokens,
                                       services.settings.max_tokens_default,
                                       prompt_param="prompt")
        rid = request_id()
        generation = GenerationRequest(id=rid, model=info.name, prompt_tokens=tokens,
                                       sampling=completion_sampling(data, max_tokens))
        meta = ResponseMeta(
            id=f"cmpl-{rid}", created=int(time.time()), model=info.name,
            include_usage=bool(data.stream_options and data.stream_options.include_usage),
            logprobs=data.logprobs is not None, top_logprobs=bool(data.logprobs),
        )
        return await respond(request, services, "openai", generation, stream=bool(data.stream),
                             frames=lambda events: completion_sse(events, meta),
                             media_type=SSE_MEDIA_TYPE,
                             whole=lambda result: text_completion(result, meta))

    @get("/models", summary="List models")
    async def list_models(self, services: ServicesDep) -> ModelList:
        return ModelList(data=[model_card(m) for m in services.engine.list_models()])

    @get("/models/{model_id:path}", summary="Retrieve a model")
    async def get_model(self, services: ServicesDep, model_id: FromPath[str]) -> ModelCard:
        # Model names may contain "/" (hub ids); the path parameter keeps its leading slash,
        # which an absolute model path (a directory served by path) keeps too.
        name = model_id.lstrip("/")
        if not name.startswith(("/", "~")) and Path("/" + name).is_dir():
            name = "/" + name
        return model_card(resolve_model(services.engine, name, to_run=False))
