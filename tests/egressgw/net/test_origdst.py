"""Tests of reading a redirected connection's original destination: the sockaddr parse, and in
a network namespace of the test's own, IPv4 and IPv6 clients of one dual-stack listener.
"""

import ipaddress
import shutil
import socket
import struct
import subprocess
import sys

import pytest

from egressgw.net.origdst import original_dst, parse_sockaddr
from tests.support.netns import NetNs, netns_unavailable


def test_sockaddr_in_gives_address_and_port() -> None:
    """A sockaddr_in as the kernel writes it (port in network order)."""
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 443) + bytes([203, 0, 113, 10])
    raw += bytes(8)
    assert parse_sockaddr(raw) == (ipaddress.ip_address("203.0.113.10"), 443)


def test_sockaddr_in6_gives_address_and_port() -> None:
    """A sockaddr_in6 (flowinfo before the address, scope id after)."""
    addr = ipaddress.ip_address("2001:db8::5")
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 80) + bytes(4) + addr.packed
    raw += bytes(4)
    assert parse_sockaddr(raw) == (addr, 80)


def test_short_or_foreign_sockaddr_raises() -> None:
    """Anything else is ValueError."""
    with pytest.raises(ValueError):
        parse_sockaddr(b"\x02\x00")
    with pytest.raises(ValueError):
        parse_sockaddr(struct.pack("=H", socket.AF_UNIX) + bytes(14))


def test_a_connection_nothing_redirected_has_no_original_destination() -> None:
    """A plain loopback connection: the kernel has no original destination to give."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            conn, _ = server.accept()
            with conn, pytest.raises(OSError):
                original_dst(conn)
            del client


# Run in the namespace: a dual-stack listener on [::]:15001, one IPv4 and one IPv6 client sent
# there by the redirect rules, each one's original destination as the gateway reads it.
DUAL_STACK = """
import socket
from egressgw.net.origdst import original_dst
listener = socket.socket(socket.AF_INET6)
listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
listener.bind(("::", 15001))
listener.listen()
for family, target in ((socket.AF_INET, ("10.9.9.9", 80)), (socket.AF_INET6, ("fd00::9", 443))):
    client = socket.socket(family)
    client.connect(target)
    conn, _ = listener.accept()
    ip, port = original_dst(conn)
    print(ip, port)
"""

REDIRECTS = """table inet t {
  chain out {
    type nat hook output priority -100
    ip daddr 10.9.9.9 tcp dport 80 redirect to :15001
    ip6 daddr fd00::9 tcp dport 443 redirect to :15001
  }
}
"""


@pytest.mark.netns
def test_a_dual_stack_listener_reads_ipv4_and_ipv6_original_destinations() -> None:
    """IPv4 clients of an IPv6 socket are read with the IPv4 option; IPv6 with its own."""
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed (Debian package nftables)")
    with NetNs() as ns:
        for args in (["ip", "addr", "add", "10.9.9.9/32", "dev", "lo"],
                     ["ip", "addr", "add", "fd00::9/128", "dev", "lo", "nodad"]):  # fmt: skip
            assert ns.run(args).returncode == 0
        nft = subprocess.run(
            ns.command(["nft", "-f", "-"]), input=REDIRECTS, text=True, capture_output=True
        )
        assert nft.returncode == 0, nft.stderr
        out = ns.run([sys.executable, "-c", DUAL_STACK])
        assert out.stdout.split("\n")[:2] == ["10.9.9.9 80", "fd00::9 443"], out.stderr
