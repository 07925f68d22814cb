"""A model's output split into what each API returns apart: reasoning (`Thought`), answer text
and tool calls, whole or as it streams.

Reasoning comes first (`<think>` blocks, or harmony's analysis channel); the answer text after
it goes through the tool-call parser of the model's format when the request offers tools.
Harmony output is split by `agent.tools.harmony` alone, since its channels carry the calls too.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from agent.tools.harmony import HarmonyStream
from agent.tools.parsers import ParsedOutput, ToolCallStream, within_limit
from agent.tools.reasoning import ReasoningStyle, ThinkSplitter, Thought
from agent.tools.types import ToolCall, ToolFormat

Piece = str | ToolCall | Thought


class OutputStream:
    """Output text in, pieces out; held-back text is decided by `finish()`."""

    def __init__(self, reasoning: ReasoningStyle, tools: ToolFormat | None,
                 names: Collection[str] | None = None, max_calls: int | None = None,
                 schemas: Mapping[str, dict[str, Any]] | None = None) -> None:
        self._harmony: HarmonyStream | None = None
        self._think: ThinkSplitter | None = None
        self._calls: ToolCallStream | None = None
        self._max_calls = max_calls
        self._called = 0
        if reasoning.fmt == "harmony" or tools == "harmony":
            self._harmony = HarmonyStream(names, parse_calls=tools is not None)
            return
        if reasoning.fmt == "think":
            self._think = ThinkSplitter(reasoning.opened)
        if tools is not None:
            self._calls = ToolCallStream(tools, names, max_calls, schemas)

    def feed(self, text: str) -> list[Piece]:
        if self._harmony is not None:
            return self._limit(self._harmony.feed(text))
        pieces: list[Piece] = self._think.feed(text) if self._think is not None else [text]
        return self._answer(pieces)

    def finish(self) -> list[Piece]:
        if self._harmony is not None:
            return self._limit(self._harmony.finish())
        pieces: list[Piece] = self._think.finish() if self._think is not None else []
        out = self._answer(pieces)
        if self._calls is not None:
            out += self._calls.finish()
        return _merged(out)

    def _answer(self, pieces: list[Piece]) -> list[Piece]:
        """Answer text through the call parser; thoughts as they are."""
        if self._calls is None:
            return _merged([p for p in pieces if p != ""])
        out: list[Piece] = []
        for piece in pieces:
            out += self._calls.feed(piece) if isinstance(piece, str) else [piece]
        return _merged(out)

    def _limit(self, pieces: list[Piece]) -> list[Piece]:
        """Harmony's calls beyond `max_calls` are dropped, as the other parsers do."""
        kept, self._called = within_limit(pieces, self._called, self._max_calls)
        return _merged(kept)


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Neighbouring texts (and neighbouring thoughts) joined; empty texts dropped."""
    out: list[Piece] = []
    for piece in pieces:
        if piece == "":
            continue
        last = out[-1] if out else None
        if isinstance(piece, str) and isinstance(last, str):
            out[-1] = last + piece
        elif isinstance(piece, Thought) and isinstance(last, Thought):
            out[-1] = Thought(last.text + piece.text)
        else:
            out.append(piece)
    return out


def split_output(stream: OutputStream, text: str) -> ParsedOutput:
    """A whole output through `stream` (a fresh one): the same pieces a stream would give."""
    pieces = _merged(stream.feed(text) + stream.finish())
    return ParsedOutput(
        text="".join(p for p in pieces if isinstance(p, str)),
        calls=[p for p in pieces if isinstance(p, ToolCall)],
        pieces=[p for p in pieces if not isinstance(p, Thought)],
        reasoning="".join(p.text for p in pieces if isinstance(p, Thought)),
    )
