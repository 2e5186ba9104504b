"""Tests of the explicit proxy's client connection (fake hub and client stream)."""

import asyncio
import ipaddress
import socket
from pathlib import Path

import pytest

from egressgw.flow import Flow
from egressgw.identity.workload import Credential
from egressgw.listeners.connection import Mode
from egressgw.listeners.explicit import ClientConnection
from egressgw.net.rawstream import RawStream
from tests.support.hub import FakeHub, FakeStream, LiveHub, loopback_runtime


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


async def decided_flow(tmp_path: Path, head: bytes) -> tuple[LiveHub, Flow]:
    """Send a request head on a real client socket; the first flow the connection decided."""
    hub = LiveHub(loopback_runtime(tmp_path))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    conn = ClientConnection(hub)  # type: ignore[arg-type]
    stream = RawStream(hub.reactor, ours, conn, ("127.0.0.9", 50000))
    conn.connection_made(stream)
    stream.resume_reading()
    theirs.sendall(head)
    for _ in range(200):
        if hub.decided:
            break
        await asyncio.sleep(0.01)
    conn.close()
    hub.reactor.close()
    ours.close()  # a refusal lingers on it (close_after_reading) longer than the test
    theirs.close()
    return hub, hub.decided[0]


@pytest.mark.parametrize(
    "head",
    [
        b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"
        b"proxy-authorization: Bearer s3cret\r\n\r\n",
        b"GET http://unknown.test/ HTTP/1.1\r\nHost: unknown.test\r\n"
        b"Proxy-Authorization: Bearer s3cret\r\n\r\n",
    ],
    ids=["connect", "absolute-form"],
)
async def test_proxy_authorization_becomes_the_flows_credential(
    tmp_path: Path, head: bytes
) -> None:
    """A Proxy-Authorization field (any case) is the credential identity is asked about."""
    hub, flow = await decided_flow(tmp_path, head)
    assert flow.credential == Credential("bearer", "s3cret")
    assert "bad_credential" not in hub.errors


@pytest.mark.parametrize(
    "fields",
    [b"Proxy-Authorization: Bearer\r\n", b"Proxy-Authorization: Basic a\r\n" * 2],
    ids=["no-value", "twice"],
)
async def test_a_malformed_proxy_authorization_is_counted_and_is_no_credential(
    tmp_path: Path, fields: bytes
) -> None:
    """A malformed (or repeated) field is no credential, counted, and the flow still decided."""
    head = b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n" + fields + b"\r\n"
    hub, flow = await decided_flow(tmp_path, head)
    assert flow.credential is None and flow.verdict is not None
    assert hub.errors.count("bad_credential") == 1


def test_a_stream_lost_with_bytes_unsent_leaves_the_books() -> None:
    """The client's stream failed with bytes it never got: the connection is gone at once.

    (A failed stream keeps its unsent bytes; counting them as "still flushing" left such a
    connection on the gateway's books for good.)
    """
    hub, stream, conn = connect(buffered=4096)  # what the failed stream never sent
    conn.connection_lost(ConnectionResetError("reset by peer"))
    assert conn.mode is Mode.CLOSED and stream.closed_how == "close"
    assert hub.closed == [conn] and not hub.open


@pytest.mark.parametrize(("earlier", "recorded"), [(None, "cut"), ("upstream: reset", None)])
def test_close_records_its_reason_unless_the_flow_already_failed(
    earlier: str | None, recorded: str | None
) -> None:
    """close(reason) sets the ended flow's error before its end event; an earlier error stays."""
    hub, _, conn = connect(buffered=0)
    conn.mode = Mode.TUNNEL
    conn.flow = flow = Flow(ipaddress.ip_address("127.0.0.9"), 50000, 0.0, 0.0)
    flow.error = earlier
    conn.close("cut")
    assert hub.ended == [flow] and flow.error == (recorded or earlier)
