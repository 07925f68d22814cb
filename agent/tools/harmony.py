"""gpt-oss's harmony output, split as it streams: the analysis channel is reasoning, the final
channel (and commentary addressed to no one, a preamble) is the answer, and a commentary message
addressed `to=functions.NAME` is a tool call whose body is the JSON arguments:

    <|channel|>analysis<|message|>The user asks ...<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json
    <|message|>{"city": "Paris"}<|call|>

`<|return|>` and `<|call|>` end generation (they are the model's stop tokens), so the output
may end without them. Output that starts without a header is plain answer text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection

from agent.tools.reasoning import HARMONY_MESSAGE, Thought, partial_suffix
from agent.tools.types import ToolCall

Piece = str | ToolCall | Thought

START = "<|start|>"
CHANNEL = "<|channel|>"
CONSTRAIN = "<|constrain|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
_BODY_ENDS = (*ENDS, START)
_RECIPIENT = re.compile(r"\bto=functions\.([A-Za-z0-9_.\-]+)")
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([A-Za-z_]+)")


class HarmonyStream:
    """Harmony output in, pieces out: `Thought`s, answer text and (with `parse_calls`) calls."""

    def __init__(self, names: Collection[str] | None = None, parse_calls: bool = True) -> None:
        self.names = names
        self.parse_calls = parse_calls
        self._buf = ""
        self._in_body = False
        self._channel = "final"
        self._recipient: str | None = None
        self._fresh = True  # at the start of a message body (its leading whitespace is dropped)

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        out: list[Piece] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Piece]:
        out: list[Piece] = []
        if self._in_body:
            self._end_body(self._buf, out)
        elif self._buf.strip() and HARMONY_MESSAGE not in self._buf and CHANNEL not in self._buf:
            out.append(self._buf)  # text that never opened a message
        self._buf = ""
        return out

    def _step(self, out: list[Piece]) -> bool:
        if not self._in_body:
            head = self._buf.lstrip()
            if head and not head.startswith("<|") and not "<|".startswith(head):
                # No header: a model writing plain text (or a template without channels).
                self._open("", out)
                return True
            at = self._buf.find(HARMONY_MESSAGE)
            if at < 0:
                return False
            header, self._buf = self._buf[:at], self._buf[at + len(HARMONY_MESSAGE):]
            self._open(header, out)
            return True
        ends = [(self._buf.find(m), m) for m in _BODY_ENDS if m in self._buf]
        if not ends:
            if self._recipient is None:  # reasoning and answers stream; calls wait whole
                keep = partial_suffix(self._buf, _BODY_ENDS)
                self._text(self._buf[: len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep:]
            return False
        at, marker = min(ends)
        body = self._buf[:at]
        self._buf = self._buf[at + (0 if marker == START else len(marker)):]
        self._end_body(body, out)
        return True

    def _open(self, header: str, out: list[Piece]) -> None:
        channel = _CHANNEL_NAME.search(header)
        recipient = _RECIPIENT.search(header)
        self._channel = channel.group(1) if channel else "final"
        self._recipient = recipient.group(1) if recipient else None
        self._in_body, self._fresh = True, True

    def _end_body(self, body: str, out: list[Piece]) -> None:
        if self._recipient is not None:
            call = self._call(self._recipient, body) if self.parse_calls else None
            if call is not None:
                out.append(call)
            elif body.strip():
                out.append(body.strip())
        else:
            self._text(body.rstrip(), out)
        self._in_body = False
        self._recipient = None

    def _text(self, text: str, out: list[Piece]) -> None:
        if self._fresh:
            text = text.lstrip()
            if not text:
                return
            self._fresh = False
        out.append(Thought(text) if self._channel == "analysis" else text)

    def _call(self, name: str, body: str) -> ToolCall | None:
        if self.names is not None and name not in self.names:
            return None
        try:
            arguments = json.loads(body) if body.strip() else {}
        except ValueError:
            return None
        return ToolCall(name=name, arguments=arguments) if isinstance(arguments, dict) else None


def render_harmony_call(name: str, arguments: object) -> str:
    """A call as gpt-oss writes it (for grammars and tests)."""
    return (f"{CHANNEL}commentary to=functions.{name} {CONSTRAIN}json{HARMONY_MESSAGE}"
            f"{json.dumps(arguments, ensure_ascii=False)}<|call|>")
