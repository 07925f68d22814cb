"""Checks of this node's peers: each reachable on its API and data ports, its clock close to
ours (signatures carry time and are refused outside the replay window), and holding the same
cluster secret (configured, or derived from the first API key).

`probe_peer` makes one signed `GET /cluster/profile`, as members do, and times it; the checks
are pure functions of what it found.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import httpx

from agent.cluster.auth import HEADER_SIGNATURE, HEADER_TIME, parse_timestamp
from agent.cluster.peers import PROFILE_PATH, base_url, signed_headers, verify_response
from agent.doctor.result import Check, fail, ok, warn


@dataclass(frozen=True)
class PeerFact:
    name: str
    address: str
    api_port: int
    data_port: int
    status: int | None = None  # HTTP status of the signed profile request; None: unreachable
    error: str = ""
    skew_s: float | None = None  # peer's clock minus ours
    answer_trusted: bool = True  # its answer's signature checked out (or no secret)
    data_reachable: bool | None = None  # TCP to its data port: connected or refused (True)


def probe_peer(name: str, address: str, api_port: int, data_port: int, secret: str | None,
               *, node_id: str = "flock-doctor", timeout: float = 2.0) -> PeerFact:
    base = base_url(address, api_port)
    headers = signed_headers(secret, node_id, "GET", PROFILE_PATH, b"")
    started = time.time()
    try:
        response = httpx.get(base + PROFILE_PATH, headers=headers, timeout=timeout,
                             trust_env=False)
    except httpx.HTTPError as exc:
        return PeerFact(name, address, api_port, data_port, error=f"{type(exc).__name__}: {exc}",
                        data_reachable=data_port_answers(address, data_port, timeout))
    ended = time.time()
    peer_time = parse_timestamp(response.headers.get(HEADER_TIME))
    skew = None if peer_time is None else peer_time - (started + ended) / 2
    trusted = True
    if secret and response.status_code == 200:
        # Any age: skew is judged on its own, by check_clock.
        trusted = verify_response(response.headers, response.content, secret,
                                  headers[HEADER_SIGNATURE], window_s=1e9) is None
    return PeerFact(name, address, api_port, data_port, status=response.status_code,
                    error="" if response.status_code == 200 else response.text[:200],
                    skew_s=skew, answer_trusted=trusted,
                    data_reachable=data_port_answers(address, data_port, timeout))


def data_port_answers(address: str, port: int, timeout: float) -> bool:
    """A TCP connect either succeeds or is refused (the host answered: nothing filters the
    port); a timeout means something drops it."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def check_reachable(fact: PeerFact) -> Check:
    label = f"peer {fact.name} reachable"
    where = f"{fact.address}:{fact.api_port}"
    if fact.status is None:
        return fail(label, f"API {where} unreachable: {fact.error}",
                    f"check that flock runs there and that TCP {fact.api_port} is allowed "
                    "between the nodes")
    if fact.data_reachable is False:
        return warn(label, f"API {where} answers; data port {fact.data_port} times out",
                    f"allow TCP {fact.data_port} and the ports after it (data links) between "
                    "the nodes")
    return ok(label, f"API {where} and data port {fact.data_port} answer")


def check_clock(fact: PeerFact, window_s: float) -> Check:
    label = f"peer {fact.name} clock"
    if fact.skew_s is None and "timestamp outside" not in fact.error:
        return ok(label, "no time in its answer (unreachable or older flock)")
    skew = fact.skew_s
    if skew is None or (fact.status in (401, 403) and "timestamp outside" in fact.error):
        return fail(label, f"it refused our signed call: {fact.error.strip()[:160]}",
                    "turn on time sync (NTP) on both machines")
    detail = f"{'ahead' if skew > 0 else 'behind'} by {abs(skew):.1f} s"
    if abs(skew) > window_s / 2:
        return fail(label, f"{detail}: signed calls older than {window_s:g} s are refused",
                    "turn on time sync (NTP: timedatectl set-ntp true; macOS: Settings > "
                    "General > Date & Time > Set automatically) on both machines")
    if abs(skew) > 2.0:
        return warn(label, detail, "turn on time sync (NTP) on both machines")
    return ok(label, detail)


def check_secret(fact: PeerFact, mode: str) -> Check:
    label = f"peer {fact.name} secret"
    if fact.status in (401, 403) and "timestamp outside" in fact.error:
        return warn(label, "not checked: the peer refused our signature's time",
                    "see the clock check")
    if fact.status in (401, 403) or not fact.answer_trusted:
        how = ("the first API key (keys-only mode derives the secret from it)" if mode == "keys"
               else "the cluster secret" if mode == "secret" else "a cluster secret")
        why = fact.error if fact.status in (401, 403) else "its answer's signature is not ours"
        return fail(label, f"it refuses this node's signature or signs with another secret "
                    f"({why.strip()[:120]})",
                    f"give every node the same {how} (cluster.toml secret_file, or the same "
                    "first --api-key)")
    if fact.status is None:
        return warn(label, "not checked: unreachable", "see the reachability check")
    return ok(label, "same secret" if mode != "open" else "open mode (no secret) on both")
