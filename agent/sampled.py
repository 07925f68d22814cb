"""A reading taken at most once every `max_age_s`, however often it is asked for.

The control plane asks for this node's own facts (the models its store holds, the memory free
now) many times a second: every view of the cluster includes this node's profile. Reading them
means listing the store and reading each manifest, and on macOS running `vm_stat`, so the
profile reads them through a `Sampled`: an idle agent then costs next to nothing, and a change
shows within `max_age_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Sampled(Generic[T]):
    def __init__(self, read: Callable[[], T], max_age_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self.max_age_s = max_age_s
        self._clock = clock
        self._value: T | None = None
        self._read_at: float | None = None

    def get(self) -> T:
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self.max_age_s or now < self._read_at:
            self._value = self._read()
            self._read_at = now
        return self._value  # type: ignore[return-value]

    def invalidate(self) -> None:
        """The next `get` reads again (the caller knows the fact changed)."""
        self._read_at = None
