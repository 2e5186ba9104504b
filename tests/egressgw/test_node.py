"""Tests of the per-node rules: the rendered script (golden text), and the rules at work in
network namespaces the tests make: setup/teardown/status, pod DNS redirected to the gateway's
DNS proxy, UDP to a feed-listed address dropped.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from egressgw.node import NodeRules, summarise, to_setup_script, to_teardown_script
from tests.support import field
from tests.support.dnsmasq import dnsmasq_args, dnsmasq_path
from tests.support.gateway import egressgw_executable
from tests.support.netns import NetNs, netns_unavailable
from tests.support.nodegw import run_node_gateway, stop_process

GOLDEN = """\
#!/usr/sbin/nft -f
# egressgw node rules; one transaction; teardown: delete table inet egressgw
add table inet egressgw
add set inet egressgw blocked_v4 { type ipv4_addr; flags interval; }
add set inet egressgw blocked_v6 { type ipv6_addr; flags interval; }
add chain inet egressgw prerouting { type nat hook prerouting priority dstnat; policy accept; }
flush chain inet egressgw prerouting
add rule inet egressgw prerouting meta mark 0x539 return
add rule inet egressgw prerouting ip saddr { 10.99.0.0/24 } udp dport 53 redirect to :5300
add rule inet egressgw prerouting ip saddr { 10.99.0.0/24 } tcp dport 53 redirect to :5300
add rule inet egressgw prerouting iifname "cali0" udp dport 53 redirect to :5300
add rule inet egressgw prerouting iifname "cali0" tcp dport 53 redirect to :5300
add rule inet egressgw prerouting ip daddr { 10.99.0.0/24, 10.96.0.0/12 } return
add rule inet egressgw prerouting ip saddr { 10.99.0.0/24 } meta l4proto tcp redirect to :15001
add rule inet egressgw prerouting iifname "cali0" meta l4proto tcp redirect to :15001
add chain inet egressgw forward { type filter hook forward priority filter; policy accept; }
flush chain inet egressgw forward
add rule inet egressgw forward meta mark 0x539 return
add rule inet egressgw forward ip daddr @blocked_v4 counter drop
add rule inet egressgw forward ip6 daddr @blocked_v6 counter drop
"""


def rules(**changes: Any) -> NodeRules:
    """The rules of the golden text, with changes."""
    base: dict[str, Any] = {
        "table": "egressgw",
        "pod_cidrs": (ipaddress.ip_network("10.99.0.0/24"),),
        "interfaces": ("cali0",),
        "exempt_mark": 0x539,
        "dns_port": 5300,
        "tcp_port": 15001,
        "exclude_cidrs": (ipaddress.ip_network("10.96.0.0/12"),),
    }
    return NodeRules(**{**base, **changes})


def test_setup_script_golden() -> None:
    """Mark exemption first, DNS before the TCP redirect, excluded destinations before it."""
    assert to_setup_script(rules()) == GOLDEN


def test_unconfigured_listeners_get_no_redirect() -> None:
    """Without a DNS port or a transparent port their redirect rules are left out."""
    script = to_setup_script(rules(dns_port=None, tcp_port=None))
    assert "redirect" not in script
    assert "ip daddr @blocked_v4 counter drop" in script


def test_rules_need_pods_and_valid_names() -> None:
    """No pod CIDR and no interface, a bad table or interface name: ValueError saying so."""
    with pytest.raises(ValueError, match=r"pod_cidrs or node\.interfaces"):
        rules(pod_cidrs=(), interfaces=())
    with pytest.raises(ValueError, match="table name"):
        rules(table="bad-name")
    with pytest.raises(ValueError, match="interface name"):
        rules(interfaces=('x" accept; #',))
    assert to_teardown_script("egressgw") == (
        "add table inet egressgw\ndelete table inet egressgw\n"
    )


def test_summarise_counts_rules_and_elements() -> None:
    """Chains with their rule counts and sets with their element counts."""
    listing = (
        "table inet egressgw {\n\tset blocked_v4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n"
        "\t\telements = { 192.0.2.1, 198.51.100.0/24,\n\t\t\t     203.0.113.9 }\n\t}\n"
        "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n"
        "\t\tip daddr @blocked_v4 counter packets 0 bytes 0 drop\n\t}\n}\n"
    )
    assert summarise(listing) == ["set blocked_v4: 3 elements", "chain forward: 1 rules"]


# ---- in network namespaces ----------------------------------------------------------------


def egressgw(ns: NetNs, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the egressgw command inside the namespace."""
    return ns.run([str(egressgw_executable()), *args], timeout=30)


