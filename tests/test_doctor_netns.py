"""`flock doctor`'s multicast and firewall checks inside a network namespace (tests/netns.py):
multicast send and receive pass on the namespace's interface, then fail once iptables (or nft)
drops the discovery port there, and the firewall check names the rule.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.netns import netns_lab

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[1]
PORT = 52416
GROUP = "239.77.52.41"
PROBE = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from agent.doctor import network
iptables, nft = network.read_firewall()
print(json.dumps({{
    "multicast": network.multicast_roundtrip(sys.argv[1], {GROUP!r}, {PORT}),
    "firewall": network.check_linux_firewall(iptables, nft, discovery_port={PORT},
                                             data_ports=(52500, 52515), api_port=52415).as_dict(),
}}))
"""


def _rule_tool() -> list[str] | None:
    """A command that drops UDP to the discovery port inside a namespace (iptables or nft)."""
    if shutil.which("iptables"):
        return ["iptables", "-A", "INPUT", "-p", "udp", "--dport", str(PORT), "-j", "DROP"]
    if shutil.which("nft"):
        return ["sh", "-c", "nft add table inet doc && nft 'add chain inet doc input "
                "{ type filter hook input priority 0; }' && "
                f"nft add rule inet doc input udp dport {PORT} drop"]
    return None


def test_multicast_passes_then_fails_when_a_firewall_drops_the_discovery_port() -> None:
    rule = _rule_tool()
    if rule is None:
        pytest.skip("neither iptables nor nft is installed (apt-get install iptables)")
    with netns_lab(1) as lab:
        host = lab.hosts[0]

        def probe() -> dict[str, object]:
            done = lab.run(host, [sys.executable, "-c", PROBE, host.address])
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)  # type: ignore[no-any-return]

        before = probe()
        assert before["multicast"] is None, before
        assert before["firewall"]["status"] == "ok"  # type: ignore[index]
        added = lab.run(host, rule)
        assert added.returncode == 0, added.stderr
        after = probe()
        assert after["multicast"] is not None and "nothing came back" in str(after["multicast"])
        assert after["firewall"]["status"] == "fail", after  # type: ignore[index]
        assert str(PORT) in after["firewall"]["detail"]  # type: ignore[index]
