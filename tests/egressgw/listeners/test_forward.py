"""Tests of absolute-form forwarding: targets, the request head sent upstream, and the
upstream's answers relayed (on a fake client and transport).
"""

import ipaddress

import pytest

from egressgw.decision.names import Host
from egressgw.flow import Flow
from egressgw.listeners.forward import Request, _parse_target, _request_head, via_field
from egressgw.listeners.upstreams import HttpUpstream, UpstreamFailure
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
    host, port, path, canonical, _ = _parse_target(url)
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
    """The client side an upstream relays to: keeps what is written, counted and reported."""

    via_header = b"Via: 1.1 egressgw\r\n"

    def __init__(self) -> None:
        self.out = b""
        self.status = 0
        self.done: list[bool] = []
        self.failed: list[tuple[UpstreamFailure, bool]] = []

    def write(self, data: bytes) -> None:
        """Keep the bytes for the client."""
        self.out += data

    def flow_bytes_in(self, n: int) -> None:
        """Bytes from the upstream (not counted here)."""

    def note_status(self, status: int) -> None:
        """Keep the forwarded status."""
        self.status = status

    def pause_client_reading(self) -> None:
        """Not paused here."""

    def resume_client_reading(self) -> None:
        """Not paused here."""

    def response_done(self, reusable: bool) -> None:
        """Keep the outcome."""
        self.done.append(reusable)

    def upstream_failed(self, failure: UpstreamFailure, answered_nothing: bool) -> None:
        """Keep the failure."""
        self.failed.append((failure, answered_nothing))


class Transport:
    """An upstream stream that only remembers being closed."""

    closed = False

    def close_quietly(self) -> None:
        """Close."""
        self.closed = True


def upstream(http10: bool = False) -> tuple[FakeHub, Client, Transport, HttpUpstream]:
    """An upstream connection carrying a GET of a client."""
    hub, client, transport = FakeHub(), Client(), Transport()
    up = HttpUpstream(hub, hub.upstreams, ("127.0.0.1", 80, None))  # type: ignore[arg-type]
    up.transport = transport  # type: ignore[assignment]
    up.begin(client, head_only=False, http10=http10, keep_alive=True)
    return hub, client, transport, up


def test_an_http10_client_gets_a_chunked_answer_dechunked_and_delimited_by_the_close() -> None:
    """No chunked coding toward HTTP/1.0: the body goes plain and the connection will close."""
    _, client, _, up = upstream(http10=True)
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
    assert client.done == [True] and up.client_close


def test_a_keep_alive_answer_is_reported_whole_and_reusable() -> None:
    """A Content-Length answer ends the exchange; the upstream may be parked."""
    _, client, transport, up = upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client.out.endswith(b"\r\n\r\nok") and client.done == [True]
    assert not transport.closed and up.client is None


def test_bytes_after_the_answer_in_the_same_read_are_not_the_next_answer() -> None:
    """A second response behind the first is unsolicited: the first is relayed, the upstream
    closed and not reusable, the second never reaches the client.
    """
    hub, client, transport, up = upstream()
    up.data_received(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    )
    assert client.done == [False] and b"evil" not in client.out and transport.closed
    assert hub.errors == ["bad_upstream_response"]


def test_bytes_from_an_upstream_asked_nothing_end_it() -> None:
    """An answer nobody asked for is not relayed: the upstream is closed and the error counted."""
    hub, client, transport = FakeHub(), Client(), Transport()
    up = HttpUpstream(hub, hub.upstreams, ("127.0.0.1", 80, None))  # type: ignore[arg-type]
    up.transport = transport  # type: ignore[assignment]
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert transport.closed and client.out == b""
    assert hub.errors == ["bad_upstream_response"]


def test_a_response_head_late_past_the_response_timeout_is_a_504() -> None:
    """No head by its deadline: the exchange fails with 504, the upstream closes."""
    _, client, transport, up = upstream()
    up.head_deadline = 10.0
    up.expire(9.0)
    assert not client.failed
    up.expire(11.0)
    [(failure, nothing)] = client.failed
    assert (failure.status, failure.kind, nothing) == (504, "response_timeout", True)
    assert transport.closed


def test_an_upstream_closed_before_answering_says_it_answered_nothing() -> None:
    """Closed with no byte of a response: a failure the client may retry on a new upstream."""
    _, client, _, up = upstream()
    up.connection_lost(None)
    [(failure, nothing)] = client.failed
    assert (failure.status, failure.kind, nothing) == (502, "upstream_closed", True)


def test_an_upstream_closed_mid_answer_has_answered() -> None:
    """Closed after part of a length-framed answer: a failure that cannot be retried."""
    _, client, _, up = upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    up.connection_lost(None)
    [(failure, nothing)] = client.failed
    assert failure.kind == "upstream_closed" and not nothing


def test_the_via_field_is_one_header_line() -> None:
    """The gateway's Via field is a whole header line, CRLF included."""
    assert via_field("egressgw.example") == b"Via: 1.1 egressgw.example\r\n"
