"""Node identity: persistent ids, copied state dirs, live id clashes, the state dir lock."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cluster.identity import (
    NODE_ID_FILE,
    IdClaim,
    StateDirInUse,
    load_or_create,
    lock_state_dir,
    machine_fingerprint,
    rekey,
    resolve_id_clash,
)


def test_node_id_is_created_once_and_persists(tmp_path: Path) -> None:
    first = load_or_create(tmp_path, fingerprint="machine-a")
    again = load_or_create(tmp_path, fingerprint="machine-a")
    assert re.fullmatch(r"[0-9a-f]{32}", first.node_id)
    assert again.node_id == first.node_id
    assert again.boot_nonce != first.boot_nonce  # a new process, a new nonce
    lines = (tmp_path / NODE_ID_FILE).read_text().splitlines()
    assert lines == [first.node_id, "machine machine-a"]
    assert not list(tmp_path.glob(".*tmp")), "temporary files are cleaned up"


def test_ids_differ_between_state_dirs(tmp_path: Path) -> None:
    ids = {load_or_create(tmp_path / str(i), fingerprint="m").node_id for i in range(20)}
    assert len(ids) == 20


def test_copied_state_dir_on_another_machine_mints_a_new_id(tmp_path: Path) -> None:
    original = load_or_create(tmp_path, fingerprint="machine-a")
    copy = load_or_create(tmp_path, fingerprint="machine-b")
    assert copy.node_id != original.node_id
    # The copy now owns the file it carries; it keeps its new id from then on.
    assert load_or_create(tmp_path, fingerprint="machine-b").node_id == copy.node_id


def test_hand_written_id_without_fingerprint_is_adopted(tmp_path: Path) -> None:
    (tmp_path / NODE_ID_FILE).write_text("0123456789abcdef0123456789abcdef\n")
    identity = load_or_create(tmp_path, fingerprint="machine-a")
    assert identity.node_id == "0123456789abcdef0123456789abcdef"
    assert "machine machine-a" in (tmp_path / NODE_ID_FILE).read_text()


def test_malformed_id_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / NODE_ID_FILE).write_text("not an id\n")
    identity = load_or_create(tmp_path, fingerprint="m")
    assert re.fullmatch(r"[0-9a-f]{32}", identity.node_id)


def test_concurrent_first_starts_agree_on_one_id(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from agent.cluster.identity import load_or_create;"
        "print(load_or_create(Path(sys.argv[1]), fingerprint='m').node_id)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(ids) == 1 and all(ids)


def test_rekey_stores_the_new_id(tmp_path: Path) -> None:
    identity = load_or_create(tmp_path, fingerprint="m")
    fresh = rekey(identity, "test")
    assert fresh.node_id != identity.node_id
    assert fresh.boot_nonce == identity.boot_nonce
    assert load_or_create(tmp_path, fingerprint="m").node_id == fresh.node_id


def test_id_clash_larger_nonce_keeps_the_id() -> None:
    a = IdClaim("x" * 32, "fa", boot_nonce=10)
    b = IdClaim("x" * 32, "fb", boot_nonce=20)
    assert resolve_id_clash(a, b) == "rekey"
    assert resolve_id_clash(b, a) == "keep"


def test_id_clash_equal_nonces_fall_back_to_fingerprints() -> None:
    a = IdClaim("x" * 32, "fa", boot_nonce=7)
    b = IdClaim("x" * 32, "fb", boot_nonce=7)
    assert {resolve_id_clash(a, b), resolve_id_clash(b, a)} == {"keep", "rekey"}


def test_own_beacon_and_other_ids_are_no_clash() -> None:
    me = IdClaim("x" * 32, "fa", boot_nonce=7)
    assert resolve_id_clash(me, me) == "self"
    assert resolve_id_clash(me, IdClaim("y" * 32, "fa", boot_nonce=9)) == "no_clash"


def test_machine_fingerprint_is_stable_and_opaque() -> None:
    fp = machine_fingerprint()
    assert fp == machine_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    machine_id = Path("/etc/machine-id")
    if machine_id.exists():
        assert machine_id.read_text().strip() not in fp


def test_second_agent_on_a_state_dir_is_refused(tmp_path: Path) -> None:
    lock = lock_state_dir(tmp_path)
    try:
        code = ("import sys; from pathlib import Path; from agent.cluster.identity import "
                "lock_state_dir, StateDirInUse\n"
                "try:\n lock_state_dir(Path(sys.argv[1]))\nexcept StateDirInUse: sys.exit(3)")
        rc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=60).returncode
        assert rc == 3
    finally:
        lock.release()
    # Released: usable again; and flock is per open file, so a second take is refused even
    # within one process.
    with lock_state_dir(tmp_path), pytest.raises(StateDirInUse):
        lock_state_dir(tmp_path)
