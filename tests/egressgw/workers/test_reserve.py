"""The supervisor's reserved addresses: port 0 resolved once, taken addresses named, and no
connection ever waiting in the reserving socket."""

import socket

import pytest

from egressgw.app import listen_socket
from egressgw.workers.supervisor import reserve


def test_port_zero_resolves_to_one_port_the_workers_can_bind() -> None:
    """The reserved address is concrete; two workers' listeners bind it beside the reservation
    and take its connections, while the reservation itself accepts none."""
    held, address = reserve("proxy.listen", "127.0.0.1:0")
    try:
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        workers = [listen_socket(address, reuse_port=True) for _ in range(2)]
        try:
            for _ in range(8):
                with socket.create_connection((host, int(port)), timeout=5):
                    pass
        finally:
            for w in workers:
                w.close()
        with pytest.raises(ConnectionRefusedError):  # bound, never listening
            socket.create_connection((host, int(port)), timeout=5)
    finally:
        held.close()


def test_an_address_in_use_is_named_with_its_key() -> None:
    """A port another program listens on (without SO_REUSEPORT) fails with key and address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"^transparent.listen 127.0.0.1:{port}: Address already"):
            reserve("transparent.listen", f"127.0.0.1:{port}")


def test_ipv6_addresses_come_back_bracketed() -> None:
    """An IPv6 reservation is spelled as the listen keys spell it: [addr]:port."""
    try:
        held, address = reserve("proxy.listen", "[::1]:0")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    held.close()
    assert address.startswith("[::1]:") and int(address.rsplit(":", 1)[1]) > 0
