"""Tests of the explicit proxy's client connection (fake hub and client stream)."""

from egressgw.listeners.connection import Mode
from egressgw.listeners.explicit import ClientConnection
from tests.support.hub import FakeHub, FakeStream


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
