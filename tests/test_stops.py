"""Stop strings over streamed text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.runtime.stops import StopMatcher


def run(pieces: list[str], stops: list[str]) -> tuple[str, str | None]:
    matcher = StopMatcher(stops)
    out = ""
    for piece in pieces:
        text, stop = matcher.feed(piece)
        out += text
        if stop is not None:
            return out, stop
    return out + matcher.flush(), None


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    assert run(["The cap", "ital is Pa", "ris."], ["Paris"]) == ("The capital is ", "Paris")


def test_partial_match_that_fails_is_released() -> None:
    assert run(["Par", "t of it"], ["Paris"]) == ("Part of it", None)


def test_earliest_of_several_stops_wins() -> None:
    assert run(["a END b STOP"], ["STOP", "END"]) == ("a ", "END")


def test_held_text_is_flushed_at_the_end() -> None:
    assert run(["hello Pa"], ["Paris"]) == ("hello Pa", None)


@given(st.text(alphabet="abcP", max_size=30), st.lists(st.integers(1, 5), max_size=10))
def test_streamed_output_equals_cutting_the_whole_text(text: str, cuts: list[int]) -> None:
    stop = "Pab"
    pieces, at = [], 0
    for size in cuts:
        pieces.append(text[at:at + size])
        at += size
    pieces.append(text[at:])
    expected = (text[: text.find(stop)], stop) if stop in text else (text, None)
    assert run(pieces, [stop]) == expected
