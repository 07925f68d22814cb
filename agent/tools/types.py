"""The shapes tool calling works with inside flock, whatever API a request came from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

ToolFormat = Literal["hermes", "llama3", "mistral", "glm45", "deepseek_v3", "deepseek_v31",
                     "minimax", "harmony", "default"]
"""How a model family writes tool calls (see `agent.tools.formats`):
- "hermes": `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (Hermes, Qwen 2/2.5/3);
- "llama3": a bare `{"name": ..., "parameters": ...}` object, maybe after `<|python_tag|>`;
- "mistral": `[TOOL_CALLS]` then a JSON list of calls, or `name[ARGS]{...}` (newer tokenizers);
- "glm45", "deepseek_v3" (fenced JSON), "deepseek_v31", "minimax": see `agent.tools.families`;
- "harmony": gpt-oss's channels, a call addressed `to=functions.NAME` (`agent.tools.harmony`);
- "default": flock's documented format for templates without tools: Hermes-style tags, with
  the tools described in the system prompt by flock rather than by the template.
"""

ChoiceMode = Literal["auto", "none", "required", "named"]


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call; `parameters` is its arguments' JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object",
                                                                "properties": {}})

    def as_template_tool(self) -> dict[str, Any]:
        """The OpenAI-style shape Hugging Face chat templates expect in `tools`."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made. `id` is assigned by the API adapter (each API has its own style)."""

    name: str
    arguments: dict[str, Any]
    id: str = ""

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def as_template_call(self) -> dict[str, Any]:
        """The shape chat templates expect in an assistant message's `tool_calls`."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolChoice:
    """What the client allows: `auto` (model decides), `none` (text only), `required` (at least
    one call), `named` (a call to `name`). `parallel` allows several calls in one turn."""

    mode: ChoiceMode = "auto"
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")
