"""A reading taken at most once per age, however often it is asked for."""

from __future__ import annotations

from agent.sampled import Sampled
from tests.test_membership import ManualClock


def test_a_reading_is_reused_until_it_is_too_old_or_invalidated() -> None:
    reads: list[int] = []
    clock = ManualClock()
    clock.now = 100.0

    def read() -> int:
        reads.append(len(reads))
        return len(reads)

    sampled = Sampled(read, max_age_s=1.0, clock=clock)
    assert [sampled.get() for _ in range(50)] == [1] * 50
    clock.now += 0.99
    assert sampled.get() == 1
    clock.now += 0.02
    assert sampled.get() == 2
    sampled.invalidate()
    assert sampled.get() == 3
    clock.now -= 5  # a clock that went back reads again rather than trusting the old value
    assert sampled.get() == 4
    assert len(reads) == 4
