"""`flock doctor`'s checks, each failing and passing on this machine: pure checks over facts,
real ports (one held by this test process), real multicast on loopback, a real store with a
corrupted weight file, the MLX probe in a subprocess; macOS-only checks on recorded outputs.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import msgspec

from agent.doctor import local, macos, network
from agent.doctor.models import check_models
from agent.doctor.result import Check, exit_code, format_lines
from agent.models.store import MANIFEST, Manifest, ModelStore, sha256_file
from tests.live_agent import free_port

GiB = 2**30


# ---- results ----------------------------------------------------------------------------------


def test_exit_status_is_non_zero_only_on_a_failure() -> None:
    good, warned = Check("a", "ok", "fine"), Check("b", "warn", "hm", "do x")
    assert exit_code([good, warned]) == 0
    assert exit_code([good, Check("c", "fail", "bad", "do y")]) == 1
    lines = format_lines([good, warned])
    assert lines[0].startswith("OK") and any("fix: do x" in line for line in lines)


# ---- local ------------------------------------------------------------------------------------


def test_python_version() -> None:
    assert local.check_python((3, 11, 7)).status == "ok"
    failed = local.check_python((3, 10, 12))
    assert failed.status == "fail" and "3.11" in failed.fix


def test_mlx_probe_passes_here_and_fails_on_a_broken_import() -> None:
    probe = local.probe_mlx()
    passed = local.check_mlx(probe, "linux", {})
    assert passed.status == "ok", passed
    broken = local.check_mlx({"error": "ModuleNotFoundError: No module named 'mlx'"}, "linux", {})
    assert broken.status == "fail" and "pip install" in broken.fix
    other = local.check_mlx(probe, "linux", {"node1": "0.1.0"})
    assert other.status == "warn" and "node1 has 0.1.0" in other.detail
    assert local.check_mlx({"mlx": "0.32.4", "metal": False}, "darwin", {}).status == "warn"


def test_blas_shim() -> None:
    assert local.check_blas("linux", {"blas": "OpenBLAS 0.3.34 via shim"}).status == "ok"
    reference = local.check_blas("linux", {"blas": "reference BLAS (mlx default)"})
    assert reference.status == "warn" and "libopenblas" in reference.fix
    assert local.check_blas("darwin", {"blas": "Accelerate"}).status == "ok"


def test_memory_against_the_largest_model() -> None:
    assert local.check_memory(16 * GiB, 10 * GiB, ("m", 4 * GiB)).status == "ok"
    assert local.check_memory(16 * GiB, 3 * GiB, ("m", 4 * GiB)).status == "warn"
    too_big = local.check_memory(16 * GiB, 10 * GiB, ("big", 40 * GiB))
    assert too_big.status == "fail" and "pipeline" in too_big.fix


def test_disk_space(tmp_path: Path) -> None:
    import shutil

    free = shutil.disk_usage(tmp_path).free
    assert local.check_disk(free, 0, str(tmp_path)).status == ("ok" if free > 2 * GiB else "fail")
    assert local.check_disk(1 * GiB, 0, "/x").status == "fail"
    assert local.check_disk(10 * GiB, 20 * GiB, "/x").status == "warn"


# ---- ports ------------------------------------------------------------------------------------


def test_a_port_held_by_another_process_fails_and_a_free_one_passes() -> None:
    port = free_port()
    holder = socket.socket()
    holder.bind(("0.0.0.0", port))
    holder.listen()
    try:
        facts = network.gather_ports(port, free_port(socket.SOCK_DGRAM), free_port())
        checks = {c.name: c for c in network.check_ports(facts, api_answers=False)}
        taken = checks[f"port api tcp/{port}"]
        assert taken.status == "fail" and "--port" in taken.fix
        assert "pytest" in taken.detail or "python" in taken.detail  # the holder, from /proc
    finally:
        holder.close()
    facts = network.gather_ports(port, free_port(socket.SOCK_DGRAM), free_port())
    assert all(c.status == "ok" for c in network.check_ports(facts, api_answers=False))


def test_a_discovery_port_held_without_sharing_fails() -> None:
    port = free_port(socket.SOCK_DGRAM)
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("0.0.0.0", port))  # no SO_REUSEADDR: nobody can share it
    try:
        facts = network.gather_ports(free_port(), port, free_port())
        [check] = [c for c in network.check_ports(facts, api_answers=False)
                   if "discovery" in c.name]
        assert check.status == "fail"
    finally:
        holder.close()


def test_a_port_held_by_flock_passes() -> None:
    facts = [network.PortFact("api", 1, "tcp", False, None),
             network.PortFact("data", 2, "tcp", False,
                              "/usr/bin/python3 -m agent.runtime.runner")]
    assert all(c.status == "ok" for c in network.check_ports(facts, api_answers=True))


# ---- multicast --------------------------------------------------------------------------------


def test_multicast_roundtrip_on_loopback_passes() -> None:
    port = free_port(socket.SOCK_DGRAM)
    assert network.multicast_roundtrip("127.0.0.1", "239.77.52.41", port) is None
    [check] = network.check_multicast({"127.0.0.1": None}, "239.77.52.41", port)
    assert check.status == "ok"


def test_multicast_failure_is_reported_with_a_fix() -> None:
    # An address this host does not have: joining the group there fails.
    problem = network.multicast_roundtrip("192.0.2.254", "239.77.52.41",
                                          free_port(socket.SOCK_DGRAM), timeout=0.3)
    assert problem is not None
    [check] = network.check_multicast({"192.0.2.254": problem}, "239.77.52.41", 1)
    assert check.status == "fail" and "static" in check.fix
    assert network.check_multicast({}, "g", 1)[0].status == "fail"


# ---- firewalls (recorded outputs) -------------------------------------------------------------

IPTABLES_DROPPING = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p udp -m udp --dport 52416 -j DROP
-A INPUT -s 10.9.9.9/32 -j DROP
COMMIT
"""
IPTABLES_CLEAN = """\
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -s 10.9.9.9/32 -j DROP
COMMIT
"""
IPTABLES_DEFAULT_DROP = """\
*filter
:INPUT DROP [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"""
NFT_DROPPING = """\
table inet filter {
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport { 52500-52515 } drop
	}
}
"""