def sh(*args: str) -> None:
    """Run a command in the test's own namespace; fail the test if it fails."""
    subprocess.run(args, check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns_ok() -> None:
    """Skip when network namespaces cannot be made here."""
    why = netns_unavailable()
    if why:
        pytest.skip(why)


@pytest.mark.netns
def test_setup_teardown_status_are_idempotent(netns_ok: None, tmp_path: Path) -> None:
    """setup twice, status shows the rules, teardown twice, status says not installed."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        "node: {pod_cidrs: ['10.99.0.0/24']}\n"
        "dns: {listen: '0.0.0.0:5300', upstreams: ['127.0.0.1:5353']}\n"
    )
    with NetNs() as ns:
        for _ in range(2):
            done = egressgw(ns, "node", "setup", "--config", str(config))
            assert done.returncode == 0, done.stderr
        status = egressgw(ns, "node", "status", "--config", str(config))
        assert status.returncode == 0, status.stderr
        assert "installed: table inet egressgw" in status.stdout
        # Mark exemption + UDP and TCP DNS: 3 rules, not 6 (the second setup replaced them).
        assert "chain prerouting: 3 rules" in status.stdout
        assert "chain forward: 3 rules" in status.stdout
        for _ in range(2):
            done = egressgw(ns, "node", "teardown", "--config", str(config))
            assert done.returncode == 0, done.stderr
        status = egressgw(ns, "node", "status", "--config", str(config))
        assert status.returncode == 3
        assert "not installed" in status.stdout
        assert ns.run(["nft", "list", "tables"]).stdout.strip() == ""


def link(a: NetNs, a_ip: str, b: NetNs, b_ip: str, name: str) -> None:
    """A veth pair between two namespaces with an address (CIDR) on each end, both up."""
    sh("ip", "link", "add", f"{name}a", "netns", a.name, "type", "veth", "peer", f"{name}b",
       "netns", b.name)  # fmt: skip
    for ns, dev, ip in ((a, f"{name}a", a_ip), (b, f"{name}b", b_ip)):
        assert ns.run(["ip", "addr", "add", ip, "dev", dev]).returncode == 0
        assert ns.run(["ip", "link", "set", dev, "up"]).returncode == 0


UDP_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.settimeout(float(sys.argv[1]))
got = []
try:
    while True:
        got.append(s.recvfrom(100)[1][0] + ">" + s.getsockname()[0])
except TimeoutError:
    pass
print(len(got))
"""


@pytest.fixture
def node(netns_ok: None, tmp_path: Path) -> Iterator[tuple[NetNs, NetNs, NetNs, Path]]:
    """A node namespace (gateway, dnsmasq) between a pod namespace and a remote one."""
    exe = dnsmasq_path()
    if exe is None:
        pytest.skip("dnsmasq is not installed")
    with ExitStack() as stack:
        gw, pod, remote = (stack.enter_context(NetNs()) for _ in range(3))
        link(pod, "10.99.0.2/24", gw, "10.99.0.1/24", f"p{os.getpid() % 10000}")
        link(remote, "203.0.113.9/24", gw, "203.0.113.1/24", f"r{os.getpid() % 10000}")
        assert remote.run(["ip", "addr", "add", "203.0.113.10/24", "dev",
                           f"r{os.getpid() % 10000}a"]).returncode == 0  # fmt: skip
        assert pod.run(["ip", "route", "add", "default", "via", "10.99.0.1"]).returncode == 0
        assert remote.run(["ip", "route", "add", "default", "via", "203.0.113.1"]).returncode == 0
        assert gw.run(["sysctl", "-w", "net.ipv4.ip_forward=1"]).returncode == 0
        upstream = gw.command(
            dnsmasq_args(exe, 5353, {"allowed.test": "192.0.2.10"}, {}, extra=["--user=root"])
        )
        dns_proc = subprocess.Popen(upstream, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(stop_process, dns_proc)
        (tmp_path / "ips.txt").write_text("203.0.113.9\n")
        config: dict[str, Any] = {
            "proxy": {"listen": "127.0.0.1:3128"},
            "admin": {"listen": "127.0.0.1:9090"},
            "dns": {"listen": "0.0.0.0:5300", "upstreams": ["127.0.0.1:5353"]},
            "node": {"pod_cidrs": ["10.99.0.0/24"]},
            "identity": {"static": [{"cidr": "10.99.0.2/32", "namespace": "payments"}]},
            "feeds": [{"name": "ips", "url": "ips.txt", "format": "lines"}],
            "sinks": [{"type": "file", "path": "events.jsonl"}],
            "reload": {"watch": False},
        }
        blocklist = ["nft", "list", "set", "inet", "egressgw", "blocked_v4"]
        # Ready once the node firewall holds the feed's address.
        run_node_gateway(
            stack, gw, config, tmp_path, lambda: "203.0.113.9" in gw.run(blocklist).stdout
        )
        yield gw, pod, remote, tmp_path


@pytest.mark.netns
@pytest.mark.integration
def test_pod_dns_goes_to_the_dns_proxy(node: tuple[NetNs, NetNs, NetNs, Path]) -> None:
    """A pod asking any server on port 53 is answered by the gateway, attributed to its pod."""
    _gw, pod, _remote, tmp_path = node
    out = pod.run(["dig", "@203.0.113.10", "+short", "+tries=1", "+time=3", "allowed.test"])
    assert out.stdout.strip() == "192.0.2.10", out.stdout + out.stderr
    deadline = time.monotonic() + 5
    events: list[dict[str, Any]] = []
    file = tmp_path / "events.jsonl"
    while time.monotonic() < deadline and not events:
        text = file.read_text() if file.exists() else ""
        events = [json.loads(x) for x in text.splitlines() if '"allowed.test"' in x]
        time.sleep(0.1)
    assert events, "no DNS event"
    assert field(events[0], "source.ip") == "10.99.0.2"
    assert field(events[0], "kubernetes.namespace") == "payments"


@pytest.mark.netns
@pytest.mark.integration
def test_udp_to_a_listed_address_is_dropped(node: tuple[NetNs, NetNs, NetNs, Path]) -> None:
    """UDP from the pod to a feed-listed IP never arrives; to an unlisted one it does."""
    gw, pod, remote, _tmp = node
    receiver = subprocess.Popen(
        remote.command([sys.executable, "-c", UDP_RECEIVER, "2"]),
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    send = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for ip in ('203.0.113.9', '203.0.113.10'):\n"
        "    for _ in range(3): s.sendto(b'x', (ip, 9999))\n"
    )
    assert pod.run([sys.executable, "-c", send]).returncode == 0
    out, _ = receiver.communicate(timeout=10)
    assert out.strip() == "3"  # the three to 203.0.113.10 only
    counters = gw.run(["nft", "list", "chain", "inet", "egressgw", "forward"]).stdout
    assert "counter packets 3" in counters, counters
