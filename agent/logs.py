"""Logging for agent and runners: readable text or JSON lines, to stderr and a rotating file.

Under systemd stderr goes to the journal; under launchd to the plist's StandardErrorPath; the
rotating file in `<state_dir>/logs` is the same stream kept on disk with a bounded size, so a node
that runs for months never fills its disk with logs.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]

LOG_FILE = "flock.log"
MAX_BYTES = 10 * 1024 * 1024
BACKUP_COUNT = 5
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# Libraries that log every request or connection at INFO; at that level they drown the agent.
_NOISY_LOGGERS = ("httpx", "httpcore", "uvicorn.access")

# Attributes every LogRecord has; anything else on a record came from `extra=` and is data.
_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, fields given with `extra=`, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd object in `extra=` must not cost us the log line.
        return json.dumps(entry, ensure_ascii=False, default=str)


class _FlockHandler:
    """Marks the handlers setup_logging installs, so calling it again replaces only those."""


class _StreamHandler(logging.StreamHandler, _FlockHandler):  # type: ignore[type-arg]
    pass


class _FileHandler(logging.handlers.RotatingFileHandler, _FlockHandler):
    pass


def setup_logging(
    level: str | int = "info",
    fmt: LogFormat = "text",
    logs_dir: Path | None = None,
    *,
    file_name: str = LOG_FILE,
    console: bool = True,
    stream: TextIO | None = None,
    max_bytes: int = MAX_BYTES,
    backup_count: int = BACKUP_COUNT,
) -> Path | None:
    """Configure the root logger; returns the log file path (None without a logs dir).

    Each process needs its own `file_name` (runners: e.g. "runner-<model>.log"): rotation by
    several processes writing one file loses lines. `console=False` leaves stderr out, for
    service managers that keep stderr in a file nobody rotates (launchd). Calling again
    replaces what an earlier call installed and leaves handlers that others added (pytest's
    capture, for one) alone.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _FlockHandler)]:
        root.removeHandler(handler)
        handler.close()

    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    elif fmt == "text":
        formatter = logging.Formatter(TEXT_FORMAT)
    else:
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")

    if console:
        stderr_handler = _StreamHandler(stream if stream is not None else sys.stderr)
        stderr_handler.setFormatter(formatter)
        root.addHandler(stderr_handler)

    path: Path | None = None
    if logs_dir is not None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        path = logs_dir / file_name
        file_handler = _FileHandler(
            path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
        )
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)

    root.setLevel(level.upper() if isinstance(level, str) else level)
    quiet = logging.WARNING if root.level > logging.DEBUG else logging.NOTSET
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    return path


def _utc_iso(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"
