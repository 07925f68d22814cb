"""Ollama adapter: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version and
/api/pull.

Generation streams NDJSON by default (`"stream": false` for one object). Defaults follow
Ollama's own where the client omits a field (temperature 0.8), and the final object reports
token counts and durations in nanoseconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from litestar import Controller, HttpMethod, MediaType, Response, get, post, route
from litestar.params import JSONBody

from agent import __version__
from agent.api.common import (
    AnyRequest,
    Pull,
    Services,
    ServicesDep,
    Timing,
    completion_budget,
    render_chat,
    request_id,
    resolve_model,
    respond,
    stop_list,
    tokenize,
)
from agent.api.errors import (
    ApiError,
    ClientDisconnected,
    invalid,
    model_not_found,
    ollama_error_body,
    ollama_exception_handler,
    to_api_error,
    unsupported_field,
)
from agent.api.ollama_schema import (
    AssistantMessageOut,
    ChatRequest,
    ChatResponse,
    FunctionCallOut,
    GenerateRequest,
    GenerateResponse,
    LogprobOut,
    MessageIn,
    ModelDetails,
    ModelRequest,
    Options,
    ProgressResponse,
    PsResponse,
    PullRequest,
    RunningModel,
    ShowResponse,
    TagModel,
    TagsResponse,
    ToolCallOut,
    TopLogprobOut,
    VersionResponse,
)
from agent.api.sse import NDJSON_MEDIA_TYPE, ClosingStream, ndjson_line, relay, until_disconnect
from agent.api.tools import (
    Prompt,
    ToolPlan,
    check_choice,
    check_schema,
    check_unique,
    history_calls,
    json_mode_schema,
    prepare_prompt,
    reasoning_plan,
    reasoning_style,
    tool_spec,
)
from agent.engine import ChatMessage, ModelInfo, ModelNotFound
from agent.generation import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
)
from agent.tools.grammar import close_objects
from agent.tools.output import Piece
from agent.tools.reasoning import Thought
from agent.tools.types import ToolCall, ToolChoice, ToolSpec

log = logging.getLogger(__name__)

# Ollama's own default; the other sampling defaults are neutral, as in the other APIs.
DEFAULT_TEMPERATURE = 0.8

# --- request checks and conversion (pure) -----------------------------------------------------


def check_generation_fields(req: ChatRequest | GenerateRequest) -> None:
    """Reject what flock accepts only in its neutral form, naming the field."""
    if req.top_logprobs and not req.logprobs:
        raise invalid("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")


def check_chat_request(req: ChatRequest) -> None:
    check_generation_fields(req)


def output_schema(req: ChatRequest | GenerateRequest) -> dict[str, Any] | None:
    """`format`: "json" for any JSON object, or a JSON schema; None (or "") for free text."""
    if req.format in (None, ""):
        return None
    if req.format == "json":
        return json_mode_schema()
    if isinstance(req.format, str):
        raise invalid(f"'format' must be \"json\" or a JSON schema, not {req.format!r}.",
                      param="format")
    # Objects admit only their listed properties unless the schema says otherwise, as in Ollama.
    return close_objects(check_schema(req.format, "format"))


def chat_tools(req: ChatRequest) -> list[ToolSpec]:
    tools = []
    for i, tool in enumerate(req.tools or []):
        where = f"tools[{i}]"
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise invalid(f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}.",
                          param=where)
        tools.append(tool_spec(function.get("name"), function.get("description"),
                               _drop_nulls(function.get("parameters")), f"{where}.function"))
    check_unique(tools)
    return tools


def chat_tool_choice(req: ChatRequest, tools: list[ToolSpec]) -> ToolChoice:
    """`options.tool_choice` (a flock extension); the model decides when it is absent."""
    wanted = req.options.tool_choice if req.options is not None else None
    if wanted in (None, "auto", "none", "required"):
        choice = ToolChoice(mode=wanted or "auto")  # type: ignore[arg-type]
    else:
        choice = ToolChoice(mode="named", name=wanted, parallel=False)
    check_choice(choice, tools, "options.tool_choice")
    return choice


def _drop_nulls(value: Any) -> Any:
    """Ollama clients may send unset schema keywords as null ("enum": null)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def check_generate_request(req: GenerateRequest) -> None:
    check_generation_fields(req)
    if req.template:
        raise unsupported_field("template", "(a per-request template) is not supported")
    if req.suffix:
        raise unsupported_field("suffix", "(fill-in-the-middle) is not supported")
    if req.context:
        raise unsupported_field(
            "context", "(the deprecated token context) is not supported; use /api/chat")
    if req.images:
        raise unsupported_field("images", "(image input) is not supported")
    if req.raw and req.system:
        raise invalid("'system' cannot be combined with 'raw': a raw prompt is not templated.",
                      param="system")


