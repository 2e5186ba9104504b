"""Tests of absolute-form forwarding: targets, the request head sent upstream, and the
upstream's answers relayed (on a fake client and transport).
"""

import asyncio
import ipaddress
from typing import Any

import pytest

from egressgw.decision.names import Host
from egressgw.flow import Flow
from egressgw.listeners.forward import (
    Request,
    UpstreamFailure,
    _HttpUpstream,
    _parse_target,
    _request_head,
    via_field,
)
from egressgw.wire.framing import parse_request_framing
from tests.support.hub import FakeHub


def test_request_head_drops_hop_by_hop_and_named_headers_and_chains_via() -> None:
    """A header named by a later Connection header is dropped; an incoming Via is extended."""
    req = Request()
    req.method = b"GET"
    req.headers = [
        (b"X-Hop", b"secret"),
        (b"Host", b"elsewhere.test"),
        (b"Via", b"1.1 first"),
        (b"Accept", b"*/*"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"Keep-Alive", b"timeout=5"),
    ]
    flow = Flow(ipaddress.ip_address("127.0.0.9"), 50000, 0.0, 0.0)
    flow.host, flow.port = Host("allowed.test", None), 8080
    head = _request_head(req, b"/x?y=1", flow, b"Via: 1.1 egressgw\r\n")
    assert head == (
        b"GET /x?y=1 HTTP/1.1\r\nHost: allowed.test:8080\r\n"
        b"Accept: */*\r\n"
        b"Via: 1.1 first, 1.1 egressgw\r\n"
        b"\r\n"
    )


def test_request_head_forwards_the_length_the_body_was_read_with() -> None:
    """`Connection: Content-Length` cannot remove the length: the body's framing goes along."""
    req = Request()
    req.method = b"POST"
    req.headers = [
        (b"Connection", b"Content-Length, Transfer-Encoding, Host"),
        (b"Content-Length", b"50"),
    ]
    req.framing = parse_request_framing(req.headers)
    flow = Flow(ipaddress.ip_address("127.0.0.9"), 50000, 0.0, 0.0)
    flow.host, flow.port = Host("allowed.test", None), 8080
    head = _request_head(req, b"/benign", flow, b"Via: 1.1 egressgw\r\n")
    assert head == (
        b"POST /benign HTTP/1.1\r\nHost: allowed.test:8080\r\n"
        b"Via: 1.1 egressgw\r\n"
        b"Content-Length: 50\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (b"http://Web.Test/a?b=1", ("web.test", 80, b"/a?b=1", "http://web.test/a?b=1")),
        (b"http://[::1]:8080", ("::1", 8080, b"/", "http://[::1]:8080/")),
    ],
)
def test_an_absolute_target_gives_host_port_path_and_canonical_url(
    url: bytes, expected: tuple[str, int, bytes, str]
) -> None:
    """The target is split into what is connected to and what is sent and recorded."""
    host, port, path, canonical = _parse_target(url)
    assert (host.name or str(host.ip), port, path, canonical) == expected


@pytest.mark.parametrize(
    ("url", "error"),
    [
        (b"https://web.test/", "use CONNECT for TLS"),
        (b"/origin-form", "absolute http:// URL"),
        (b"http://web.test:0/", "port 0"),
    ],
)
def test_a_target_that_cannot_be_forwarded_is_refused(url: bytes, error: str) -> None:
    """https:// in absolute form, origin form and port 0 are errors with a reason."""
    with pytest.raises(ValueError, match=error):
        _parse_target(url)


class Client:
    """The client side an upstream relays to: keeps what is written and counted."""

    via_header = b"Via: 1.1 egressgw\r\n"

    def __init__(self) -> None:
        self.hub = FakeHub()
        self.out = b""
        self.status = 0

    def write(self, data: bytes) -> None:
        """Keep the bytes for the client."""
        self.out += data

    def flow_bytes_in(self, n: int) -> None:
        """Bytes from the upstream (not counted here)."""

    def note_status(self, status: int) -> None:
        """Keep the forwarded status."""
        self.status = status


class Transport:
    """An upstream transport that only remembers being closed."""

    closed = False

    def close(self) -> None:
        """Close."""
        self.closed = True


def upstream(http10: bool = False) -> tuple[Client, Transport, _HttpUpstream, Any]:
    """An upstream connection awaiting the answer to a GET."""
    client, transport = Client(), Transport()
    up = _HttpUpstream(client, 8192)  # type: ignore[arg-type]
    up.connection_made(transport)  # type: ignore[arg-type]
    done = up.begin(head_only=False, http10=http10, keep_alive=True)
    return client, transport, up, done


async def test_an_http10_client_gets_a_chunked_answer_dechunked_and_delimited_by_the_close() -> (
    None
):
    """No chunked coding toward HTTP/1.0: the body goes plain and the connection will close."""
    client, _, up, done = upstream(http10=True)
    up.data_received(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    head, _, body = client.out.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 200 OK",
        b"X-A: 1",
        b"Via: 1.1 egressgw",
        b"Connection: close",
    ]
    assert body == b"hello world" and client.status == 200
    assert done.done() and up.client_close


async def test_bytes_from_an_upstream_asked_nothing_end_it() -> None:
    """An answer nobody asked for is not relayed: the upstream is closed and the error counted."""
    client, transport = Client(), Transport()
    up = _HttpUpstream(client, 8192)  # type: ignore[arg-type]
    up.connection_made(transport)  # type: ignore[arg-type]
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert transport.closed and client.out == b""
    assert client.hub.errors == ["bad_upstream_response"]


async def test_a_response_head_late_past_the_response_timeout_is_a_504() -> None:
    """No head within proxy.response_timeout: the exchange fails with 504, the upstream closes."""
    _, transport, up, done = upstream()
    up.expect_head_within(0.01)
    with pytest.raises(UpstreamFailure) as failed:
        await asyncio.wait_for(done, 5)
    assert (failed.value.status, failed.value.kind) == (504, "response_timeout")
    assert transport.closed


def test_the_via_field_is_one_header_line() -> None:
    """The gateway's Via field is a whole header line, CRLF included."""
    assert via_field("egressgw.example") == b"Via: 1.1 egressgw.example\r\n"