def _firewall(iptables: str, nft: str = "") -> Check:
    return network.check_linux_firewall(iptables, nft, discovery_port=52416,
                                        data_ports=(52500, 52515), api_port=52415)


def test_linux_firewall_rules_that_drop_flocks_ports_fail() -> None:
    dropping = _firewall(IPTABLES_DROPPING)
    assert dropping.status == "fail" and "52416" in dropping.detail
    assert "10.9.9.9" not in dropping.detail  # a rule against one host is not about flock
    assert _firewall("", NFT_DROPPING).status == "fail"


def test_linux_firewall_without_such_rules_passes() -> None:
    assert _firewall(IPTABLES_CLEAN).status == "ok"
    assert _firewall("").status == "ok"
    assert _firewall(IPTABLES_DEFAULT_DROP).status == "warn"


APP_FIREWALL_OFF = "Firewall is disabled. (State = 0)\n"
APP_FIREWALL_ON = "Firewall is enabled. (State = 1)\n"
BLOCK_ALL_ON = "Firewall has block all state set to enabled.\n"
BLOCK_ALL_OFF = "Firewall has block all state set to disabled.\n"


def test_macos_application_firewall() -> None:
    assert macos.check_app_firewall(APP_FIREWALL_OFF, BLOCK_ALL_OFF, "python3").status == "ok"
    on = macos.check_app_firewall(APP_FIREWALL_ON, BLOCK_ALL_OFF, "/opt/py/bin/python3")
    assert on.status == "warn" and "--unblockapp /opt/py/bin/python3" in on.fix
    assert macos.check_app_firewall(APP_FIREWALL_ON, BLOCK_ALL_ON, "python3").status == "fail"


