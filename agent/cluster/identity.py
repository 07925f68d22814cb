"""A node's persistent identity: a random id kept in `<state_dir>/node_id`, bound to its machine.

The file holds the id on its first line and a fingerprint of the machine that minted it on the
second. A state directory copied to another machine (a cloned disk, an rsync'd home) carries the
id but not the machine, so the fingerprint differs and the copy mints its own id instead of
silently merging with the original in the peer table. Copies the fingerprint cannot tell apart
(containers sharing one machine-id) are caught live: discovery sees a second node with our id
and a different boot nonce, and `resolve_id_clash` decides, the same way on both sides, which
one keeps the id.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Literal

log = logging.getLogger("flock.identity")

NODE_ID_FILE = "node_id"
LOCK_FILE = "agent.lock"
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))


@dataclass(frozen=True)
class IdClaim:
    """What a beacon says about who sent it: enough to tell a clash from our own echo."""

    node_id: str
    fingerprint: str
    boot_nonce: int


@dataclass(frozen=True)
class NodeIdentity:
    """This process's identity: the persistent id plus a nonce fresh at every start."""

    node_id: str
    fingerprint: str
    boot_nonce: int
    state_dir: Path

    @property
    def claim(self) -> IdClaim:
        return IdClaim(self.node_id, self.fingerprint, self.boot_nonce)


def new_node_id() -> str:
    """128 random bits as 32 hex characters."""
    return secrets.token_hex(16)


def new_boot_nonce() -> int:
    """A random 63-bit nonce: fits msgpack's and JSON's signed 64-bit integers everywhere."""
    return secrets.randbits(63)


def _hash(kind: str, value: str) -> str:
    # Hashed so the raw machine-id (which some tools treat as confidential) never leaves the host.
    return hashlib.sha256(f"flock/machine/{kind}/{value}".encode()).hexdigest()[:16]


def machine_fingerprint() -> str:
    """A stable fingerprint of this machine: Linux machine-id, macOS hardware UUID, else host+MAC.

    Deliberately not the hostname on macOS or Linux when a machine id exists: hostnames change
    with networks and renames, and a changed fingerprint re-keys the node.
    """
    if sys.platform == "darwin":
        uuid_text = _macos_platform_uuid()
        if uuid_text:
            return _hash("ioreg", uuid_text)
    for path in _MACHINE_ID_FILES:
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if text:
                return _hash("machine-id", text)
    return _hash("host-mac", f"{socket.gethostname()}/{uuid.getnode():012x}")


