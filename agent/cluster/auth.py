"""The cluster secret: a tag that keeps clusters apart and HMAC signatures that let members in.

Every agent-to-agent message (discovery beacons, HTTP control calls) carries a timestamp and an
HMAC-SHA256 over it, its context (what kind of message, which endpoint) and its body. Keys are
derived from the secret per purpose, so a tag seen on the wire tells nothing about the key that
signs. Open mode (no secret) still separates clusters by name, but authenticates nobody.

Keys-only mode (API keys, no secret) is not a mode of its own on the wire: the node derives its
secret from its first API key (`effective_secret`), so beacons, agent-to-agent calls, answers and
shard transfers are signed exactly as with a configured secret, and the key itself never travels
between nodes. Every node of a keyed cluster must therefore list the same first key.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections import OrderedDict
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from agent.settings import NodeSettings
    from agent.spec import ClusterSpec

HEADER_NODE = "X-Flock-Node"
HEADER_TIME = "X-Flock-Time"
HEADER_SIGNATURE = "X-Flock-Signature"

REPLAY_WINDOW_S = 30.0
TAG_CHARS = 16  # 64 bits: plenty to tell clusters on one LAN apart, short on the wire


def _key(secret: str, purpose: str) -> bytes:
    # One key per purpose: the tag is public on the wire, the signing key must not follow from it.
    return hmac.new(secret.encode(), f"flock/v1/{purpose}".encode(), hashlib.sha256).digest()


KEY_SECRET_LABEL = b"flock/v1/cluster-secret-from-api-key"

AuthMode = Literal["secret", "keys", "open"]


def secret_from_key(api_key: str) -> str:
    """The cluster secret of keys-only mode: HMAC-SHA256(key=the first API key, a fixed label),
    hex. Holders of that key can sign; the signatures and tags on the wire do not reveal it."""
    return hmac.new(api_key.encode(), KEY_SECRET_LABEL, hashlib.sha256).hexdigest()


def _configured_secret(settings: NodeSettings, spec: ClusterSpec | None) -> str | None:
    return settings.cluster_secret or (spec.cluster.secret if spec is not None else None)


def effective_secret(settings: NodeSettings, spec: ClusterSpec | None = None) -> str | None:
    """The one secret a node signs and verifies with (beacon tag and signature, agent-to-agent
    requests and answers, shard transfers): the configured cluster secret (settings, else the
    spec's inline one); without one, the secret derived from the first API key (keys-only
    mode); None in open mode. Every part of the agent takes its secret from here."""
    configured = _configured_secret(settings, spec)
    if configured:
        return configured
    if settings.api_keys and settings.api_keys[0]:
        return secret_from_key(settings.api_keys[0])
    return None


def auth_mode(settings: NodeSettings, spec: ClusterSpec | None = None) -> AuthMode:
    """"secret" (a configured secret), "keys" (API keys, secret derived from the first one) or
    "open" (neither), consistent with `effective_secret`."""
    if _configured_secret(settings, spec):
        return "secret"
    return "keys" if effective_secret(settings, spec) else "open"


def generate_secret() -> str:
    """A fresh cluster secret (256 bits, URL-safe text) for `flock init`."""
    return secrets.token_urlsafe(32)


def cluster_tag(secret: str | None, cluster_name: str) -> str:
    """A short tag that beacons carry so nodes of other clusters are dropped before any work.

    With a secret it is an HMAC of the name, so two clusters that share a name but not a secret
    never mix; in open mode it is a public hash of the name alone.
    """
    if secret:
        digest = hmac.new(_key(secret, "tag"), cluster_name.encode(), hashlib.sha256).hexdigest()
    else:
        digest = hashlib.sha256(f"flock/v1/open/{cluster_name}".encode()).hexdigest()
    return digest[:TAG_CHARS]


def format_timestamp(timestamp: float) -> str:
    """The one text form of a timestamp that is signed and sent (milliseconds)."""
    return f"{timestamp:.3f}"


def _message(body: bytes, timestamp: float, context: str) -> bytes:
    # The context goes in so a signed message for one endpoint cannot be replayed at another.
    return f"{format_timestamp(timestamp)}\n{context}\n".encode() + body


def sign(secret: str, body: bytes, timestamp: float, *, context: str = "") -> str:
    """Hex HMAC-SHA256 of (timestamp, context, body) under the secret's signing key."""
    mac = hmac.new(_key(secret, "sign"), _message(body, timestamp, context), hashlib.sha256)
    return mac.hexdigest()


def parse_timestamp(value: str | float | None) -> float | None:
    """A finite timestamp from a header value, or None when it is missing or not a number."""
    if value is None:
        return None
    try:
        ts = float(value)
    except (TypeError, ValueError):
        return None
    return ts if math.isfinite(ts) else None


def verify(
    secret: str,
    body: bytes,
    timestamp: str | float | None,
    signature: str | None,
    *,
    now: float,
    window_s: float = REPLAY_WINDOW_S,
    context: str = "",
) -> str | None:
    """None when the signature is valid and fresh; otherwise why not (for logs and 401 bodies).

    Freshness is |now - timestamp| <= window_s on wall clocks, so nodes need clocks within the
    window of each other (NTP); a ReplayGuard on top refuses a second use inside the window.
    """
    if not signature:
        return "missing signature"
    ts = parse_timestamp(timestamp)
    if ts is None:
        return "missing or malformed timestamp"
    skew = now - ts
    if abs(skew) > window_s:
        return f"timestamp outside the {window_s:g} s window (skew {skew:+.1f} s; check clocks)"
    expected = sign(secret, body, ts, context=context)
    # compare_digest: the time taken must not reveal how many leading characters matched.
    if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
        return "bad signature"
    return None


class ReplayGuard:
    """Remembers signatures seen within the replay window, so each signed message counts once.

    Bounded: beyond `max_entries` the oldest are forgotten first (only members holding the
    secret can fill it, and an entry older than the window is refused by the clock check anyway).
    """

    def __init__(self, window_s: float = REPLAY_WINDOW_S, max_entries: int = 100_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_use(self, signature: str, now: float) -> bool:
        """True the first time a signature is offered within the window, False on a replay."""
        horizon = now - 2 * self.window_s  # a timestamp may be up to window_s in the future
        while self._seen:
            oldest, seen_at = next(iter(self._seen.items()))
            if seen_at >= horizon and len(self._seen) < self.max_entries:
                break
            del self._seen[oldest]
        if signature in self._seen:
            return False
        self._seen[signature] = now
        return True

    def __len__(self) -> int:
        return len(self._seen)
