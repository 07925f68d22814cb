"""Tool calling and structured output for the adapters: checking tool definitions and schemas
(a 400 naming what is wrong), showing tools to the model, forcing calls, and finding calls in
what it wrote.

Each adapter turns its own wire shapes into `ToolSpec`s, a `ToolChoice` and `ChatMessage`s, and
gets back a `ToolPlan` that knows the model's tool format. The plan prompts the model through
its chat template (or flock's default format), adds the grammar of a forced call to the
request, and parses output whole or streamed (`agent.tools.parsers`).
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.api.common import render_chat
from agent.api.errors import invalid, model_not_found
from agent.engine import ChatMessage, Engine, ModelNotFound
from agent.tools.formats import prepare_conversation
from agent.tools.grammar import ANY_JSON_OBJECT, forced_call_grammar, schema_problem
from agent.tools.parsers import ParsedOutput, ToolCallStream, parse_output
from agent.tools.types import ToolChoice, ToolFormat, ToolSpec

# OpenAI's rule for function names (Anthropic's is the same without "."); also what the
# parsers accept as a name.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_ALNUM = string.ascii_letters + string.digits


def check_schema(schema: Any, param: str) -> dict[str, Any]:
    """A JSON schema flock can constrain output to, or a 400 naming `param` and the problem."""
    problem = schema_problem(schema)
    if problem is not None:
        raise invalid(f"'{param}' is not a usable JSON schema: {problem}", param=param)
    return schema


def tool_spec(name: Any, description: Any, parameters: Any, where: str,
              parameters_key: str = "parameters") -> ToolSpec:
    """One tool definition, checked; `where` is its place in the request (e.g. "tools[0]")."""
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise invalid(f"'{where}.name' must be 1-128 letters, digits, '_', '-' or '.'; got "
                      f"{name!r}.", param=f"{where}.name")
    if description is not None and not isinstance(description, str):
        raise invalid(f"'{where}.description' must be a string.", param=f"{where}.description")
    param = f"{where}.{parameters_key}"
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    check_schema(parameters, param)
    if parameters.get("type", "object") != "object":
        raise invalid(f"'{param}' must describe an object (\"type\": \"object\"): a tool's "
                      "arguments are named.", param=param)
    return ToolSpec(name=name, description=description or "", parameters=parameters)


def check_unique(tools: Sequence[ToolSpec], param: str = "tools") -> None:
    seen: set[str] = set()
    for tool in tools:
        if tool.name in seen:
            raise invalid(f"Tool names must be unique; '{tool.name}' appears twice.", param=param)
        seen.add(tool.name)


def check_choice(choice: ToolChoice, tools: Sequence[ToolSpec], param: str) -> None:
    if choice.mode == "named" and all(t.name != choice.name for t in tools):
        raise invalid(f"'{param}' names the tool '{choice.name}', which is not in 'tools'.",
                      param=param)
    if choice.forced and not tools:
        raise invalid(f"'{param}' requires a tool call, but no 'tools' are given.", param=param)


def new_call_id(prefix: str, fmt: ToolFormat) -> str:
    """A fresh call id: the API's own style, except for Mistral-format models, whose templates
    accept only 9 letters and digits when the call is replayed to them."""
    if fmt == "mistral":
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass(frozen=True)
class ToolPlan:
    """What one request does with tools, given the model's format."""

    fmt: ToolFormat
    tools: tuple[ToolSpec, ...]
    choice: ToolChoice

    @property
    def parses(self) -> bool:
        """Whether output may hold calls (tools offered and not switched off)."""
        return bool(self.tools) and self.choice.mode != "none"

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tools)

    def grammar(self) -> str | None:
        """The grammar forcing a call, when the client requires one."""
        if not self.choice.forced:
            return None
        return forced_call_grammar(self.fmt, self.tools, self.choice)

    @property
    def max_calls(self) -> int | None:
        return None if self.choice.parallel else 1

    def stream(self) -> ToolCallStream | None:
        if not self.parses:
            return None
        return ToolCallStream(self.fmt, self.names, self.max_calls)

    def parse(self, text: str) -> ParsedOutput:
        if not self.parses:
            return ParsedOutput(text=text, calls=[], pieces=[text] if text else [])
        return parse_output(self.fmt, text, self.names, self.max_calls)


def needs_plan(tools: Sequence[ToolSpec], messages: Sequence[ChatMessage]) -> bool:
    """Tools are offered, or the history holds calls or results the prompt must show."""
    return bool(tools) or any(m.role == "tool" or m.tool_calls for m in messages)


async def tool_plan(engine: Engine, model: str, tools: Sequence[ToolSpec],
                    choice: ToolChoice) -> ToolPlan:
    try:
        fmt = await engine.tool_format(model)
    except ModelNotFound:
        raise model_not_found(model) from None
    return ToolPlan(fmt=fmt, tools=tuple(tools), choice=choice)


async def render_with_tools(engine: Engine, model: str, messages: list[ChatMessage],
                            plan: ToolPlan | None) -> list[int]:
    """The prompt: the conversation with the plan's tools, in the model's own format."""
    if plan is None:
        return await render_chat(engine, model, messages)
    conversation, template_tools = prepare_conversation(plan.fmt, messages, plan.tools,
                                                        plan.choice)
    return await render_chat(engine, model, conversation, template_tools)


def json_mode_schema() -> dict[str, Any]:
    """The schema behind "any JSON object" modes (OpenAI json_object, Ollama "json")."""
    return dict(ANY_JSON_OBJECT)

