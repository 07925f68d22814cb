"""A step watchdog: a collective that never returns becomes a clean process exit.

MLX's ring collectives have open hang reports (ml-explore/mlx #4475, #4276) and a blocked
`all_sum` cannot be interrupted from Python, so a timer thread ends the process instead: the
agent sees the runner exit, fails its requests and re-places the instance.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

STUCK_EXIT_CODE = 4


class Watchdog:
    def __init__(self, seconds: float, on_fire: Callable[[], None] | None = None) -> None:
        self.seconds = seconds
        self.on_fire = on_fire
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        self.disarm()
        self._timer = threading.Timer(self.seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        print(f"flock runner: a step took over {self.seconds:.0f}s; the group is stuck, exiting",
              file=sys.stderr, flush=True)
        try:
            if self.on_fire:
                self.on_fire()
        finally:
            os._exit(STUCK_EXIT_CODE)
