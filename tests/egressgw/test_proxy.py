"""Shell tests of a client connection's closing, with a fake hub and a fake client stream."""

from typing import Any

from egressgw.config import ProxyConfig
from egressgw.proxy import ClientConnection, Mode


class FakeHub:
    """The gateway as a connection sees it; records what it is told."""

    def __init__(self) -> None:
        self.limits = ProxyConfig()
        self.clock = 0.0
        self.open: set[ClientConnection] = set()
        self.closed: list[ClientConnection] = []

    def connection_opened(self, conn: ClientConnection) -> bool:
        self.open.add(conn)
        return True

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
