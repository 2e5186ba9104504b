"""Tests of absolute-form forwarding: the request head sent upstream."""

import ipaddress

from egressgw.decision.names import Host
from egressgw.flow import Flow
from egressgw.listeners.forward import Request, _request_head
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
