"""Tests of absolute-form forwarding's pure parts: targets and the request head sent upstream."""

import ipaddress

import pytest

from egressgw.decision.names import Host
from egressgw.flow import Flow
from egressgw.listeners.forward import Request, _parse_target, _request_head, via_field
from egressgw.wire.framing import parse_request_framing


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


def test_the_via_field_is_one_header_line() -> None:
    """The gateway's Via field is a whole header line, CRLF included."""
    assert via_field("egressgw.example") == b"Via: 1.1 egressgw.example\r\n"
