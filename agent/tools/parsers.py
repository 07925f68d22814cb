"""Finding tool calls in model output, per format, whole or while it streams.

`ToolCallStream` takes text as the model produces it and gives back pieces: text that is
certainly not part of a call (emitted at once) and calls once they are complete and valid. Text
that may be the start of a call is held back until that is decided. `parse_output` runs the same
machine over a whole output, so a streamed response and a whole one always agree.

A call is valid when its payload is a JSON object with a string `name` (one of the offered
tools) and an object of arguments; anything else, malformed or cut short, stays text, exactly as
the model wrote it. Whitespace between text and a call belongs to neither and is dropped.
With `max_calls`, valid calls beyond it are dropped (a client that allows one call per turn).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.tools.families import (
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    MINIMAX_CLOSE,
    MINIMAX_OPEN,
    parse_deepseek_calls,
    parse_glm_call,
    parse_minimax_calls,
)
from agent.tools.formats import CALL_CLOSE, CALL_OPEN
from agent.tools.types import ToolCall, ToolFormat

Piece = str | ToolCall

PYTHON_TAG = "<|python_tag|>"
MISTRAL_MARKER = "[TOOL_CALLS]"

_decoder = json.JSONDecoder()

# (opening, closing) marker of a call region, per format; the rest use Hermes' tags.
_MARKERS: dict[str, tuple[str, str]] = {
    "mistral": (MISTRAL_MARKER, ""),
    "deepseek_v3": (DS_CALLS_BEGIN, DS_CALLS_END),
    "deepseek_v31": (DS_CALLS_BEGIN, DS_CALLS_END),
    "minimax": (MINIMAX_OPEN, MINIMAX_CLOSE),
}


@dataclass(frozen=True)
class ParsedOutput:
    text: str  # all the text, calls (and reasoning) taken out
    calls: list[ToolCall]
    pieces: list[Any] = field(default_factory=list)  # text, calls (and Thoughts) in order
    reasoning: str = ""  # the reasoning text (`agent.tools.output`), joined


def within_limit(pieces: list[Any], seen: int, most: int | None) -> tuple[list[Any], int]:
    """`pieces` without the calls beyond the first `most` of the output (`seen` came before),
    and the new count of calls seen."""
    kept = []
    for piece in pieces:
        if isinstance(piece, ToolCall):
            seen += 1
            if most is not None and seen > most:
                continue
        kept.append(piece)
    return kept, seen


def call_from_payload(payload: Any, names: Collection[str] | None,
                      arguments_keys: tuple[str, ...] = ("arguments", "parameters"),
                      ) -> ToolCall | None:
    """A call from a decoded `{"name": ..., "arguments": {...}}` object, or None."""
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None
    name = payload["name"]
    if names is not None and name not in names:
        return None
    present = [k for k in arguments_keys if k in payload]
    arguments: Any = payload[present[0]] if present else {}
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=name, arguments=arguments)


def _json_values(text: str, separators: str = "") -> list[Any] | None:
    """Every JSON value in `text`, one after another (whitespace and `separators` between
    them); None if anything else is there."""
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] in separators):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = _decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could begin `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class ToolCallStream:
    """Incremental tool-call detection for one output (see the module docstring)."""

    def __init__(self, fmt: ToolFormat, names: Collection[str] | None = None,
                 max_calls: int | None = None,
                 schemas: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.fmt = fmt
        self.names = names
        self.schemas = schemas  # tool name -> its parameters (types bare-text arguments)
        self.max_calls = max_calls
        self._calls = 0
        self._buf = ""
        self._held_ws = ""  # whitespace that may turn out to sit next to a call
        self._after_call = False  # drop whitespace that follows a call
        self._in_call = False
        self._out: list[Piece] = []
        # llama3 only: None until the output's first characters decide text or JSON call.
        self._json_output: bool | None = None

    # ---- public -------------------------------------------------------------------------
    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        if self.fmt == "llama3":
            self._feed_llama3()
        else:
            self._feed_marked()
        return self._take()

    def finish(self) -> list[Piece]:
        if self.fmt == "llama3":
            self._finish_llama3()
        else:
            self._finish_marked()
        if self._held_ws and not self._after_call:
            self._out.append(self._held_ws)
        self._held_ws = ""
        return self._take()

    # ---- text with whitespace held at its edges -------------------------------------------
    def _take(self) -> list[Piece]:
        out, self._out = self._out, []
        merged: list[Piece] = []
        kept, self._calls = within_limit(out, self._calls, self.max_calls)
        for piece in kept:
            if isinstance(piece, str) and merged and isinstance(merged[-1], str):
                merged[-1] += piece
            elif piece != "":
                merged.append(piece)
        return merged

    def _text(self, segment: str) -> None:
        if self._after_call:
            segment = segment.lstrip()
            if not segment:
                return
            self._after_call = False
        text = self._held_ws + segment
        body = text.rstrip()
        self._held_ws = text[len(body):]
        if body:
            self._out.append(body)

    def _call(self, call: ToolCall | list[ToolCall] | None, raw: str) -> None:
        """A call region ended: its calls (whitespace around them dropped) or text as written."""
        if call:
            self._out.extend(call if isinstance(call, list) else [call])
            self._held_ws = ""
            self._after_call = True
        else:
            self._out.append(self._held_ws + raw)
            self._held_ws = ""
            self._after_call = False

    # ---- marked formats: hermes, default, mistral, glm45, deepseek, minimax -----------------
    @property
    def _marker(self) -> str:
        return _MARKERS.get(self.fmt, (CALL_OPEN, CALL_CLOSE))[0]

    @property
    def _close(self) -> str:
        return _MARKERS.get(self.fmt, (CALL_OPEN, CALL_CLOSE))[1]

    def _region_calls(self, body: str) -> ToolCall | list[ToolCall] | None:
        if self.fmt in ("deepseek_v3", "deepseek_v31"):
            return parse_deepseek_calls(body, self.names)
        if self.fmt == "minimax":
            return parse_minimax_calls(body, self.names, self.schemas)
        if self.fmt == "glm45" and not body.lstrip().startswith("{"):
            return parse_glm_call(body, self.names, self.schemas)
        return self._hermes_call(body)  # GLM's forced calls are Hermes-style JSON

    def _feed_marked(self) -> None:
        marker, close = self._marker, self._close
        while True:
            if not self._in_call:
                at = self._buf.find(marker)
                if at < 0:
                    keep = _partial_marker(self._buf, marker)
                    self._text(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    return
                self._text(self._buf[:at])
                self._buf = self._buf[at + len(marker):]
                self._in_call = True
            if self.fmt == "mistral":
                return  # the calls run to the end of the output
            end = self._buf.find(close)
            if end < 0:
                return
            body, self._buf = self._buf[:end], self._buf[end + len(close):]
            self._in_call = False
            self._call(self._region_calls(body), marker + body + close)

    def _finish_marked(self) -> None:
        if not self._in_call:
            self._text(self._buf)
        elif self.fmt == "mistral":
            calls = parse_mistral_calls(self._buf, self.names)
            if calls is None:
                self._call(None, MISTRAL_MARKER + self._buf)
            for call in calls or ():
                self._call(call, "")
        else:
            # An unclosed call (the model stopped right after it) still counts if whole.
            self._call(self._region_calls(self._buf), self._marker + self._buf)
        self._buf = ""
        self._in_call = False

    def _hermes_call(self, body: str) -> ToolCall | None:
        try:
            payload = json.loads(body)
        except ValueError:
            return None
        return call_from_payload(payload, self.names)

    # ---- llama3: the whole output is the call -------------------------------------------
    def _feed_llama3(self) -> None:
        if self._json_output is None:
            start = self._buf.lstrip()
            if not start or (PYTHON_TAG.startswith(start) and start != PYTHON_TAG):
                return  # undecided
            self._json_output = start.startswith(("{", PYTHON_TAG))
        if not self._json_output:
            self._out.append(self._buf)
            self._buf = ""

    def _finish_llama3(self) -> None:
        text, self._buf = self._buf, ""
        if not text:
            return
        calls = parse_llama3_calls(text, self.names) if self._json_output is not False else None
        if calls is None:
            self._out.append(text)
            return
        for call in calls:
            self._out.append(call)
        self._after_call = True


def parse_llama3_calls(text: str, names: Collection[str] | None) -> list[ToolCall] | None:
    """Calls from an output that is one or more `{"name": ..., "parameters": ...}` objects
    (separated by `;` when several), optionally after `<|python_tag|>`."""
    body = text.strip().removeprefix(PYTHON_TAG)
    values = _json_values(body, separators=";")
    if not values:
        return None
    calls = [call_from_payload(v, names, ("parameters", "arguments")) for v in values]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


_MISTRAL_CALL = re.compile(r"\s*([A-Za-z0-9_.\-]+)(?:\[CALL_ID\]([A-Za-z0-9]+))?\[ARGS\]")


def parse_mistral_calls(text: str, names: Collection[str] | None) -> list[ToolCall] | None:
    """Calls after `[TOOL_CALLS]`: a JSON list (or object) of `{"name", "arguments"}`, or the
    newer `name[ARGS]{...}` form, repeated (each after its own `[TOOL_CALLS]`)."""
    values = _json_values(text)
    if values:
        payloads = [p for v in values for p in (v if isinstance(v, list) else [v])]
        calls = [call_from_payload(p, names) for p in payloads]
        if payloads and all(c is not None for c in calls):
            return calls  # type: ignore[return-value]
        return None
    calls_out: list[ToolCall] = []
    for part in text.split(MISTRAL_MARKER):
        if not part.strip():
            continue
        match = _MISTRAL_CALL.match(part)
        if match is None:
            return None
        rest = part[match.end():]
        parsed = _json_values(rest)
        if not parsed or len(parsed) != 1:
            return None
        call = call_from_payload({"name": match.group(1), "arguments": parsed[0]}, names)
        if call is None:
            return None
        calls_out.append(call)
    return calls_out or None


def parse_output(fmt: ToolFormat, text: str, names: Collection[str] | None = None,
                 max_calls: int | None = None,
                 schemas: Mapping[str, dict[str, Any]] | None = None) -> ParsedOutput:
    """The calls in a whole output and the text around them."""
    stream = ToolCallStream(fmt, names, max_calls, schemas)
    pieces = stream.feed(text) + stream.finish()
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    return ParsedOutput(
        text="".join(p for p in merged if isinstance(p, str)),
        calls=[p for p in merged if isinstance(p, ToolCall)],
        pieces=merged,
    )
