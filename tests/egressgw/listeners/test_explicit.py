"""Tests of the proxy's connection shell (fake hub and client stream) and request heads."""

import ipaddress
from typing import Any

import pytest

from egressgw.config.model import ProxyConfig
from egressgw.decision.names import Host
from egressgw.flow import Flow
from egressgw.listeners.explicit import (
    _TRANSITIONS,
    ClientConnection,
    IllegalTransition,
    Mode,
    Request,
    _request_head,
)
from egressgw.wire.framing import parse_request_framing


class FakeHub:
    """The gateway as a connection sees it; records what it is told."""

    def __init__(self) -> None:
        self.limits = ProxyConfig()
        self.clock = 0.0
        self.open: set[ClientConnection] = set()
        self.closed: list[ClientConnection] = []

    def connection_opened(self, conn: ClientConnection) -> str | None:
        self.open.add(conn)
        return None

    def connection_closed(self, conn: ClientConnection) -> None:
        self.open.discard(conn)
        self.closed.append(conn)


class FakeStream:
    """A client stream holding ``buffered`` bytes it has not sent yet."""

    def __init__(self, buffered: int) -> None:
        self.buffered = buffered
        self.closed_how = ""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.9", 50000) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def close(self) -> None:
        self.closed_how = "close"

    def close_quietly(self) -> None:
        self.closed_how = "quietly"


def connect(buffered: int) -> tuple[FakeHub, FakeStream, ClientConnection]:
    """A connection made on a fake stream."""
    hub, stream = FakeHub(), FakeStream(buffered)
    conn = ClientConnection(hub)  # type: ignore[arg-type]
    conn.connection_made(stream)  # type: ignore[arg-type]
    return hub, stream, conn


def test_a_connection_with_nothing_to_send_is_forgotten_when_it_closes() -> None:
    """Closing with an empty client buffer closes the stream quietly and leaves the books."""
    hub, stream, conn = connect(buffered=0)
    assert conn in hub.open and conn.peer_text == "127.0.0.9"
    conn.close()
    assert conn.mode is Mode.CLOSED
    assert stream.closed_how == "quietly"
    assert hub.closed == [conn] and not hub.open


def test_a_connection_still_sending_counts_as_open_until_its_stream_is_gone() -> None:
    """Bytes still buffered for the client keep the connection open (a drain waits for it)."""
    hub, stream, conn = connect(buffered=4096)
    conn.close()
    assert stream.closed_how == "close"  # flushes, then reports the loss
    assert conn in hub.open and not hub.closed
    conn.connection_lost(None)
    assert hub.closed == [conn] and not hub.open


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


def test_every_mode_has_its_transitions_and_closed_is_final() -> None:
    """The table covers every Mode; CLOSED leads nowhere and every other mode can close."""
    assert set(_TRANSITIONS) == set(Mode)
    assert _TRANSITIONS[Mode.CLOSED] == ()
    assert all(
        Mode.CLOSED in allowed for mode, allowed in _TRANSITIONS.items() if mode is not Mode.CLOSED
    )


@pytest.mark.parametrize("old", list(Mode), ids=lambda m: m.name)
@pytest.mark.parametrize("new", list(Mode), ids=lambda m: m.name)
def test_a_transition_is_made_only_when_the_table_allows_it(old: Mode, new: Mode) -> None:
    """_to changes the mode along the table and raises IllegalTransition for any other pair."""
    _, _, conn = connect(buffered=0)
    conn.mode = old
    if new in _TRANSITIONS[old]:
        conn._to(new)
        assert conn.mode is new
    else:
        with pytest.raises(IllegalTransition) as raised:
            conn._to(new)
        assert conn.mode is old and (raised.value.old, raised.value.new) == (old, new)
