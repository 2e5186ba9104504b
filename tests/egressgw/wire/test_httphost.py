"""Tests of the HTTP Host reader (pure core): value, None for more bytes, ValueError otherwise."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressgw.wire.httphost import MAX_HEAD_SIZE, HttpHost, parse_http_host

HEAD = b"GET /x HTTP/1.1\r\nUser-Agent: curl\r\nHost: Good.test:8080\r\nAccept: */*\r\n\r\n"


def test_host_is_read_without_its_port() -> None:
    """The Host field's host part is returned as sent."""
    assert parse_http_host(HEAD) == HttpHost("Good.test")


def test_bracketed_ipv6_host_keeps_its_brackets() -> None:
    """An IPv6 literal Host is returned bracketed, without the port."""
    assert parse_http_host(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n") == HttpHost(
        "[2001:db8::1]"
    )


def test_head_without_host_has_none() -> None:
    """An HTTP/1.0 head with no Host names nothing."""
    assert parse_http_host(b"GET / HTTP/1.0\r\n\r\n") == HttpHost(None)


@pytest.mark.parametrize("cut", [1, 3, 4, 10, 20, len(HEAD) - 1])
def test_every_prefix_asks_for_more(cut: int) -> None:
    """An incomplete head is None: more bytes are needed."""
    assert parse_http_host(HEAD[:cut]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"get / HTTP/1.1\r\n\r\n",
        b"GET / SPDY/3\r\n\r\n",
        b"\x00\x01\x02",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
    ],
)
def test_what_is_not_an_http_head_raises(data: bytes) -> None:
    """Other protocols and malformed heads are ValueError."""
    with pytest.raises(ValueError):
        parse_http_host(data)


def test_a_head_past_the_limit_raises() -> None:
    """A head that never ends is refused once past MAX_HEAD_SIZE, not buffered forever."""
    with pytest.raises(ValueError, match="longer than"):
        parse_http_host(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_SIZE)


@given(st.binary(max_size=300))
def test_contract_holds_for_any_bytes(data: bytes) -> None:
    """Any input gives an HttpHost, None or ValueError: nothing else escapes."""
    try:
        result = parse_http_host(data)
    except ValueError:
        return
    assert result is None or isinstance(result, HttpHost)
