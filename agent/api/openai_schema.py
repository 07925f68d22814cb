"""OpenAI wire models: chat completions, legacy completions and models, requests and responses.

Request models forbid unknown fields so that anything flock does not implement is a 400 naming
the field. Fields that are declared but only accepted in their neutral form (tools, logit_bias,
response_format ...) are checked by the adapter, which names them in its error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from agent import __version__

PositiveInt = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]

# OpenAI's schema types `system_fingerprint` as a string: the backend configuration that made
# the output. flock's output changes with its own version.
SYSTEM_FINGERPRINT = "fp_flock_" + __version__.replace(".", "_")


class ContentPart(Struct, kw_only=True):
    """A part of a message's content; other fields of non-text parts are left to the type check."""

    type: str
    text: str | None = None


class ChatMessageIn(Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    # A replayed reasoning model's turn; its reasoning is not shown to the model again.
    reasoning_content: str | None = None
    reasoning: str | None = None


class Prediction(Struct, kw_only=True, forbid_unknown_fields=True):
    """Predicted Outputs: text the reply is expected to largely repeat (speculative drafts)."""

    type: Literal["content"]
    content: str | list[ContentPart]


class StreamOptions(Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False
    # Padding against length side channels; flock adds none, which changes nothing else.
    include_obfuscation: bool | None = None


class ResponseFormat(Struct, kw_only=True):
    type: str
    # {"name": ..., "schema": {...}, "strict": bool, "description": ...} for "json_schema"
    json_schema: dict[str, Any] | None = None
    # {"type": "json_object", "schema": {...}}: the form vLLM, Together and Anyscale accept
    # (instructor's JSON_SCHEMA mode sends it).
    schema: dict[str, Any] | None = None


class _SamplingFields(Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields both OpenAI endpoints share, plus the common non-standard sampling extensions."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: PositiveInt | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Non-standard (vLLM / llama.cpp servers): top_k -1 or 0 disables it.
    # Bounded: the runner's wire (msgpack) carries 64-bit integers, and no vocabulary is larger.
    top_k: Annotated[int, Meta(ge=-1, le=2**63 - 1)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0)] | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessageIn]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    prediction: Prediction | None = None
    modalities: list[str] | None = None
    # Metadata for the caller's own bookkeeping: accepted, changes nothing about the output.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(_SamplingFields, kw_only=True, forbid_unknown_fields=True):
    # A string, a token list, or a one-element batch of either; checked by the adapter because
    # msgspec cannot tell list[int] from list[str] in a union.
    prompt: str | list[Any]
    suffix: str | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool | None = None
    best_of: PositiveInt | None = None


# --- responses ------------------------------------------------------------------------------


class TopLogprobOut(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(Struct, kw_only=True):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class PromptTokensDetails(Struct, kw_only=True):
    cached_tokens: int


class CompletionTokensDetails(Struct, kw_only=True):
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class UsageOut(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class FunctionCallOut(Struct, kw_only=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallOut(Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessageOut(Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    # The model's reasoning, apart from the answer (as vLLM and llama.cpp's server return it);
    # absent when it wrote none.
    reasoning_content: str | UnsetType = UNSET
    tool_calls: list[ToolCallOut] | UnsetType = UNSET  # absent unless the model called tools


class ChatChoice(Struct, kw_only=True):
    index: int
    message: AssistantMessageOut
    logprobs: ChoiceLogprobs | None
    finish_reason: str


class ChatCompletion(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut
    system_fingerprint: str = SYSTEM_FINGERPRINT


class FunctionCallDelta(Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Struct, kw_only=True, omit_defaults=True):
    """A streamed call: the first delta of call `index` has its id, type and name; the
    arguments' JSON text follows in later deltas, to be concatenated."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(Struct, kw_only=True):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageOut | None = None
    system_fingerprint: str = SYSTEM_FINGERPRINT


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(Struct, kw_only=True):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class TextCompletion(Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut | None = None
    system_fingerprint: str = SYSTEM_FINGERPRINT


class ModelCard(Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flock"
    engine: str = ""  # flock's extension: which engine serves it ("flock" or "mlx-lm")
    refusal: str | None = None  # flock's extension: why it cannot be served here, if so


class ModelList(Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]
