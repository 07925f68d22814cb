"""Which tool-call format a model uses, and how a conversation with tools is shown to it.

The format is read from the model's chat template, never guessed from its output: a template
that renders `tools` and shows one family's call syntax gets that family's parser. A template
without tools (SmolLM2's), or with a syntax flock does not parse, gets flock's default format:
the tools are described in the system prompt and calls are written Hermes-style,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

with results shown back as a user turn wrapped in `<tool_response>` tags (a role every template
accepts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from agent.generation import ChatMessage
from agent.tools.types import ToolChoice, ToolFormat, ToolSpec

# A template renders tools when it reads the `tools` variable (Jinja).
_USES_TOOLS = re.compile(r"\btools\b")


def template_text(template: str | Sequence[Mapping[str, str]] | Mapping[str, str] | None,
                  ) -> str | None:
    """The template used with tools: Hugging Face repos may ship several named templates, and
    transformers picks "tool_use" when tools are given."""
    if template is None or isinstance(template, str):
        return template
    named = ({t["name"]: t["template"] for t in template} if not isinstance(template, Mapping)
             else dict(template))
    return named.get("tool_use") or named.get("default") or next(iter(named.values()), None)


def detect_tool_format(template: str | Sequence[Mapping[str, str]] | Mapping[str, str] | None,
                       ) -> ToolFormat:
    """The family whose call syntax the template teaches; "default" when it teaches none."""
    text = template_text(template)
    if not text or not _USES_TOOLS.search(text):
        return "default"
    if "<|channel|>" in text and "to=functions" in text:
        return "harmony"
    if "<minimax:tool_call>" in text:
        return "minimax"
    if "tool\u2581calls\u2581begin" in text:
        # V3 writes the arguments in a ```json fence; V3.1 writes them bare.
        return "deepseek_v3" if "```json" in text else "deepseek_v31"
    if "<arg_key>" in text:
        return "glm45"
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text or "[AVAILABLE_TOOLS]" in text:
        return "mistral"
    if "<|python_tag|>" in text or ("<|start_header_id|>" in text and "ipython" in text):
        return "llama3"
    return "default"


# --- the default format -------------------------------------------------------------------

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


def default_tool_prompt(tools: Sequence[ToolSpec]) -> str:
    """System-prompt instructions for a model whose template knows no tools."""
    listing = "\n".join(json.dumps(t.as_template_tool(), ensure_ascii=False) for t in tools)
    return (
        "You can call functions to help answer the user. The available functions are listed "
        "inside <tools></tools> tags:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "To call a function, reply with a JSON object holding its name and arguments inside "
        "<tool_call></tool_call> tags:\n"
        f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <arguments-object>}}\n{CALL_CLOSE}\n'
        "Function results come back inside <tool_response></tool_response> tags. "
        "If no function is needed, answer normally."
    )


def render_default_call(name: str, arguments: Any) -> str:
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{payload}\n{CALL_CLOSE}"


def _call_parts(call: Mapping[str, Any]) -> tuple[str, Any]:
    function = call.get("function", call)
    return str(function.get("name", "")), function.get("arguments", {})


def _default_history(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """Assistant calls become their text form; tool results become user turns. Results and a
    user turn right after them share one turn, so templates that insist on alternating roles
    accept the conversation."""
    out: list[ChatMessage] = []
    for message in messages:
        previous = out[-1] if out else None
        after_results = (previous is not None and previous.role == "user"
                         and previous.content.endswith("</tool_response>"))
        if message.role == "tool":
            block = f"<tool_response>\n{message.content}\n</tool_response>"
            if after_results:
                out[-1] = ChatMessage(role="user", content=f"{previous.content}\n{block}")  # type: ignore[union-attr]
            else:
                out.append(ChatMessage(role="user", content=block))
        elif message.role == "user" and after_results:
            out[-1] = ChatMessage(role="user", content=f"{previous.content}\n{message.content}")  # type: ignore[union-attr]
        elif message.role == "assistant" and message.tool_calls:
            calls = [render_default_call(*_call_parts(c)) for c in message.tool_calls]
            text = "\n".join(([message.content] if message.content else []) + calls)
            out.append(ChatMessage(role="assistant", content=text))
        else:
            out.append(message)
    return out


def _with_system(messages: list[ChatMessage], extra: str) -> list[ChatMessage]:
    if messages and messages[0].role == "system":
        first = messages[0]
        content = f"{first.content}\n\n{extra}" if first.content else extra
        return [ChatMessage(role="system", content=content), *messages[1:]]
    return [ChatMessage(role="system", content=extra), *messages]


def prepare_conversation(
    fmt: ToolFormat,
    messages: Sequence[ChatMessage],
    tools: Sequence[ToolSpec],
    choice: ToolChoice,
) -> tuple[list[ChatMessage], list[dict[str, Any]] | None]:
    """(messages, tools for the chat template) for a request offering `tools`.

    With `tool_choice` "none" the tools are left out of the prompt altogether, so the model has
    no reason to write a call that would only come back as text.
    """
    offered = list(tools) if choice.mode != "none" else []
    if fmt == "default":
        conversation = _default_history(messages)
        if offered:
            conversation = _with_system(conversation, default_tool_prompt(offered))
        return conversation, None
    conversation = list(messages)
    if fmt in ("deepseek_v3", "deepseek_v31"):
        conversation = [_json_arguments(m) for m in conversation]
    return conversation, [t.as_template_tool() for t in offered] or None


def _json_arguments(message: ChatMessage) -> ChatMessage:
    """DeepSeek's templates concatenate a replayed call's arguments as text (`+`), so they get
    the arguments' JSON rather than the object other templates iterate."""
    if not message.tool_calls:
        return message
    calls = []
    for call in message.tool_calls:
        name, arguments = _call_parts(call)
        text = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                      ensure_ascii=False)
        calls.append({**call, "type": call.get("type", "function"),
                      "function": {"name": name, "arguments": text}})
    return ChatMessage(role=message.role, content=message.content, tool_calls=calls,
                       tool_call_id=message.tool_call_id, name=message.name)