def test_macos_gpu_wired_limit() -> None:
    total = 64 * GiB
    assert macos.parse_wired_limit_mb("iogpu.wired_limit_mb: 57344\n") == 57344
    assert macos.parse_wired_limit_mb("sysctl: unknown oid 'iogpu.wired_limit_mb'") is None
    low = macos.check_wired_limit("iogpu.wired_limit_mb: 8192\n", total, ("big", 20 * GiB))
    assert low.status == "fail" and "sudo sysctl iogpu.wired_limit_mb=" in low.fix
    assert macos.check_wired_limit("iogpu.wired_limit_mb: 57344\n", total,
                                   ("big", 20 * GiB)).status == "ok"
    # 0 is macOS's default: ~3/4 of a 64 GiB machine (48 GiB), less than a 50 GiB model.
    assert macos.check_wired_limit("iogpu.wired_limit_mb: 0\n", total,
                                   ("huge", 50 * GiB)).status == "fail"
    assert macos.check_wired_limit("iogpu.wired_limit_mb: 0\n", total,
                                   ("m", 30 * GiB)).status == "ok"


# ---- model files --------------------------------------------------------------------------------


def _stored(root: Path, name: str = "tiny") -> Path:
    """A store entry as the store writes it: weight files, config, and flock.json."""
    directory = root / name
    directory.mkdir(parents=True)
    weights = directory / "model.safetensors"
    weights.write_bytes(os.urandom(4096))
    (directory / "config.json").write_text('{"model_type": "llama"}')
    manifest = Manifest(name=name, source="test", source_sha256=None, architecture="llama",
                        parameters=1024, quantization="F32", dtype="float32",
                        size_bytes=sum(p.stat().st_size for p in directory.iterdir()),
                        context_length=2048, created_at=time.time(),
                        weights_sha256={weights.name: sha256_file(weights)})
    (directory / MANIFEST).write_bytes(msgspec.json.encode(manifest))
    return weights


def test_intact_model_files_pass(tmp_path: Path) -> None:
    _stored(tmp_path)
    store = ModelStore(tmp_path)
    assert [c.status for c in check_models(store)] == ["ok"]
    assert [c.status for c in check_models(store, deep=True)] == ["ok"]


def test_a_corrupted_model_file_fails(tmp_path: Path) -> None:
    weights = _stored(tmp_path)
    stat = weights.stat()
    with weights.open("r+b") as f:  # flip bytes in place: same size
        f.write(b"\xff" * 16)
    os.utime(weights, (stat.st_atime, stat.st_mtime))  # even with the old mtime put back
    store = ModelStore(tmp_path)
    assert [c.status for c in check_models(store)] == ["ok"]  # size and mtime cannot tell
    [deep] = check_models(store, deep=True)
    assert deep.status == "fail" and "sha256" in deep.detail and "flock pull" in deep.fix
    time.sleep(0.01)
    weights.write_bytes(b"truncated")  # rewritten now: size and mtime both tell
    os.utime(weights, (time.time() + 60, time.time() + 60))
    [fast] = check_models(store)
    assert fast.status == "fail" and "modified" in fast.detail


def test_a_missing_model_file_fails(tmp_path: Path) -> None:
    _stored(tmp_path).unlink()
    [check] = check_models(ModelStore(tmp_path))
    assert check.status == "fail" and "missing" in check.detail


def test_memory_of_a_model_already_placed_here_counts_against_the_total_only() -> None:
    assert local.check_memory(16 * GiB, 1 * GiB, ("m", 4 * GiB), placed=True).status == "ok"
    assert local.check_memory(16 * GiB, 1 * GiB, ("m", 40 * GiB), placed=True).status == "fail"
