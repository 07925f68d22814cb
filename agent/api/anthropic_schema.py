"""Anthropic Messages wire models: requests, the message object and streaming events.

Request models forbid unknown fields (a 400 naming the field); fields accepted only in their
neutral form (tools, thinking ...) are checked by the adapter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

Probability = Annotated[float, Meta(ge=0.0, le=1.0)]


class ContentBlockIn(Struct, kw_only=True):
    """A content block: text, tool_use (assistant) or tool_result (user); other types are
    rejected by the adapter."""

    type: str
    text: str | None = None
    # tool_use
    id: str | None = None
    name: str | None = None
    input: Any = None
    # tool_result: its content is a string or a list of (text) blocks
    tool_use_id: str | None = None
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None
    # thinking / redacted_thinking (replayed from an earlier reply)
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None
    # Prompt-caching hints and citations change nothing about what flock generates.
    cache_control: dict[str, Any] | None = None
    citations: list[dict[str, Any]] | None = None


class MessageIn(Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlockIn]


class Metadata(Struct, kw_only=True, forbid_unknown_fields=True):
    user_id: str | None = None


class OutputConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    effort: str | None = None
    format: dict[str, Any] | None = None


class _ConversationFields(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    messages: list[MessageIn]
    system: str | list[ContentBlockIn] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    # Hints and bookkeeping that change nothing about what flock generates: prompt caching is
    # automatic, and flock has one speed, one place and no workspaces.
    cache_control: dict[str, Any] | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


class MessagesRequest(_ConversationFields, kw_only=True, forbid_unknown_fields=True):
    # 0 asks only to warm the prompt cache: nothing is generated.
    max_tokens: Annotated[int, Meta(ge=0)]
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: Probability | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None  # the runner's wire: int64
    metadata: Metadata | None = None
    service_tier: str | None = None
    inference_geo: str | None = None
    diagnostics: dict[str, Any] | None = None
    container: str | dict[str, Any] | None = None


class CountTokensRequest(_ConversationFields, kw_only=True, forbid_unknown_fields=True):
    pass


# --- responses ------------------------------------------------------------------------------


class TextBlock(Struct, kw_only=True, tag_field="type", tag="text"):
    text: str


class ToolUseBlock(Struct, kw_only=True, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class ThinkingBlock(Struct, kw_only=True, tag_field="type", tag="thinking"):
    """The model's reasoning (extended thinking). `signature` is opaque to clients, who send
    the block back as it is; flock's is a digest of the text."""

    thinking: str
    signature: str


OutBlock = TextBlock | ToolUseBlock | ThinkingBlock


class UsageOut(Struct, kw_only=True):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageOut(Struct, kw_only=True):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[OutBlock]
    model: str
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: UsageOut


class CountTokensResponse(Struct, kw_only=True):
    input_tokens: int


class MessageStart(Struct, kw_only=True):
    type: Literal["message_start"] = "message_start"
    message: MessageOut


class ContentBlockStart(Struct, kw_only=True):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: OutBlock


class Ping(Struct, kw_only=True):
    type: Literal["ping"] = "ping"


class TextDelta(Struct, kw_only=True, tag_field="type", tag="text_delta"):
    text: str


class InputJsonDelta(Struct, kw_only=True, tag_field="type", tag="input_json_delta"):
    """A piece of a tool_use block's input, as JSON text to be concatenated."""

    partial_json: str


class ThinkingDelta(Struct, kw_only=True, tag_field="type", tag="thinking_delta"):
    thinking: str


class SignatureDelta(Struct, kw_only=True, tag_field="type", tag="signature_delta"):
    """Sent just before a thinking block stops."""

    signature: str


class ContentBlockDelta(Struct, kw_only=True):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | InputJsonDelta | ThinkingDelta | SignatureDelta


class ContentBlockStop(Struct, kw_only=True):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDeltaBody(Struct, kw_only=True):
    stop_reason: StopReason | None
    stop_sequence: str | None


class DeltaUsage(Struct, kw_only=True, omit_defaults=True):
    """Cumulative usage at the end of a stream: the input figures are known only once the
    prefix cache has been consulted, so they are repeated here as Anthropic does."""
    output_tokens: int
    input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class MessageDelta(Struct, kw_only=True):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDeltaBody
    usage: DeltaUsage


class MessageStop(Struct, kw_only=True):
    type: Literal["message_stop"] = "message_stop"
