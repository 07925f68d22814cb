"""Shard transfers in flight on this node, seen from the files they write: a stage's weights
fetched from a peer land in `<models>/.shards/<model>/.<layers>.part-<pid>/` until installed
(`agent.models.shards.fetch_shard`), so their size is the transfer's progress.

Read by the dashboard (each node's live figures), `flock status`, and `log_transfers`, which
logs every transfer's progress while the agent runs (`flock run`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("flock.shards")
LOG_EVERY_S = 2.0


def in_flight(models_dir: Path) -> list[dict[str, Any]]:
    """[{model, layers, bytes, started}] of every transfer being written now."""
    out = []
    root = models_dir / ".shards"
    try:
        models = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    except OSError:
        return out
    for model in models:
        for part in model.glob(".*.part-*"):
            try:
                files = [f for f in part.iterdir() if f.is_file()]
                size = sum(f.stat().st_size for f in files)
                started = part.stat().st_mtime if not files else \
                    min(f.stat().st_ctime for f in files)
            except OSError:
                continue  # installed or removed meanwhile
            name = model.name.rsplit("-", 1)[0]  # "<model>-<hash8>"
            layers = part.name[1:].split(".part-")[0]
            out.append({"model": name, "layers": layers, "bytes": size, "started": started})
    return out


def rate_line(transfer: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    elapsed = max(now - transfer["started"], 1e-3)
    mb = transfer["bytes"] / 1e6
    return (f"fetching {transfer['model']} layers {transfer['layers']} from a peer: "
            f"{mb:.1f} MB, {mb / elapsed:.1f} MB/s")


async def log_transfers(models_dir: Path, interval: float = LOG_EVERY_S) -> None:
    """Log each transfer in flight every `interval` seconds (until cancelled)."""
    while True:
        await asyncio.sleep(interval)
        for transfer in await asyncio.to_thread(in_flight, models_dir):
            log.info("%s", rate_line(transfer))
