"""Watching cluster.toml: editing the file is a deploy.

A valid edit is handed to `deploy` (the controller proposes it, or sends it to the leader); an
invalid one changes nothing and is reported (`errors`, shown in `/cluster`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from agent.spec import ClusterSpec, parse_spec

log = logging.getLogger("flock.cluster")


class SpecFileWatch:
    def __init__(self, local_spec: ClusterSpec | None, deploy: Callable[[str], None]) -> None:
        self.local_spec = local_spec  # the file's last valid content
        self.errors: list[str] = []
        self.deploy = deploy

    async def watch(self, path: Path, stop: asyncio.Event) -> None:
        last = None
        while not stop.is_set():
            with contextlib.suppress(OSError):
                stat = path.stat()
                mark = (stat.st_mtime_ns, stat.st_size)
                if mark != last:
                    last = mark
                    self.reload(path)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    def reload(self, path: Path) -> None:
        text = path.read_text()
        spec, errors = parse_spec(text)
        if spec is None:
            self.errors = [str(e) for e in errors]
            log.error("%s is invalid; nothing changes: %s", path, "; ".join(self.errors))
            return
        self.errors = []
        self.local_spec = spec
        self.deploy(text)
