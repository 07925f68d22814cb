"""Checks that only mean something on macOS, as pure parsers of the commands' output (tested on
recorded outputs): the GPU wired-memory limit (`sysctl iogpu.wired_limit_mb`) against the
largest model placed here, and the application firewall (`socketfilterfw`).
"""

from __future__ import annotations

import re
import subprocess

from agent.doctor.result import Check, fail, ok, warn

SOCKETFILTERFW = "/usr/libexec/ApplicationFirewall/socketfilterfw"


def parse_wired_limit_mb(output: str) -> int | None:
    """`sysctl iogpu.wired_limit_mb` -> the limit in MiB (0: macOS's default); None when the
    key is missing (older macOS: `debug.iogpu.wired_limit`, or not Apple silicon)."""
    match = re.search(r"wired_limit(?:_mb)?\s*[:=]\s*(\d+)", output)
    return int(match.group(1)) if match else None


def default_wired_limit_bytes(total: int) -> int:
    """What Metal may wire when the sysctl is 0: about 3/4 of memory above 36 GiB, 2/3 below."""
    return total * 3 // 4 if total > 36 * 2**30 else total * 2 // 3


def check_wired_limit(output: str, total: int, largest_model: tuple[str, int] | None) -> Check:
    limit_mb = parse_wired_limit_mb(output)
    if limit_mb is None:
        return ok("gpu wired limit", "no iogpu.wired_limit_mb on this Mac (macOS's default)")
    limit = limit_mb * 2**20 if limit_mb > 0 else default_wired_limit_bytes(total)
    source = f"{limit_mb} MiB" if limit_mb > 0 else f"default, ~{limit / 2**30:.1f} GiB"
    if largest_model is None:
        return ok("gpu wired limit", f"iogpu.wired_limit_mb {source}")
    name, size = largest_model
    if size > limit:
        want = min(total - 4 * 2**30, int(size * 1.2)) // 2**20
        return fail("gpu wired limit",
                    f"{name} needs {size / 2**30:.1f} GiB, the GPU may wire {limit / 2**30:.1f} "
                    f"GiB (iogpu.wired_limit_mb {source})",
                    f"sudo sysctl iogpu.wired_limit_mb={want} (until reboot), or place {name} "
                    "across several nodes")
    return ok("gpu wired limit", f"{limit / 2**30:.1f} GiB may be wired ({source}); "
              f"{name} needs {size / 2**30:.1f} GiB")


def parse_app_firewall(global_state: str, block_all: str = "") -> tuple[bool, bool]:
    """(`socketfilterfw --getglobalstate`, `--getblockall`) -> (enabled, blocking everything
    incoming)."""
    enabled = bool(re.search(r"enabled|State = [12]", global_state, re.I)) and \
        not re.search(r"disabled|State = 0", global_state, re.I)
    blocking = bool(re.search(r"(block all|blockall)[^\n]*enabled|DISABLED! Block all", block_all,
                              re.I)) or bool(re.search(r"State = 2", global_state))
    return enabled, blocking


def check_app_firewall(global_state: str, block_all: str, python: str) -> Check:
    enabled, blocking = parse_app_firewall(global_state, block_all)
    if not enabled:
        return ok("firewall", "macOS application firewall is off")
    if blocking:
        return fail("firewall", "macOS application firewall blocks all incoming connections: "
                    "peers cannot reach this node",
                    f"sudo {SOCKETFILTERFW} --setblockall off; then "
                    f"sudo {SOCKETFILTERFW} --add {python} --unblockapp {python}")
    return warn("firewall", "macOS application firewall is on: incoming connections to Python "
                "may be refused or prompt",
                f"sudo {SOCKETFILTERFW} --add {python} --unblockapp {python}")


def run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10,
                              check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
