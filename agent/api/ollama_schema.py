"""Ollama wire models: /api/chat, /api/generate, model listing and pulling.

Request models forbid unknown fields and unknown `options` (a 400 naming the field); fields
checked beyond their type (format, think, tools, images ...) are checked by the adapter.
Response models omit unset fields, as Ollama does for everything but a request's final object.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

Probability = Annotated[float, Meta(ge=0.0, le=1.0)]


class Options(Struct, kw_only=True, forbid_unknown_fields=True):
    temperature: Annotated[float, Meta(ge=0.0)] | None = None
    top_p: Probability | None = None
    # Integers are bounded to Go's int64, as in Ollama (and as the runner's msgpack wire needs).
    top_k: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    min_p: Probability | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    # -1: until the context is full; -2: fill the context (the same thing for flock).
    num_predict: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: Annotated[float, Meta(gt=0.0)] | None = None
    # 0 disables the penalty window, -1 means the whole context.
    repeat_last_n: Annotated[int, Meta(ge=-1, le=2**63 - 1)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: Annotated[int, Meta(ge=1)] | None = None
    # flock's extension (Ollama has no tool_choice; the official client passes options through
    # as they are): "auto" (the default), "none", "required", or the name of one tool to call.
    tool_choice: str | None = None


class MessageIn(Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class _GenerationFields(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str = ""
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    # How long to keep the model loaded: the cluster manages placement, so this is advisory.
    keep_alive: str | float | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None


class ChatRequest(_GenerationFields, kw_only=True, forbid_unknown_fields=True):
    messages: list[MessageIn] = []
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_GenerationFields, kw_only=True, forbid_unknown_fields=True):
    prompt: str = ""
    system: str | None = None
    raw: bool | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None


class ModelRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    """/api/show; `name` is the older spelling of `model`."""

    model: str = ""
    name: str | None = None
    verbose: bool | None = None


class PullRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str = ""
    name: str | None = None
    insecure: bool | None = None
    stream: bool = True


# --- responses ------------------------------------------------------------------------------


class TopLogprobOut(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class LogprobOut(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprobOut] | None = None


class FunctionCallOut(Struct, kw_only=True):
    name: str
    arguments: dict[str, Any]
    index: int


class ToolCallOut(Struct, kw_only=True):
    function: FunctionCallOut


class AssistantMessageOut(Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str
    thinking: str | UnsetType = UNSET  # the model's reasoning, absent when it wrote none
    tool_calls: list[ToolCallOut] | UnsetType = UNSET  # absent unless the model called tools


class _Stats(Struct, kw_only=True, omit_defaults=True):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    logprobs: list[LogprobOut] | None = None


class ChatResponse(_Stats, kw_only=True, omit_defaults=True):
    message: AssistantMessageOut


class GenerateResponse(_Stats, kw_only=True, omit_defaults=True):
    response: str
    thinking: str | None = None  # the model's reasoning, absent when it wrote none


class ModelDetails(Struct, kw_only=True):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class TagModel(Struct, kw_only=True):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(Struct, kw_only=True):
    models: list[TagModel]


class RunningModel(Struct, kw_only=True):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str | None
    size_vram: int
    context_length: int


class PsResponse(Struct, kw_only=True):
    models: list[RunningModel]


class ShowResponse(Struct, kw_only=True):
    license: str = ""
    modelfile: str
    parameters: str = ""
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(Struct, kw_only=True):
    version: str


class ProgressResponse(Struct, kw_only=True, omit_defaults=True):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
