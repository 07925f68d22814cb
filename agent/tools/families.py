"""Call syntaxes of the MoE families whose calls are not one JSON object: the markers around a
call region and the parser of what is between them.

- DeepSeek V3 / V3.1 (markers written here with ASCII bars and underscores; the model's use
  U+FF5C and U+2581): `<|tool_calls_begin|><|tool_call_begin|>function<|tool_sep|>NAME\\n
  ```json\\n{...}\\n```<|tool_call_end|><|tool_calls_end|>` (V3), or
  `...<|tool_call_begin|>NAME<|tool_sep|>{...}<|tool_call_end|>...` (V3.1), one or more calls
  per region;
- GLM 4.5: `<tool_call>NAME\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n</tool_call>`;
- MiniMax M2: `<minimax:tool_call>\\n<invoke name="NAME">\\n<parameter name="k">v</parameter>
  \\n</invoke>\\n</minimax:tool_call>`, several invokes per region.

GLM and MiniMax write argument values as bare text; a value becomes JSON when the tool's schema
types it as something other than a string (or, with no schema, when it parses as JSON).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from typing import Any

from agent.tools.types import ToolCall

_BAR, _SPACE = "\uff5c", "\u2581"  # DeepSeek's fullwidth bar and its word-piece space


def _ds(name: str) -> str:
    return f"<{_BAR}{name.replace('_', _SPACE)}{_BAR}>"


DS_CALLS_BEGIN = _ds("tool_calls_begin")
DS_CALLS_END = _ds("tool_calls_end")
DS_CALL_BEGIN = _ds("tool_call_begin")
DS_CALL_END = _ds("tool_call_end")
DS_SEP = _ds("tool_sep")
MINIMAX_OPEN = "<minimax:tool_call>"
MINIMAX_CLOSE = "</minimax:tool_call>"

Schemas = Mapping[str, dict[str, Any]]

_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
_INVOKE = re.compile(r"<invoke\s+name=\"([^\"]+)\"\s*>(.*?)</invoke>", re.DOTALL)
_PARAMETER = re.compile(r"<parameter\s+name=\"([^\"]+)\"\s*>(.*?)</parameter>", re.DOTALL)


def _allowed(name: str, names: Collection[str] | None) -> bool:
    return names is None or name in names


def parse_deepseek_calls(body: str, names: Collection[str] | None) -> list[ToolCall] | None:
    """The calls between DS_CALLS_BEGIN and DS_CALLS_END; None unless every call is whole and
    valid."""
    calls: list[ToolCall] = []
    rest = body.strip()
    while rest:
        if not rest.startswith(DS_CALL_BEGIN):
            return None
        end = rest.find(DS_CALL_END)
        if end < 0:
            return None
        one, rest = rest[len(DS_CALL_BEGIN):end], rest[end + len(DS_CALL_END):].strip()
        left, sep, right = one.partition(DS_SEP)
        if not sep:
            return None
        if left.strip() == "function":  # V3: the type, then the name on the first line
            name, _, arguments = right.partition("\n")
        else:  # V3.1: the name, then the arguments
            name, arguments = left, right
        fence = _FENCE.match(arguments)
        text = fence.group(1) if fence else arguments
        try:
            decoded = json.loads(text) if text.strip() else {}
        except ValueError:
            return None
        name = name.strip()
        if not isinstance(decoded, dict) or not _allowed(name, names):
            return None
        calls.append(ToolCall(name=name, arguments=decoded))
    return calls or None


def _typed(value: str, schema: dict[str, Any] | None) -> Any:
    """A bare-text argument as the schema types it."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind == "string":
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if kind is not None or not isinstance(decoded, str) else value


def _arguments(pairs: list[tuple[str, str]], name: str, schemas: Schemas | None,
               ) -> dict[str, Any]:
    properties = ((schemas or {}).get(name) or {}).get("properties") or {}
    return {key.strip(): _typed(value.strip("\n"), properties.get(key.strip()))
            for key, value in pairs}


def parse_glm_call(body: str, names: Collection[str] | None,
                   schemas: Schemas | None = None) -> ToolCall | None:
    """A GLM 4.5 call body (between `<tool_call>` and `</tool_call>`)."""
    first = body.find("<arg_key>")
    name = (body if first < 0 else body[:first]).strip()
    if not name or "\n" in name or "<" in name or not _allowed(name, names):
        return None
    pairs = _GLM_ARG.findall(body)
    leftover = _GLM_ARG.sub("", body[len(body) - len(body.lstrip()):]).strip()
    if leftover != name:
        return None  # anything else in the body is not this syntax
    return ToolCall(name=name, arguments=_arguments(pairs, name, schemas))


def parse_minimax_calls(body: str, names: Collection[str] | None,
                        schemas: Schemas | None = None) -> list[ToolCall] | None:
    """The invokes of a MiniMax call region; None unless every one is valid."""
    invokes = _INVOKE.findall(body)
    if not invokes or _INVOKE.sub("", body).strip():
        return None
    calls = []
    for name, inner in invokes:
        if not _allowed(name, names) or _PARAMETER.sub("", inner).strip():
            return None
        calls.append(ToolCall(name=name, arguments=_arguments(_PARAMETER.findall(inner), name,
                                                              schemas)))
    return calls


def render_deepseek_call(name: str, arguments: Any, fenced: bool = True) -> str:
    payload = json.dumps(arguments, ensure_ascii=False)
    if fenced:
        return f"{DS_CALL_BEGIN}function{DS_SEP}{name}\n```json\n{payload}\n```{DS_CALL_END}"
    return f"{DS_CALL_BEGIN}{name}{DS_SEP}{payload}{DS_CALL_END}"
