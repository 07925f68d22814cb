"""What the API adapters need from the serving side, as one protocol.

The adapters in `agent/api/` depend only on this protocol and on `agent.generation`; the
implementation (`agent.serving.engine.NodeEngine`: a runner pool and a router) lives below them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec

from agent.generation import ChatMessage as ChatMessage  # re-exported for the adapters
from agent.generation import GenerationEvent, GenerationRequest
from agent.tools.types import ToolFormat


def canonical_name(name: str) -> str:
    """Ollama clients send `name:latest`; flock's store has one version per name."""
    return name.removesuffix(":latest")


class ModelNotFound(LookupError):
    """No model of that name is in the store or placed in the cluster."""

    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' not found")
        self.name = name


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    architecture: str
    parameters: int
    quantization: str  # "F32", "F16", "Q4" ...
    size_bytes: int
    context_length: int
    digest: str
    modified_at: float  # unix seconds
    chat_template: str | None = None
    engine: str = ""  # which engine serves it: "flock" (its own decoder) or "mlx-lm"
    refusal: str | None = None  # why nothing here can serve it (its architecture), if so


class LoadedModel(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    size_bytes: int
    expires_at: float | None = None


class Engine(Protocol):
    def list_models(self) -> list[ModelInfo]:
        """Every model this node can serve (store and placed instances)."""
        ...

    def get_model(self, name: str) -> ModelInfo:
        """The model's info; raises ModelNotFound."""
        ...

    def loaded_models(self) -> list[LoadedModel]:
        """Models with a running instance (Ollama's /api/ps)."""
        ...

    async def render_chat(
        self,
        model: str,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Apply the model's chat template (with a generation prompt) and tokenize."""
        ...

    async def tool_format(self, model: str) -> ToolFormat:
        """How the model writes tool calls, read from its chat template (`agent.tools.formats`);
        "default" when its template has no tools. Raises ModelNotFound."""
        ...

    async def tokenize(self, model: str, text: str) -> list[int]:
        """Tokenize raw text for a plain completion (adds BOS where the model wants it)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Run a request; the stream ends with Finished or Failed; closing it cancels it."""
        ...
