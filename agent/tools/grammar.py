"""Grammars for constrained decoding, as llguidance reads them: JSON schemas for structured
output, and the Lark grammar of a forced tool call in each model family's format.

These are plain strings and checks (no tokenizer, no MLX), so the API layer can reject a bad
schema with a 400 before anything is queued; `agent.runtime.constraints` compiles them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import llguidance

from agent.tools.families import (
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_SEP,
    MINIMAX_CLOSE,
    MINIMAX_OPEN,
)
from agent.tools.formats import CALL_CLOSE, CALL_OPEN
from agent.tools.parsers import MISTRAL_MARKER
from agent.tools.types import ToolChoice, ToolFormat, ToolSpec

# Output JSON the way `json.dumps` writes it ({"a": 1, "b": [2, 3]}): the spacing models see
# most, and no free whitespace, which small models can otherwise repeat until max_tokens. A
# schema's own "x-guidance" settings still win.
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ",
                              "key_separator": ": "}

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar for output that is one JSON value matching `schema`, with every
    object that lists its properties closed to others unless the schema says otherwise
    (`close_objects`), as other servers' strict grammar modes generate."""
    return llguidance.LLMatcher.grammar_from_json_schema(close_objects(schema),  # type: ignore[arg-type]
                                                          defaults=JSON_STYLE)


