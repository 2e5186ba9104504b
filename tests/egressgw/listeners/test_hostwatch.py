"""Tests of HostWatch (every later head's Host of a plain HTTP stream), split as it may arrive."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressgw.listeners.hostwatch import HostWatch

STREAM = (
    b"GET /a HTTP/1.1\r\nHost: a.test:80\r\n\r\n"
    # A body that looks like a head is a body: its Host is nobody's.
    b"POST /b HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"20\r\nGET / HTTP/1.1\r\nHost: z.test\r\n\r\n\r\n0\r\n\r\n"
    b"PUT /c HTTP/1.1\r\nHost: b.test\r\nContent-Length: 5\r\n\r\nHost:"
    b"GET /d HTTP/1.0\r\n\r\n"
)
STREAM_HOSTS = ["a.test", "a.test", "b.test", None]


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_hosts_are_the_same_however_the_stream_is_split(cuts: list[int]) -> None:
    """Read by read or whole, the heads and only the heads are seen, in order."""
    watch = HostWatch()
    edges = [0, *sorted(cuts), len(STREAM)]
    seen: list[str | None] = []
    for start, end in itertools.pairwise(edges):
        seen += watch.feed(STREAM[start:end])
    assert seen == STREAM_HOSTS


def test_a_second_host_field_is_an_error() -> None:
    """Two Host fields: which one the destination reads is unknowable."""
    with pytest.raises(ValueError, match="more than one Host field"):
        HostWatch().feed(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n")


def test_bytes_that_are_not_http_are_an_error() -> None:
    """Garbage after a request is not passed off as a body."""
    watch = HostWatch()
    assert watch.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n") == ["a.test"]
    with pytest.raises(ValueError, match="not an HTTP/1 request"):
        watch.feed(b"\x16\x03\x01 not a request\r\n\r\n")


def test_reading_stops_at_an_upgrade() -> None:
    """After a request asking to change protocols the bytes are opaque, and not read."""
    watch = HostWatch()
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert watch.feed(upgrade + b"\x81\x05hello") == ["a.test"]
    assert watch.upgraded and watch.upgrade_at == len(upgrade)
    assert watch.feed(b"GET / HTTP/1.1\r\nHost: z.test\r\n\r\n") == []
