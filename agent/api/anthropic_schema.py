"""Anthropic Messages wire models: requests, the message object and streaming events.

Request models forbid unknown fields (a 400 naming the field); fields accepted only in their
neutral form (tools, thinking ...) are checked by the adapter.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

Probability = Annotated[float, Meta(ge=0.0, le=1.0)]


class ContentBlockIn(Struct, kw_only=True):
    """A content block; blocks other than text are rejected by type in the adapter."""

    type: str
    text: str | None = None
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
    top_k: Annotated[int, Meta(ge=0)] | None = None
    metadata: Metadata | None = None
    service_tier: str | None = None
    inference_geo: str | None = None
    diagnostics: dict[str, Any] | None = None
    container: str | dict[str, Any] | None = None


class CountTokensRequest(_ConversationFields, kw_only=True, forbid_unknown_fields=True):
    pass


# --- responses ------------------------------------------------------------------------------


class TextBlock(Struct, kw_only=True):
    type: Literal["text"] = "text"
    text: str


class UsageOut(Struct, kw_only=True):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


StopReason = Literal["end_turn", "max_tokens", "stop_sequence"]


class MessageOut(Struct, kw_only=True):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[TextBlock]
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
    content_block: TextBlock


class Ping(Struct, kw_only=True):
    type: Literal["ping"] = "ping"


class TextDelta(Struct, kw_only=True):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ContentBlockDelta(Struct, kw_only=True):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta


class ContentBlockStop(Struct, kw_only=True):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDeltaBody(Struct, kw_only=True):
    stop_reason: StopReason | None
    stop_sequence: str | None


class DeltaUsage(Struct, kw_only=True):
    output_tokens: int


class MessageDelta(Struct, kw_only=True):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDeltaBody
    usage: DeltaUsage


class MessageStop(Struct, kw_only=True):
    type: Literal["message_stop"] = "message_stop"
