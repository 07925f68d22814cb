"""`flock doctor`'s command-line options (apart from agent.doctor.run, so building the CLI's
parser imports nothing heavy)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the node to ask about the cluster (default: this machine's)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    p.add_argument("--deep", action="store_true",
                   help="hash every model file (default: size and mtime)")
    p.add_argument("--state-dir", type=Path, help="node state directory (default ~/.flock)")
    p.add_argument("--models-dir", type=Path, help="model store")
    p.add_argument("--port", type=int, help="the node's API port (default 52415)")
    p.add_argument("--data-port", type=int, help="first port of the data links (default 52500)")
    p.add_argument("--cluster", type=Path, metavar="FILE", help="cluster.toml (for its secret)")
    p.add_argument("--api-key", help="API key for the node (default: FLOCK_DOCTOR_KEY, settings)")
    p.add_argument("--discovery-interface", action="append", metavar="NAME_OR_CIDR",
                   help="interfaces discovery uses (as for flock run)")
