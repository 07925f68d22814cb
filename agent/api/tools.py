"""Tool calling, reasoning and structured output for the adapters: checking tool definitions
and schemas (a 400 naming what is wrong), showing tools to the model, forcing calls, and
splitting what it wrote into reasoning, answer and calls.

Each adapter turns its own wire shapes into `ToolSpec`s, a `ToolChoice` and `ChatMessage`s, and
gets back a `ToolPlan` that knows the model's tool format. The plan prompts the model through
its chat template (or flock's default format), adds the grammar of a forced call to the
request, and parses output whole or streamed (`agent.tools.parsers`).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.api.common import render_chat
from agent.api.errors import invalid, model_not_found
from agent.engine import ChatMessage, Engine, ModelInfo, ModelNotFound
from agent.tools.formats import prepare_conversation
from agent.tools.grammar import ANY_JSON_OBJECT, forced_call_grammar, schema_problem
from agent.tools.output import OutputStream, split_output
from agent.tools.parsers import ParsedOutput
from agent.tools.reasoning import NO_REASONING, ReasoningStyle, detect_reasoning
from agent.tools.types import ToolCall, ToolChoice, ToolFormat, ToolSpec

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
    """What one request does with tools and reasoning, given the model's formats."""

    fmt: ToolFormat
    tools: tuple[ToolSpec, ...]
    choice: ToolChoice
    reasoning: ReasoningStyle = NO_REASONING

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

    @property
    def splits(self) -> bool:
        """Whether output needs splitting: it may hold calls, or reasoning."""
        return self.parses or self.reasoning.fmt != "none" or self.fmt == "harmony"

    def stream(self) -> OutputStream | None:
        if not self.splits:
            return None
        return OutputStream(self.reasoning, self.fmt if self.parses else None, self.names,
                            self.max_calls, {t.name: t.parameters for t in self.tools})

    def parse(self, text: str) -> ParsedOutput:
        stream = self.stream()
        if stream is None:
            return ParsedOutput(text=text, calls=[], pieces=[text] if text else [])
        return split_output(stream, text)


def needs_plan(tools: Sequence[ToolSpec], messages: Sequence[ChatMessage]) -> bool:
    """Tools are offered, or the history holds calls or results the prompt must show."""
    return bool(tools) or any(m.role == "tool" or m.tool_calls for m in messages)


async def tool_plan(engine: Engine, model: str, tools: Sequence[ToolSpec],
                    choice: ToolChoice, reasoning: ReasoningStyle = NO_REASONING,
                    ) -> ToolPlan:
    try:
        fmt = await engine.tool_format(model)
    except ModelNotFound:
        raise model_not_found(model) from None
    if fmt == "harmony" and reasoning.fmt == "none":
        reasoning = ReasoningStyle("harmony")
    return ToolPlan(fmt=fmt, tools=tuple(tools), choice=choice, reasoning=reasoning)


def reasoning_style(info: ModelInfo, constrained: bool = False) -> ReasoningStyle:
    """How the model writes reasoning, from its template. Output generated under a schema or a
    forced call's grammar holds none (and must not be read as a block the prompt opened)."""
    return NO_REASONING if constrained else detect_reasoning(info.chat_template)


def reasoning_plan(style: ReasoningStyle) -> ToolPlan | None:
    """The plan of a request without tools, for a model that reasons (None when it does not)."""
    if style.fmt == "none":
        return None
    return ToolPlan(fmt="default", tools=(), choice=ToolChoice(mode="none"), reasoning=style)


def history_call(call: Any, at: str) -> dict[str, Any]:
    """One call of a replayed assistant turn (`at` is its place, e.g. "messages[1].tool_calls[0]")
    in template shape. Its arguments may be an object (Ollama) or its JSON text (OpenAI)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid(f"'{at}.function.name' is required.", param=f"{at}.function.name")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise invalid(f"'{at}.function.arguments' is not valid JSON.",
                          param=f"{at}.function.arguments") from None
    if not isinstance(arguments, dict):
        raise invalid(f"'{at}.function.arguments' must be a JSON object.",
                      param=f"{at}.function.arguments")
    return ToolCall(name=function["name"], arguments=arguments,
                    id=str(call.get("id") or "")).as_template_call()


def history_calls(calls: list[dict[str, Any]] | None, where: str) -> list[dict[str, Any]]:
    """An assistant turn's calls in template shape; `where` is the message's place."""
    return [history_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(calls or [])]


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



@dataclass(frozen=True)
class Prompt:
    """A templated conversation ready to run: its tokens, what it does with tools (None when
    it offers none and replays none), and the constraint its output is generated under."""

    tokens: list[int]
    plan: ToolPlan | None
    json_schema: dict[str, Any] | None
    grammar: str | None

    @property
    def output_plan(self) -> ToolPlan | None:
        """The plan when output needs splitting (calls or reasoning), else None."""
        return self.plan if self.plan is not None and self.plan.splits else None


async def prepare_prompt(engine: Engine, info: ModelInfo, messages: list[ChatMessage],
                         tools: Sequence[ToolSpec], choice: ToolChoice,
                         schema: dict[str, Any] | None) -> Prompt:
    """Every adapter's way from a checked conversation to a prompt: a tool plan when tools are
    offered or replayed, the model's template, a forced call's grammar (which wins over an
    output schema), and how its reasoning is split from the answer."""
    plan = None
    constrained = schema is not None or choice.forced
    style = reasoning_style(info, constrained)
    if needs_plan(tools, messages):
        if schema is not None and not choice.forced:
            # The reply must be the requested JSON, so it cannot also be a call.
            choice = ToolChoice(mode="none")
        plan = await tool_plan(engine, info.name, tools, choice, style)
    tokens = await render_with_tools(engine, info.name, messages, plan)
    grammar = plan.grammar() if plan is not None else None
    return Prompt(tokens=tokens, plan=plan or reasoning_plan(style),
                  json_schema=None if grammar else schema, grammar=grammar)
