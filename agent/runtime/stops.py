"""Stop strings over streamed text: never emit text that might turn out to be part of a stop.

Text is held back only while it is a prefix of some stop string; once a stop string appears, the
text before it is released and generation ends (the stop string itself is not returned, as in
the OpenAI, Anthropic and Ollama APIs).
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """New text in; (text safe to emit, the stop string found or None) out."""
        if not self.stops:
            return text, None
        combined = self.held + text
        found: tuple[int, str] | None = None
        for stop in self.stops:
            at = combined.find(stop)
            if at >= 0 and (found is None or at < found[0]):
                found = (at, stop)
        if found is not None:
            self.held = ""
            return combined[: found[0]], found[1]
        keep = self._longest_partial(combined)
        self.held = combined[len(combined) - keep:] if keep else ""
        return combined[: len(combined) - keep], None

    def flush(self, text: str = "") -> str:
        """The end of generation: whatever was held (plus final text) is plain text after all."""
        out, stop = self.feed(text)
        if stop is not None:
            return out
        out += self.held
        self.held = ""
        return out

    def _longest_partial(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best
