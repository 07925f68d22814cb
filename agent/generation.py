"""The one internal request and event shape every API adapter and every runner speaks.

API adapters turn their wire format into a `GenerationRequest` and turn the `GenerationEvent`
stream back into their own format; runners never see an API's wire format. These types travel
between the agent and its runner processes as msgpack, so they are msgspec structs.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

FinishReason = Literal["stop", "length", "cancelled", "error"]


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick each next token. `temperature == 0` means greedy in every API."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class GenerationRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One completion to run: the prompt is already templated and tokenized by the agent."""

    id: str
    model: str
    prompt_tokens: list[int]
    sampling: SamplingParams
    # JSON schema the output must follow (constrained decoding); None means free text.
    json_schema: dict | None = None
    # A grammar the output must follow, in llguidance's Lark dialect (`%json {...}` inlines a
    # JSON schema); used for forced tool calls. Takes precedence over `json_schema`.
    grammar: str | None = None
    # Predicted Outputs (OpenAI's `prediction`): tokens the reply is expected to largely
    # repeat; they become drafts for speculative decoding, never output by themselves.
    prediction_tokens: list[int] | None = None


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    text: str
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    text: str
    logprob: float
    top: list[TopLogprob] = []


class TokenChunk(msgspec.Struct, frozen=True, tag="token", kw_only=True):
    """New text for a request. `text` may be empty while a stop string is still undecided."""

    id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    # Predicted Outputs: prediction tokens kept in the reply, and the rest of the prediction.
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Finished(msgspec.Struct, frozen=True, tag="finished", kw_only=True):
    """The last event of a request that ran. `stop_sequence` names the stop string that ended it."""

    id: str
    reason: FinishReason
    usage: Usage
    stop_sequence: str | None = None


class Failed(msgspec.Struct, frozen=True, tag="failed", kw_only=True):
    """The last event of a request that could not run or broke while running.

    `code` is one of: "bad_request" (the request can never run, e.g. longer than the context),
    "overloaded" (try again later), "not_found" (no such model), "internal" (the runner broke),
    "unavailable" (the node is shutting down: try another node or later).
    """

    id: str
    code: Literal["bad_request", "overloaded", "not_found", "internal", "unavailable"]
    message: str


GenerationEvent = TokenChunk | Finished | Failed


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message of a conversation in the shape chat templates expect."""

    role: str  # system | user | assistant | tool
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None
