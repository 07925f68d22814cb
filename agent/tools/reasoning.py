"""Reasoning text: which models write it, and taking it out of their answer as it streams.

Qwen3, DeepSeek-R1, GLM 4.5 and MiniMax write their reasoning inside `<think>...</think>` before
the answer; some templates open the block in the prompt itself (the generation prompt ends with
`<think>`), so the output starts inside it and only the closing tag appears. gpt-oss writes
harmony channels instead (`agent.tools.harmony`). The format is read from the chat template,
never guessed from the output, as for tool calls.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.tools.formats import template_text

ReasoningFormat = Literal["none", "think", "harmony"]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
HARMONY_MESSAGE = "<|message|>"

_GENERATION_PROMPT = re.compile(r"add_generation_prompt")


@dataclass(frozen=True)
class Thought:
    """Reasoning text the model wrote, kept apart from its answer."""

    text: str


@dataclass(frozen=True)
class ReasoningStyle:
    """How a model writes its reasoning: the format, and whether the prompt opens it."""

    fmt: ReasoningFormat = "none"
    opened: bool = False  # the generation prompt ends inside a `<think>` block


NO_REASONING = ReasoningStyle()


def detect_reasoning(template: str | Sequence[Mapping[str, str]] | Mapping[str, str] | None,
                     ) -> ReasoningStyle:
    text = template_text(template)
    if not text:
        return NO_REASONING
    if "<|channel|>" in text and HARMONY_MESSAGE in text:
        return ReasoningStyle("harmony")
    if THINK_CLOSE not in text:
        return NO_REASONING
    # The generation prompt is what follows the template's last test of add_generation_prompt;
    # a `<think>` it writes without closing (DeepSeek-R1, Qwen3 thinking-2507) leaves the output
    # inside the block. Qwen3's `<think>\n\n</think>` for enable_thinking=false closes it.
    marks = list(_GENERATION_PROMPT.finditer(text))
    tail = text[marks[-1].end():] if marks else ""
    return ReasoningStyle("think", opened=tail.count(THINK_OPEN) > tail.count(THINK_CLOSE))


def partial_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of `text` that could begin one of `markers`."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-size:]):
                best = size
                break
    return best


class ThinkSplitter:
    """Splits `<think>` output into `Thought`s and answer text as it streams: tags that span
    chunks are held back until decided, whitespace at the edges of the reasoning and between
    it and the answer is dropped."""

    def __init__(self, opened: bool = False) -> None:
        # "start": undecided whether the output opens a block; "think": inside; "answer": after.
        self._state = "think" if opened else "start"
        self._buf = ""
        self._fresh = True  # no reasoning text emitted yet (its leading whitespace is dropped)
        self._held = ""  # reasoning whitespace that may be the block's trailing whitespace
        self._after = False  # just closed: drop whitespace before the answer

    def feed(self, text: str) -> list[str | Thought]:
        self._buf += text
        out: list[str | Thought] = []
        while True:
            if self._state == "start":
                head = self._buf.lstrip()
                if not head or (THINK_OPEN.startswith(head) and head != THINK_OPEN):
                    return out  # undecided
                if head.startswith(THINK_OPEN):
                    self._buf = head[len(THINK_OPEN):]
                    self._state = "think"
                else:
                    self._state = "answer"
            if self._state == "think":
                at = self._buf.find(THINK_CLOSE)
                if at < 0:
                    keep = partial_suffix(self._buf, (THINK_CLOSE,))
                    self._thought(self._buf[: len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                self._thought(self._buf[:at], out)
                self._buf = self._buf[at + len(THINK_CLOSE):]
                self._held = ""
                self._state, self._after = "answer", True
            if self._state == "answer":
                if self._after:
                    self._buf = self._buf.lstrip()
                    if not self._buf:
                        return out
                    self._after = False
                if self._buf:
                    out.append(self._buf)
                self._buf = ""
                return out

    def finish(self) -> list[str | Thought]:
        out: list[str | Thought] = []
        if self._state == "think":
            self._thought(self._buf, out)  # cut short inside the block: it is all reasoning
        elif self._buf.strip() if self._state == "start" else (self._buf and not self._after):
            out.append(self._buf)
        self._buf = ""
        return out

    def _thought(self, text: str, out: list[str | Thought]) -> None:
        if self._fresh:
            text = text.lstrip()
            if not text:
                return
            self._fresh = False
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        if body:
            out.append(Thought(body))