def _macos_platform_uuid() -> str | None:
    try:
        out = subprocess.run(
            ["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'"IOPlatformUUID"\s*=\s*"([^"]+)"', out)
    return match.group(1) if match else None


def _read(path: Path) -> tuple[str, str] | None:
    """(node_id, fingerprint) from the file; None when absent, ("", "") when malformed."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    node_id = lines[0].strip() if lines else ""
    if not _ID_RE.match(node_id):
        log.warning("replacing malformed node id file %s", path)
        return "", ""
    fingerprint = ""
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        if key == "machine":
            fingerprint = value.strip()
    return node_id, fingerprint


def _write(path: Path, node_id: str, fingerprint: str, *, exclusive: bool) -> bool:
    """Write the id file atomically; with `exclusive`, only if none exists (False then).

    A temporary file is filled and synced first, then linked (exclusive) or renamed into place,
    so a reader never sees half a file and two agents starting at once agree on one id.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with tmp.open("w") as f:
        f.write(f"{node_id}\nmachine {fingerprint}\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        if exclusive:
            try:
                os.link(tmp, path)  # fails if the file exists: create-if-absent, atomically
            except FileExistsError:
                return False
            except OSError:
                # Filesystems without hard links: O_EXCL is the same create-if-absent promise
                # (a reader may briefly see a short file, which _read treats as malformed).
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(tmp.read_text())
                    f.flush()
                    os.fsync(f.fileno())
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_or_create(state_dir: Path, *, fingerprint: str | None = None) -> NodeIdentity:
    """This node's identity: the stored id when it was minted on this machine, else a new one.

    `fingerprint` defaults to `machine_fingerprint()`; tests pass one to play another machine.
    A file without a fingerprint line (written by hand) is adopted and stamped with ours.
    """
    fp = fingerprint if fingerprint is not None else machine_fingerprint()
    path = Path(state_dir) / NODE_ID_FILE
    for _ in range(3):  # a concurrent creator can win the exclusive link; then read theirs
        stored = _read(path)
        if stored is None:
            node_id = new_node_id()
            if _write(path, node_id, fp, exclusive=True):
                log.info("minted node id %s in %s", node_id, path)
                return NodeIdentity(node_id, fp, new_boot_nonce(), Path(state_dir))
            continue
        node_id, stored_fp = stored
        if not node_id:
            node_id = new_node_id()
            _write(path, node_id, fp, exclusive=False)
            return NodeIdentity(node_id, fp, new_boot_nonce(), Path(state_dir))
        if stored_fp == fp:
            return NodeIdentity(node_id, fp, new_boot_nonce(), Path(state_dir))
        if not stored_fp:
            _write(path, node_id, fp, exclusive=False)
            return NodeIdentity(node_id, fp, new_boot_nonce(), Path(state_dir))
        fresh = new_node_id()
        _write(path, fresh, fp, exclusive=False)
        log.warning(
            "state dir %s was created on another machine (node id %s); minted new node id %s "
            "so the copy does not impersonate the original", state_dir, node_id, fresh,
        )
        return NodeIdentity(fresh, fp, new_boot_nonce(), Path(state_dir))
    raise RuntimeError(f"could not read or create {path}")


def rekey(identity: NodeIdentity, reason: str) -> NodeIdentity:
    """Mint and store a new id for this node (the boot nonce stays: it is still this process)."""
    fresh = new_node_id()
    _write(identity.state_dir / NODE_ID_FILE, fresh, identity.fingerprint, exclusive=False)
    log.warning("node id %s re-keyed to %s: %s", identity.node_id, fresh, reason)
    return replace(identity, node_id=fresh)


ClashVerdict = Literal["no_clash", "self", "keep", "rekey"]


def resolve_id_clash(ours: IdClaim, theirs: IdClaim) -> ClashVerdict:
    """Who keeps a node id that two live nodes claim. Pure; both sides reach opposite answers.

    - different ids: "no_clash"
    - same id, fingerprint and nonce: "self" (our own beacon, looped back)
    - otherwise the larger boot nonce keeps the id ("keep"), the smaller mints a new one
      ("rekey"); equal nonces (2^-63) fall back to comparing fingerprints, then nobody moves.
    """
    if ours.node_id != theirs.node_id:
        return "no_clash"
    if ours.boot_nonce != theirs.boot_nonce:
        return "keep" if ours.boot_nonce > theirs.boot_nonce else "rekey"
    if ours.fingerprint != theirs.fingerprint:
        return "keep" if ours.fingerprint > theirs.fingerprint else "rekey"
    return "self"


class StateDirInUse(RuntimeError):
    """Another live agent holds this state directory."""


@dataclass
class StateDirLock:
    """An exclusive lock on a state directory for the life of one agent process.

    Two agents on one state dir would share a node id and runner sockets; the lock makes the
    second one fail at start with a clear message instead. The OS drops the lock when the
    process dies, so a crash never leaves a stale lock behind.
    """

    path: Path
    _file: IO[str] | None = None

    def acquire(self) -> StateDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise StateDirInUse(
                f"{self.path.parent} is in use by another flock agent; give each agent its own "
                "state dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> StateDirLock:
        return self if self._file is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_state_dir(state_dir: Path) -> StateDirLock:
    """Take the state dir's lock (raises StateDirInUse); release() or use as a context manager."""
    return StateDirLock(Path(state_dir) / LOCK_FILE).acquire()
