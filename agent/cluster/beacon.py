"""The discovery beacon on the wire: its msgpack layout, signing and the checks a received
datagram goes through, and fitting a beacon into one datagram. Pure functions, no sockets.

A datagram is MAGIC + msgpack [body, signature]; the body is a `Beacon` whose first fields (the
`BeaconHeader`) every protocol version keeps, so a node of an incompatible version can still be
named. The signature (HMAC of the cluster secret, see auth.py) is empty in open mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from agent.cluster.auth import REPLAY_WINDOW_S, sign, verify
from agent.cluster.membership import DETAIL_FIELDS, detail_digest
from agent.cluster.state import NodeProfile

PROTO = 1  # beacon wire protocol; a different one is incompatible whatever the version says
MAGIC = b"FLK1"
# One Ethernet frame (1500) minus IP and UDP headers, with margin for tunnels: no fragmentation,
# which multicast over Wi-Fi handles badly.
MAX_DATAGRAM = 1400
ECHO_ID_CHARS = 8  # echoes name their target by a prefix of its id: a rare collision costs one RTT
BEACON_CONTEXT = "beacon"


class Echo(msgspec.Struct, array_like=True, frozen=True):
    node: str  # first ECHO_ID_CHARS of the node id whose beacon this answers
    seq: int
    held_us: int  # how long the echoing node held it before this beacon left


class BeaconHeader(msgspec.Struct, kw_only=True, frozen=True):
    """The fields every protocol version keeps, so an incompatible node can still be named."""

    proto: int
    cluster: str
    tag: str
    node_id: str
    version: str
    sent_at: float
    boot_nonce: int = 0
    fingerprint: str = ""
    addresses: list[str] = []


class Beacon(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    proto: int
    cluster: str
    tag: str
    node_id: str
    version: str
    sent_at: float  # wall clock: the signature's freshness window
    boot_nonce: int
    fingerprint: str
    seq: int
    api_port: int
    addresses: list[str] = []
    profile: dict[str, Any] = {}
    partial: bool = False  # profile without its detail fields (too big for one datagram)
    detail: str = ""  # digest of the detail fields, full or not
    echoes: list[Echo] = []


_encoder = msgspec.msgpack.Encoder()
_envelope = msgspec.msgpack.Decoder(tuple[bytes, str])
_header_decoder = msgspec.msgpack.Decoder(BeaconHeader)
_beacon_decoder = msgspec.msgpack.Decoder(Beacon)


def encode_beacon(beacon: Beacon, secret: str | None) -> bytes:
    """MAGIC + msgpack [body, signature]; the signature is empty in open mode."""
    body = _encoder.encode(beacon)
    signature = sign(secret, body, beacon.sent_at, context=BEACON_CONTEXT) if secret else ""
    return MAGIC + _encoder.encode((body, signature))


VerdictKind = Literal["ok", "foreign", "unauthenticated", "incompatible", "malformed"]


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    beacon: Beacon | None = None
    header: BeaconHeader | None = None
    reason: str = ""


def versions_compatible(ours: str, theirs: str) -> bool:
    """Same major version (same minor while the major is 0, as semver promises nothing then)."""

    def major_minor(v: str) -> tuple[int, int] | None:
        parts = v.split(".")
        try:
            return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            return None

    a, b = major_minor(ours), major_minor(theirs)
    if a is None or b is None:
        return ours == theirs
    return a == b if a[0] == 0 or b[0] == 0 else a[0] == b[0]


def decode_beacon(
    data: bytes,
    *,
    tag: str,
    secret: str | None,
    version: str,
    now: float,
    window_s: float = REPLAY_WINDOW_S,
) -> Verdict:
    """Judge one datagram. Pure. Cheapest checks first: a LAN full of other clusters' beacons
    costs one small decode each, never an HMAC."""
    if not data.startswith(MAGIC):
        return Verdict("malformed", reason="not a flock beacon")
    try:
        body, signature = _envelope.decode(data[len(MAGIC):])
        header = _header_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        return Verdict("malformed", reason=str(e))
    if header.tag != tag:
        return Verdict("foreign", header=header)
    if secret:
        # Open mode skips freshness too: it would only add a clock requirement, no security.
        error = verify(secret, body, header.sent_at, signature, now=now, window_s=window_s,
                       context=BEACON_CONTEXT)
        if error:
            return Verdict("unauthenticated", header=header, reason=error)
    if header.proto != PROTO or not versions_compatible(version, header.version):
        return Verdict("incompatible", header=header,
                       reason=f"version {header.version} protocol {header.proto}")
    try:
        beacon = _beacon_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        return Verdict("malformed", header=header, reason=str(e))
    return Verdict("ok", beacon=beacon, header=header)


def fit_beacon(
    beacon: Beacon, profile: NodeProfile, echoes: Sequence[Echo], secret: str | None,
    limit: int = MAX_DATAGRAM,
) -> tuple[bytes, Beacon]:
    """The largest beacon under `limit` bytes: full profile if possible, then as many echoes
    as fit (the caller orders them, least recently echoed first)."""
    full = profile.model_dump(mode="json")
    digest = detail_digest(profile)
    variants = [
        msgspec.structs.replace(beacon, profile=full, partial=False, detail=digest),
        msgspec.structs.replace(
            beacon, profile={k: v for k, v in full.items() if k not in DETAIL_FIELDS},
            partial=True, detail=digest,
        ),
    ]
    chosen = variants[-1]
    for variant in variants:
        if len(encode_beacon(variant, secret)) <= limit:
            chosen = variant
            break
    lo, hi = 0, len(echoes)  # binary search for the most echoes that still fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode_beacon(msgspec.structs.replace(chosen, echoes=list(echoes[:mid])),
                             secret)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    final = msgspec.structs.replace(chosen, echoes=list(echoes[:lo]))
    return encode_beacon(final, secret), final