def chat_messages(messages: list[MessageIn]) -> list[ChatMessage]:
    out = []
    last_calls: list[str] = []  # the names the latest assistant turn called, for its results
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.images:
            raise unsupported_field(f"{where}.images", "(image input) is not supported")
        if message.tool_calls and message.role != "assistant":
            raise invalid(f"'{where}.tool_calls' belongs only to role 'assistant'.",
                          param=f"{where}.tool_calls")
        if message.role == "tool":
            # Older clients send no tool_name; a lone call's result can only be for it.
            name = message.tool_name or (last_calls[0] if len(last_calls) == 1 else None)
            out.append(ChatMessage(role="tool", content=message.content, name=name))
            continue
        calls = history_calls(message.tool_calls, where) if message.tool_calls else None
        if calls:
            last_calls = [c["function"]["name"] for c in calls]
        # `thinking` of a replayed assistant turn is left out, as Ollama does for templates
        # without a thinking section.
        out.append(ChatMessage(role=message.role, content=message.content, tool_calls=calls))
    return out


def shows_thinking(req: ChatRequest | GenerateRequest, plan: ToolPlan | None,
                   info: ModelInfo) -> bool:
    """Whether the reply carries the model's reasoning in `thinking`: unless `think` is false.
    Asking a model that writes none to think is a 400, as in Ollama. (flock cannot switch a
    model's thinking off through its template, so `think: false` drops the reasoning.)"""
    reasons = plan is not None and plan.reasoning.fmt != "none"
    if req.think not in (None, False) and not reasons:
        raise invalid(f"'{info.name}' does not support thinking (its chat template writes no "
                      "reasoning).", param="think")
    return req.think is not False


def context_window(options: Options | None, info: ModelInfo) -> int:
    """The context this request may use: the model's, or a smaller `num_ctx`."""
    if options is None or options.num_ctx is None:
        return info.context_length
    if options.num_ctx > info.context_length:
        raise invalid(f"'options.num_ctx' is {options.num_ctx}, but the model's context is "
                      f"{info.context_length} tokens.", param="options.num_ctx")
    return options.num_ctx


def requested_tokens(options: Options | None, window: int) -> int | None:
    """`num_predict` as a token count; None when the client left it to the node default."""
    if options is None or options.num_predict is None:
        return None
    if options.num_predict in (-1, -2):
        return window  # capped to the room the prompt leaves
    if options.num_predict <= 0:
        raise invalid("'options.num_predict' must be positive, -1 or -2.",
                      param="options.num_predict")
    return options.num_predict


def sampling_params(req: ChatRequest | GenerateRequest, max_tokens: int, window: int,
                    ) -> SamplingParams:
    o = req.options or Options()

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    repeat_last_n = given(o.repeat_last_n, 64)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=given(o.temperature, DEFAULT_TEMPERATURE),
        top_p=given(o.top_p, 1.0),
        top_k=given(o.top_k, 0),
        min_p=given(o.min_p, 0.0),
        # repeat_last_n 0 switches the penalty off (an empty window), as in Ollama.
        repetition_penalty=given(o.repeat_penalty, 1.0) if repeat_last_n != 0 else 1.0,
        repetition_context=window if repeat_last_n == -1 else max(repeat_last_n, 1),
        presence_penalty=given(o.presence_penalty, 0.0),
        frequency_penalty=given(o.frequency_penalty, 0.0),
        # Ollama's -1 (and any negative seed) means "random".
        seed=o.seed if o.seed is not None and o.seed >= 0 else None,
        stop=stop_list(o.stop, "options.stop"),
        logprobs=bool(req.logprobs),
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
    )


# --- responses (pure) -----------------------------------------------------------------------


