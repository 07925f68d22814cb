"""Progress of long CLI work (`flock pull`, `flock import`): a bar with bytes, rate and ETA,
redrawn in place on a terminal; plain lines (at most one a second, and the last) when the
output is piped or logged.

`Progress.status(text)` reports a step ("downloading ...", "importing ..."); `Progress.bytes(
done, total)` reports bytes of the current step. Both are cheap: the bar is redrawn at most ten
times a second.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 28


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_eta(seconds: float | None) -> str:
    if seconds is None or seconds < 0 or seconds > 360000:
        return "--:--"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render_bar(label: str, done: int, total: int | None, rate: float, width: int = 100) -> str:
    """One line: label, [####....] percent, bytes of total, rate, ETA (pure: tested as is)."""
    if total:
        share = min(1.0, done / total)
        filled = int(share * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        eta = (total - done) / rate if rate > 0 else None
        line = (f"{label} [{bar}] {share * 100:3.0f}% {human_bytes(done)}/{human_bytes(total)} "
                f"{human_bytes(rate)}/s ETA {human_eta(eta)}")
    else:
        line = f"{label} {human_bytes(done)} {human_bytes(rate)}/s"
    return line[:width]


class Progress:
    def __init__(self, out: TextIO | None = None, *, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.clock = clock
        self.label = ""
        self._lock = threading.Lock()
        self._start = clock()
        self._last_draw = 0.0
        self._last_line = 0.0
        self._drawn = False  # a bar is on the current terminal line
        self._last: tuple[int, int | None] = (0, None)

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
        return max(40, columns - 1) if columns > 0 else 100  # a new pty may say 0

    def status(self, text: str) -> None:
        """A new step: its line is printed and the byte count starts again."""
        with self._lock:
            self._end_bar()
            self.out.write(text + "\n")
            self.out.flush()
            self.label = text.split(" ")[0] if text else ""
            self._start = self.clock()
            self._last = (0, None)

    def bytes(self, done: int, total: int | None) -> None:
        with self._lock:
            now = self.clock()
            self._last = (done, total)
            finished = total is not None and done >= total
            elapsed = max(now - self._start, 1e-6)
            rate = done / elapsed
            if self.tty:
                if finished or now - self._last_draw >= 0.1:
                    line = render_bar(self.label, done, total, rate, self._width())
                    self.out.write("\r" + line + "\x1b[K")
                    self.out.flush()
                    self._drawn = True
                    self._last_draw = now
            elif finished or now - self._last_line >= 1.0:
                share = f" ({done / total * 100:.0f}%)" if total else ""
                self.out.write(f"{self.label}: {human_bytes(done)}"
                               + (f" of {human_bytes(total)}" if total else "")
                               + f"{share}, {human_bytes(rate)}/s\n")
                self.out.flush()
                self._last_line = now

    def _end_bar(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self._drawn = False

    def close(self) -> None:
        with self._lock:
            self._end_bar()
            self.out.flush()


def read_bytes_counter() -> Callable[[], int | None]:
    """Bytes this process has read so far (Linux /proc/self/io rchar), to show progress of work
    that reports none itself (a GGUF import reads its file twice: hash, then convert)."""
    def read() -> int | None:
        try:
            with open("/proc/self/io") as f:
                for line in f:
                    if line.startswith("rchar:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    return read


def watch_reads(progress: Progress, total: int, stop: threading.Event,
                interval: float = 0.2) -> threading.Thread:
    """A thread reporting this process's reads against `total` until `stop` is set (never past
    99%: the work says when it is done)."""
    counter = read_bytes_counter()
    first = counter()

    def run() -> None:
        while not stop.wait(interval):
            now = counter()
            if now is None or first is None:
                continue
            progress.bytes(min(now - first, total * 99 // 100), total)

    thread = threading.Thread(target=run, daemon=True, name="flock-progress")
    thread.start()
    return thread
