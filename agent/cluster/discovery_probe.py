"""`python -m agent.cluster.discovery_probe --probe`: discovery and membership alone, printing
peer events as JSON lines; for the network-namespace tests and for debugging a network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import __version__, sysinfo
from agent.cluster.discovery import DEFAULT_GROUP, DEFAULT_PORT, Discovery, DiscoveryConfig
from agent.cluster.identity import load_or_create
from agent.cluster.membership import Membership, PeerTable
from agent.cluster.state import NodeProfile


async def _probe_main(args: argparse.Namespace) -> int:
    identity = load_or_create(args.state_dir)
    name = args.name or socket.gethostname()

    def profile() -> NodeProfile:
        return NodeProfile(
            node_id=identity.node_id, name=name, version=args.version or __version__,
            addresses=[], api_port=args.api_port,
            memory_total_bytes=sysinfo.total_memory_bytes(),
            memory_available_bytes=sysinfo.available_memory_bytes(),
        )

    def emit(event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, "t": round(time.monotonic(), 3), **fields}), flush=True)

    interfaces = tuple(i for i in args.interfaces.split(",") if i)
    config = DiscoveryConfig(
        cluster=args.cluster, secret=args.secret, interfaces=interfaces, port=args.port,
        group=args.group, interval_s=args.interval, multicast=not args.no_multicast,
        broadcast=not args.no_broadcast,
    )
    table = PeerTable(profile(), interval_s=args.interval, suspect_after=args.suspect,
                      dead_after=args.dead)
    membership = Membership(table)
    membership.add_callback(lambda e: emit(e.kind, node_id=e.node_id, name=e.profile.name))
    discovery = Discovery(config, identity, profile, membership.on_sighting,
                          on_incompatible=membership.on_incompatible)
    stop = asyncio.Event()
    await discovery.start()
    emit("ready", node_id=identity.node_id, name=name,
         addresses=[a.address for a in discovery.addresses])
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    runner = loop.create_task(membership.run(stop))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), args.duration)
    stop.set()
    await runner
    await discovery.stop()
    emit("final",
         peers=[{"node_id": v.profile.node_id, "name": v.profile.name, "status": v.status,
                 "rtt_ms": v.rtt_ms} for v in membership.views()[1:]],
         incompatible=[i.node_id for i in membership.incompatible()],
         stats=dict(discovery.stats))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.cluster.discovery_probe",
        description="Run discovery and membership alone and print peer events as JSON lines.",
    )
    parser.add_argument("--probe", action="store_true", required=True)
    parser.add_argument("--cluster", default="flock")
    parser.add_argument("--secret", default=None)
    parser.add_argument("--interfaces", required=True,
                        help="comma-separated names/CIDRs to confine beacons to (required: a "
                             "probe never picks interfaces by itself)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--group", default=DEFAULT_GROUP)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--suspect", type=int, default=3)
    parser.add_argument("--dead", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds, then exit")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("--version", default=None, help="advertise this version instead")
    parser.add_argument("--api-port", type=int, default=52415)
    parser.add_argument("--no-multicast", action="store_true")
    parser.add_argument("--no-broadcast", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return asyncio.run(_probe_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