def timestamp(unix: float | None = None) -> str:
    """RFC 3339 in UTC with a Z, as Ollama writes times."""
    moment = datetime.now(UTC) if unix is None else datetime.fromtimestamp(unix, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parameter_size(parameters: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if parameters >= scale:
            return f"{parameters / scale:.1f}{suffix}"
    return str(parameters)


def model_details(info: ModelInfo) -> ModelDetails:
    return ModelDetails(format="mlx", family=info.architecture, families=[info.architecture],
                        parameter_size=parameter_size(info.parameters),
                        quantization_level=info.quantization)


def logprobs_out(items: list[TokenLogprob]) -> list[LogprobOut]:
    def utf8(text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    return [
        LogprobOut(token=item.text, logprob=item.logprob, bytes=utf8(item.text),
                   top_logprobs=[TopLogprobOut(token=t.text, logprob=t.logprob, bytes=utf8(t.text))
                                 for t in item.top] or None)
        for item in items
    ]


def done_reason(finished: Finished) -> str:
    return "length" if finished.reason == "length" else "stop"


@dataclass(frozen=True)
class ResponseMeta:
    model: str
    chat: bool  # /api/chat wraps text in a message, /api/generate in `response`
    logprobs: bool
    timing: Timing
    tools: ToolPlan | None = None  # set when the output may hold tool calls or reasoning
    thinking: bool = True  # return the reasoning (else it is dropped)


def assistant_message(text: str, calls: list[ToolCall], first_index: int = 0,
                      thinking: str = "") -> AssistantMessageOut:
    message = AssistantMessageOut(content=text)
    if thinking:
        message.thinking = thinking
    if calls:
        message.tool_calls = [
            ToolCallOut(function=FunctionCallOut(name=c.name, arguments=c.arguments,
                                                 index=first_index + k))
            for k, c in enumerate(calls)
        ]
    return message


def partial_response(meta: ResponseMeta, text: str, logprobs: list[TokenLogprob] | None,
                     calls: list[ToolCall] | None = None, first_index: int = 0,
                     thinking: str = "") -> ChatResponse | GenerateResponse:
    lp = logprobs_out(logprobs) if meta.logprobs and logprobs else None
    if meta.chat:
        return ChatResponse(model=meta.model, created_at=timestamp(), done=False, logprobs=lp,
                            message=assistant_message(text, calls or [], first_index, thinking))
    return GenerateResponse(model=meta.model, created_at=timestamp(), done=False, logprobs=lp,
                            response=text, thinking=thinking or None)


def final_response(meta: ResponseMeta, finished: Finished, text: str = "",
                   logprobs: list[TokenLogprob] | None = None) -> ChatResponse | GenerateResponse:
    t = meta.timing
    stats: dict[str, Any] = {
        "model": meta.model,
        "created_at": timestamp(),
        "done": True,
        "done_reason": done_reason(finished),
        "total_duration": t.finished_ns - t.received_ns,
        # Ollama's "load" is the time before evaluation starts: flock's models are already
        # placed, so this is templating, tokenizing and admission.
        "load_duration": t.started_ns - t.received_ns,
        "prompt_eval_count": finished.usage.prompt_tokens,
        "prompt_eval_duration": t.first_event_ns - t.started_ns,
        "eval_count": finished.usage.completion_tokens,
        "eval_duration": t.finished_ns - t.first_event_ns,
        "logprobs": logprobs_out(logprobs) if meta.logprobs and logprobs else None,
    }
    calls: list[ToolCall] = []
    thinking = ""
    if meta.tools is not None:
        parsed = meta.tools.parse(text)
        text, calls = parsed.text, parsed.calls
        thinking = parsed.reasoning if meta.thinking else ""
    if meta.chat:
        return ChatResponse(**stats, message=assistant_message(text, calls, 0, thinking))
    return GenerateResponse(**stats, response=text, thinking=thinking or None)


def load_response(model: str, chat: bool) -> ChatResponse | GenerateResponse:
    """Ollama's answer to an empty prompt: the model is loaded, nothing is generated."""
    if chat:
        return ChatResponse(model=model, created_at=timestamp(), done=True, done_reason="load",
                            message=AssistantMessageOut(content=""))
    return GenerateResponse(model=model, created_at=timestamp(), done=True, done_reason="load",
                            response="")


def generation_ndjson(events: AsyncIterator[GenerationEvent], meta: ResponseMeta,
                      ) -> AsyncGenerator[bytes, None]:
    # With tools, text that may begin a call is held back until decided; a call goes out as a
    # chunk of its own with empty content, as Ollama streams them; reasoning goes out in
    # `thinking` with empty content.
    calls = meta.tools.stream() if meta.tools is not None else None
    called = 0

    def pieces_out(pieces: list[Piece], logprobs: list[TokenLogprob] | None) -> list[bytes]:
        nonlocal called
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(ndjson_line(partial_response(meta, piece, logprobs)))
            elif isinstance(piece, Thought):
                if not meta.thinking:
                    continue  # dropped, with its logprobs
                out.append(ndjson_line(partial_response(meta, "", logprobs,
                                                        thinking=piece.text)))
            else:
                out.append(ndjson_line(partial_response(meta, "", logprobs, [piece], called)))
                called += 1
            logprobs = None
        if meta.logprobs and logprobs:
            out.append(ndjson_line(partial_response(meta, "", logprobs)))
        return out

    def token(event: TokenChunk) -> list[bytes]:
        if calls is not None:
            return pieces_out(calls.feed(event.text), event.logprobs)
        if event.text or (meta.logprobs and event.logprobs):
            return [ndjson_line(partial_response(meta, event.text, event.logprobs))]
        return []

    def finish(event: Finished) -> list[bytes]:
        out = pieces_out(calls.finish(), None) if calls is not None else []
        meta.timing.finished_ns = time.monotonic_ns()
        return [*out, ndjson_line(final_response(meta, event))]

    return relay(events, token=token, finish=finish,
                 error=lambda e: ndjson_line(ollama_error_body(e)))


async def _run(request: AnyRequest, services: Services, info: ModelInfo,
               req: ChatRequest | GenerateRequest, prompt: Prompt, timing: Timing,
               window: int) -> Response[Any]:
    max_tokens = completion_budget(
        info, len(prompt.tokens), requested_tokens(req.options, window),
        services.settings.max_tokens_default, context=window,
        prompt_param="messages" if isinstance(req, ChatRequest) else "prompt")
    generation = GenerationRequest(id=request_id(), model=info.name, prompt_tokens=prompt.tokens,
                                   sampling=sampling_params(req, max_tokens, window),
                                   json_schema=prompt.json_schema, grammar=prompt.grammar)
    meta = ResponseMeta(model=info.name, chat=isinstance(req, ChatRequest),
                        logprobs=bool(req.logprobs), timing=timing, tools=prompt.output_plan,
                        thinking=shows_thinking(req, prompt.plan, info))
    return await respond(
        request, services, "ollama", generation, stream=bool(req.stream), timing=timing,
        frames=lambda events: generation_ndjson(events, meta), media_type=NDJSON_MEDIA_TYPE,
        whole=lambda result: final_response(meta, result.finished, result.text,
                                            result.logprobs))


# --- pulling --------------------------------------------------------------------------------


def pull_error(name: str, exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError | ClientDisconnected):
        return to_api_error(exc)
    if isinstance(exc, ModelNotFound):
        return model_not_found(name)
    if isinstance(exc, ValueError):
        return invalid(str(exc), param="model")
    # A failed download is not the client's fault, but its reason is what they need to see.
    log.error("pulling %s failed", name, exc_info=exc)
    return ApiError("internal", f"pulling '{name}' failed: {exc}")


async def pull_ndjson(pull: Pull, name: str) -> AsyncGenerator[bytes, None]:
    yield ndjson_line(ProgressResponse(status=f"pulling {name}"))
    try:
        info = await pull(name)
    except Exception as exc:
        yield ndjson_line(ollama_error_body(pull_error(name, exc)))
        return
    yield ndjson_line(ProgressResponse(status="success", digest=info.digest,
                                       total=info.size_bytes, completed=info.size_bytes))


# --- routes ---------------------------------------------------------------------------------


@route("/", http_method=[HttpMethod.GET, HttpMethod.HEAD], media_type=MediaType.TEXT,
       tags=["Ollama"], summary="Heartbeat")
async def heartbeat(request: AnyRequest) -> Response[Any]:
    """The `ollama` command line checks that a server answers here before anything else; a
    browser (its navigation accepts text/html) gets the dashboard instead."""
    from agent.api.ui import dashboard_page, wants_html

    if wants_html(request.headers.get("accept", "")):
        return dashboard_page()
    return Response("flock is running", media_type=MediaType.TEXT)


class OllamaController(Controller):
    path = "/api"
    tags = ["Ollama"]
    exception_handlers = {Exception: ollama_exception_handler}

    @post("/chat", status_code=200, summary="Chat with a model")
    async def chat(self, request: AnyRequest, services: ServicesDep, data: JSONBody[ChatRequest],
                   ) -> Response[ChatResponse]:
        timing = Timing()
        check_chat_request(data)
        info = resolve_model(services.engine, data.model)
        window = context_window(data.options, info)
        if not data.messages:
            return Response(load_response(info.name, chat=True))
        tools = chat_tools(data)
        choice = chat_tool_choice(data, tools)
        prompt = await prepare_prompt(services.engine, info, chat_messages(data.messages),
                                      tools, choice, output_schema(data))
        return await _run(request, services, info, data, prompt, timing, window)

    @post("/generate", status_code=200, summary="Generate a completion")
    async def generate(self, request: AnyRequest, services: ServicesDep,
                       data: JSONBody[GenerateRequest]) -> Response[GenerateResponse]:
        timing = Timing()
        check_generate_request(data)
        info = resolve_model(services.engine, data.model)
        window = context_window(data.options, info)
        if not data.prompt:
            return Response(load_response(info.name, chat=False))
        if data.raw:
            tokens = await tokenize(services.engine, info.name, data.prompt)
        else:
            # Ollama templates a generate prompt as one user turn (after the system prompt).
            messages = [ChatMessage(role="system", content=data.system)] if data.system else []
            messages.append(ChatMessage(role="user", content=data.prompt))
            tokens = await render_chat(services.engine, info.name, messages)
        schema = output_schema(data)
        plan = None if data.raw else reasoning_plan(reasoning_style(info, schema is not None))
        prompt = Prompt(tokens=tokens, plan=plan, json_schema=schema, grammar=None)
        return await _run(request, services, info, data, prompt, timing, window)

    @get("/tags", summary="List local models")
    async def list_tags(self, services: ServicesDep) -> TagsResponse:
        return TagsResponse(models=[
            TagModel(name=m.name, model=m.name, modified_at=timestamp(m.modified_at),
                     size=m.size_bytes, digest=m.digest, details=model_details(m))
            for m in services.engine.list_models()
        ])

    @post("/show", status_code=200, summary="Show model information")
    async def show(self, services: ServicesDep, data: JSONBody[ModelRequest]) -> ShowResponse:
        info = resolve_model(services.engine, data.model or data.name or "", to_run=False)
        return ShowResponse(
            modelfile=f"# Modelfile generated by flock\nFROM {info.name}\n",
            template=info.chat_template or "",
            details=model_details(info),
            model_info={
                "general.architecture": info.architecture,
                "general.parameter_count": info.parameters,
                "flock.engine": info.engine,
                f"{info.architecture}.context_length": info.context_length,
            },
            # Every model can call tools: through its own template, or flock's default format.
            capabilities=["completion", "tools",
                          *(["thinking"] if reasoning_style(info).fmt != "none" else [])],
            modified_at=timestamp(info.modified_at),
        )

    @get("/ps", summary="List running models")
    async def ps(self, services: ServicesDep) -> PsResponse:
        running = []
        for loaded in services.engine.loaded_models():
            try:
                info = services.engine.get_model(loaded.name)
            except ModelNotFound:  # unloaded between the two calls
                continue
            running.append(RunningModel(
                name=info.name, model=info.name, size=loaded.size_bytes, digest=info.digest,
                details=model_details(info),
                expires_at=timestamp(loaded.expires_at) if loaded.expires_at else None,
                # MLX computes from the memory the weights sit in (unified memory on Apple).
                size_vram=loaded.size_bytes,
                context_length=info.context_length,
            ))
        return PsResponse(models=running)

    @get("/version", summary="Server version")
    async def version(self) -> VersionResponse:
        return VersionResponse(version=__version__)

    @post("/pull", status_code=200, summary="Pull a model")
    async def pull(self, request: AnyRequest, services: ServicesDep, data: JSONBody[PullRequest],
                   ) -> Response[ProgressResponse]:
        name = data.model or data.name or ""
        if not name:
            raise invalid("'model' must name a model", param="model")
        if services.pull is None:
            raise ApiError("not_supported", "This node cannot pull models.")
        if data.stream:
            return ClosingStream(pull_ndjson(services.pull, name), media_type=NDJSON_MEDIA_TYPE)
        try:
            info = await until_disconnect(request, services.pull(name))
        except Exception as exc:
            raise pull_error(name, exc) from exc
        return Response(ProgressResponse(status="success", digest=info.digest,
                                         total=info.size_bytes, completed=info.size_bytes))
