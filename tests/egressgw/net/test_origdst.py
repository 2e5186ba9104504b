"""Tests of reading a redirected connection's original destination (the sockaddr parse)."""

import ipaddress
import socket
import struct

import pytest

from egressgw.net.origdst import original_dst, parse_sockaddr


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
