"""Helpers for tests that drive a `Scheduler` directly: run it dry, read its events."""

from __future__ import annotations

from agent.generation import Failed, Finished, GenerationEvent, TokenChunk
from agent.runtime.scheduler import Scheduler


def run_all(sched: Scheduler, limit: int = 2000) -> None:
    """Step until nothing runs or waits (bounded: a scheduler that never finishes fails)."""
    for _ in range(limit):
        if sched.idle:
            return
        sched.step()
    raise AssertionError("scheduler did not finish")


def tokens_of(events: list[GenerationEvent], rid: str) -> list[int]:
    return [t for e in events if isinstance(e, TokenChunk) and e.id == rid for t in e.token_ids]


def ending(events: list[GenerationEvent], rid: str) -> Finished | Failed:
    """The one event that ended request `rid`."""
    ends = [e for e in events if isinstance(e, Finished | Failed) and e.id == rid]
    assert len(ends) == 1, ends
    return ends[0]


def finished(events: list[GenerationEvent], rid: str) -> Finished:
    """The Finished event of request `rid`, which must have run to its end."""
    end = ending(events, rid)
    assert isinstance(end, Finished), end
    return end