def lark_grammar(lark: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(lark)


def grammar_problem(grammar: str) -> str | None:
    """Why llguidance cannot compile a grammar (without a tokenizer), or None."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error and messages else None


def schema_problem(schema: Any) -> str | None:
    """Why a JSON schema cannot be used for constrained output, or None when it can."""
    if not isinstance(schema, dict):
        return "a JSON schema must be a JSON object"
    try:
        grammar = json_schema_grammar(schema)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return grammar_problem(grammar)


_SCHEMA_KEYS = ("items", "additionalItems", "not", "if", "then", "else", "contains",
                "propertyNames", "unevaluatedItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def close_objects(schema: Any) -> Any:
    """The schema with every object that lists `properties` but says nothing about others
    closed to them ("additionalProperties": false).

    Every schema flock generates under is one the model should write, not what a validator
    should tolerate: tool arguments (as OpenAI's strict mode requires), response formats and
    Ollama's `format` (llama.cpp's converter, behind Ollama, closes objects the same way).
    Without it a model keeps inventing properties (a schema's "description" copied as a key)
    until max_tokens.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(s) for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(s) for name, s in out[key].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = close_objects(out["additionalProperties"])
    elif isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


# --- forced tool calls --------------------------------------------------------------------


def _styled(schema: dict[str, Any]) -> dict[str, Any]:
    # Inline %json schemas do not take compile options; they read them from "x-guidance".
    return {"x-guidance": JSON_STYLE, **schema}


def call_schema(tools: Sequence[ToolSpec], arguments_key: str = "arguments") -> dict[str, Any]:
    """One call to any of `tools`: {"name": <const>, "<arguments_key>": <its parameters>}."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name},
                           arguments_key: close_objects(t.parameters)},
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _inline(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps(_styled(schema), ensure_ascii=False)


def _lark_string(text: str) -> str:
    return json.dumps(text)  # Lark string literals take JSON-style escapes


def forced_call_grammar(fmt: ToolFormat, tools: Sequence[ToolSpec], choice: ToolChoice) -> str:
    """A Lark grammar whose every sentence is a call to the chosen tool(s), written the way the
    model's family writes calls, so it always parses.

    A forced reply holds one call, or with `choice.parallel` at most one per offered tool: the
    grammar cannot tell when a model is done, and small models repeat calls until max_tokens.
    """
    chosen = [t for t in tools if choice.mode != "named" or t.name == choice.name]
    if not chosen:
        raise ValueError(f"no tool named {choice.name!r} is offered")
    most = len(chosen) if choice.parallel else 1
    if fmt == "llama3":
        # Llama 3's JSON calls come one per turn.
        return f"start: call\ncall: {_inline(call_schema(chosen, 'parameters'))}\n"
    if fmt == "mistral":
        array = {"type": "array", "items": call_schema(chosen), "minItems": 1, "maxItems": most}
        return f"start: {_lark_string(MISTRAL_MARKER)} calls\ncalls: {_inline(array)}\n"
    if fmt in ("deepseek_v3", "deepseek_v31"):
        return _deepseek_grammar(chosen, most, fenced=fmt == "deepseek_v3")
    if fmt == "minimax":
        return _minimax_grammar(chosen, most)
    if fmt == "harmony":
        # One call per turn: generation ends at the call (gpt-oss's <|call|> stop token).
        return "start: " + " | ".join(
            f"{_lark_string('<|channel|>commentary to=functions.' + t.name)} "
            f"{_lark_string(' <|constrain|>json<|message|>')} "
            f"{_inline(close_objects(t.parameters))}" for t in chosen) + "\n"
    # Hermes, flock's default and GLM 4.5 (whose parser takes Hermes' JSON body too).
    more = f' ("\\n" call){{0,{most - 1}}}' if most > 1 else ""
    return (f"start: call{more}\n"
            f"call: {_lark_string(CALL_OPEN + chr(10))} body {_lark_string(chr(10) + CALL_CLOSE)}\n"
            f"body: {_inline(call_schema(chosen))}\n")


def _deepseek_grammar(tools: Sequence[ToolSpec], most: int, fenced: bool) -> str:
    lines = [f"start: {_lark_string(DS_CALLS_BEGIN)} call{{1,{most}}} "
             f"{_lark_string(DS_CALLS_END)}",
             "call: " + " | ".join(f"call{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        if fenced:
            head, tail = f"function{DS_SEP}{tool.name}\n```json\n", "\n```"
        else:
            head, tail = f"{tool.name}{DS_SEP}", ""
        lines.append(f"call{i}: {_lark_string(DS_CALL_BEGIN + head)} "
                     f"{_inline(close_objects(tool.parameters))} "
                     f"{_lark_string(tail + DS_CALL_END)}")
    return "\n".join(lines) + "\n"


def _bare_value(schema: Any) -> str:
    """A MiniMax argument value: bare text for strings (an enum's words, or text up to the
    schema's maxLength), JSON for anything else."""
    if isinstance(schema, dict):
        enum = schema.get("enum")
        if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
            return "(" + " | ".join(_lark_string(v) for v in enum) + ")"
        if schema.get("type") == "string":
            most = schema.get("maxLength")
            return f"/[^<]{{0,{int(most)}}}/" if isinstance(most, int) else "/[^<]*/"
        if schema:
            return _inline(close_objects(schema))
    return "/[^<]*/"


def _minimax_grammar(tools: Sequence[ToolSpec], most: int) -> str:
    """MiniMax's XML-ish calls: parameter names from the schema, each value as it types it."""
    lines = [f"start: {_lark_string(MINIMAX_OPEN + chr(10))} invoke{{1,{most}}} "
             f"{_lark_string(MINIMAX_CLOSE)}",
             "invoke: " + " | ".join(f"invoke{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        # Each parameter at most once, in the schema's order; the required ones always.
        properties = tool.parameters.get("properties") or {}
        required = set(tool.parameters.get("required") or ())
        close = _lark_string("</parameter>\n")
        params = ""
        for k, (key, schema) in enumerate(properties.items()):
            rule = f"p{i}_{k}"
            lines.append(f"{rule}: " + _lark_string('<parameter name="' + key + '">')
                         + f" {_bare_value(schema)} {close}")
            params += f" {rule}" + ("" if key in required else "?")
        head = _lark_string(f'<invoke name="{tool.name}">\n')
        lines.append(f"invoke{i}: {head}{params} {_lark_string('</invoke>' + chr(10))}")
    return "\n".join(lines) + "\n"
