"""Tests of the TLS ClientHello reader (pure core), against hellos made by the ssl module."""

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egressgw.wire.tlshello import ClientHello, parse_client_hello


def real_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The bytes Python's own TLS client sends first."""
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    if server_name is None:
        ctx.check_hostname = False
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_reads_sni_and_alpn() -> None:
    """A real ClientHello yields its SNI and ALPN list."""
    hello = real_hello("api.partner.test", ["h2", "http/1.1"])
    assert parse_client_hello(hello) == ClientHello("api.partner.test", ("h2", "http/1.1"))


def test_every_prefix_needs_more() -> None:
    """Every strict prefix of a valid ClientHello asks for more bytes, never errors."""
    hello = real_hello("allowed.test")
    for cut in range(len(hello)):
        assert parse_client_hello(hello[:cut]) is None


def test_hello_split_over_records() -> None:
    """A ClientHello fragmented over two TLS records is reassembled."""
    hello = real_hello("allowed.test")
    body = hello[5:]
    half = len(body) // 2
    rec = lambda part: b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part  # noqa: E731
    assert parse_client_hello(rec(body[:half]) + rec(body[half:])) == parse_client_hello(hello)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x16\x03\x01\x00\x05\x02\x00",
        b"ping",
        b"\x16X",
    ],
)
def test_not_tls(data: bytes) -> None:
    """Plain HTTP, SSH, and a handshake that is not a ClientHello are refused."""
    with pytest.raises(ValueError):
        parse_client_hello(data)


@given(st.binary(max_size=600))
def test_fuzz_contract(data: bytes) -> None:
    """Arbitrary bytes give a ClientHello, None, or ValueError: never another exception."""
    try:
        result = parse_client_hello(data)
    except ValueError:
        return
    assert result is None or isinstance(result, ClientHello)


@given(st.binary(min_size=1, max_size=300))
def test_fuzz_mutated_real_hello(noise: bytes) -> None:
    """A real ClientHello with bytes overwritten still honours the contract."""
    hello = bytearray(real_hello("allowed.test"))
    for i, b in enumerate(noise):
        hello[(i * 7919) % len(hello)] = b
    try:
        result = parse_client_hello(bytes(hello))
    except ValueError:
        return
    assert result is None or isinstance(result, ClientHello)
