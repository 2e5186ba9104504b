"""The original destination of a connection nftables redirected (REDIRECT / DNAT).

The kernel's conntrack keeps the address a redirected connection was sent to; the accepted
socket reads it with ``SO_ORIGINAL_DST`` (IPv4, at ``SOL_IP``) or ``IP6T_SO_ORIGINAL_DST``
(IPv6, at ``SOL_IPV6``, which is ``IPPROTO_IPV6``; both option number 80). Either answers with
a ``sockaddr_in`` / ``sockaddr_in6`` whose port and address are in network byte order.

A dual-stack listener (bound to ``::``) accepts IPv4 clients on IPv6 sockets: their conntrack
entry is IPv4, so the IPv6 option finds nothing (ENOENT) and the IPv4 one, asked of the same
socket, answers.
"""

from __future__ import annotations

import _socket
import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_SOCKADDR_IN6 = 28

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_sockaddr(raw: bytes) -> tuple[IPAddress, int]:
    """A ``sockaddr_in`` or ``sockaddr_in6`` as the kernel wrote it -> (address, port)."""
    if len(raw) < 8:
        raise ValueError(f"sockaddr of {len(raw)} bytes")
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return ipaddress.IPv6Address(raw[8:24]), port
    raise ValueError(f"sockaddr of family {family}")


def original_dst(sock: _socket.socket) -> tuple[IPAddress, int]:
    """Where the client sent this redirected connection (OSError when nothing redirected it)."""
    if sock.family == socket.AF_INET6:
        try:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
        except FileNotFoundError:
            pass  # an IPv4 client of a dual-stack listener (see above)
        else:
            return parse_sockaddr(raw)
    return parse_sockaddr(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))
