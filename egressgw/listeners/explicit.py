"""The explicit proxy: CONNECT tunnels and absolute-form HTTP/1.1 forwarding.

Client connections and the destination side of tunnels are ``RawStream``s (egressgw.net.rawstream:
sockets on the proxy's own epoll set, no Transport or Task per connection); the upstream side of
absolute-form requests is an asyncio Protocol, one connection kept per client for keep-alive.
Both are opened by egressgw.net.dial, the one place outbound connections are made.

Connection states (``Mode``; ``_TRANSITIONS`` lists every change allowed, ``_to`` makes them):

    HEAD      reading a request head (httptools/llhttp parses; limits on size, count, time)
    CHECKING  the flow is being decided (resolution, guard, feeds, policy); input is buffered
    TUNNEL    CONNECT accepted: bytes relayed both ways; the client's first bytes are read as a
              TLS ClientHello (SNI, or plain TCP) and the flow is decided again before they pass
    HTTP      absolute-form requests relayed one at a time (pipelined requests wait their turn)
    CLOSED    done

Rules:

- A refusal is an HTTP answer (403 with ``X-Egressgw-Reason``, 400, 405, 431, 502, 503, 504) sent
  before any byte reaches a destination; after a tunnel is established a refusal closes it.
  After an answer that closes, the client's input is read and dropped until its EOF or
  ``REFUSAL_LINGER``: a close with unread input would be a reset, not the answer.
- A tunnel's outcome: a client reset (RST) after the destination sent bytes and every one of
  them was handed to the client's socket is a normal close (clients close with unread input,
  such as a TLS close_notify, and the kernel resets: the exchange itself was whole); a reset
  before any byte from the destination, or with bytes still undelivered, is a failure with
  the error in the event. The gateway cannot see whether the client application read them.
- Every state has a time limit: a request head ``head_timeout`` (408), deciding the resolver's
  timeout (502), connecting ``connect_timeout`` (504), the response head ``response_timeout``
  (504), no traffic ``idle_timeout`` (closed); each counted by kind and recorded in the event.
- Backpressure: each side's transport pauses the other side's reading when its write buffer is
  full, so a slow reader never makes the gateway buffer without bound.
- An HTTP/1.0 client is answered in a version it understands: no 1xx, a chunked body
  de-chunked and delimited by the close, ``Connection: close`` unless it asked for keep-alive
  and the length is known; a transfer coding it cannot know is a 502.
- An ``Upgrade: h2c`` offer in absolute form is dropped (with ``HTTP2-Settings``) and the request
  forwarded as HTTP/1.1, as Squid does; other upgrades (websocket) are refused with 501: a
  protocol that takes over the connection goes through CONNECT.
- One connection's trouble (malformed input, a slow peer, an unreachable upstream) ends that
  connection only; errors are counted by kind.
"""

from __future__ import annotations

import _socket
import asyncio
import enum
import functools
import ipaddress
import socket
import time
from collections import deque
from http import HTTPStatus
from typing import Any, Protocol, cast

import httptools
import structlog

from egressgw.config.model import ProxyConfig
from egressgw.decision.names import Host, parse_authority, parse_host
from egressgw.decision.path import Runtime, check_flow, check_flow_now, recheck_tunnel
from egressgw.decision.verdict import Verdict
from egressgw.flow import Flow, ip_text
from egressgw.net.dial import Dial, dial, open_socket
from egressgw.net.rawstream import RawStream, Reactor
from egressgw.wire import framing
from egressgw.wire.responses import CONNECT_ESTABLISHED, CONTINUE, to_error_response
from egressgw.wire.tlshello import MAX_HELLO_SIZE, TLS_HANDSHAKE, parse_client_hello
from siem.tasks import spawn

log = structlog.get_logger("egressgw.listeners.explicit")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}

# Any method the parser knows is forwarded in absolute form (WebDAV's PROPFIND and the like
# included), except these, answered 405: TRACE echoes the request back, cookies and credentials
# included, to whatever script can read the answer.
REFUSED_METHODS = frozenset({b"TRACE"})
# Seconds a refused client may go on sending (read and dropped) before its connection closes:
# closing with its input unread would reset the connection, and the client might never read
# the refusal (RawStream.close_after_reading).
REFUSAL_LINGER = 2.0
# Bytes of a tunnel's first client bytes buffered while its flow is decided. (Absolute-form
# requests have their own limits: proxy.max_pending_bytes and proxy.max_pipelined_requests.)
MAX_PENDING_BODY = 256 * 1024


class Hub(Protocol):
    """What a connection needs from the gateway around it."""

    runtime: Runtime
    limits: ProxyConfig
    loop: asyncio.AbstractEventLoop
    reactor: Reactor  # the epoll set of the proxy's sockets
    clock: float  # a coarse monotonic clock, updated by the idle sweeper

    def flow_decided(self, flow: Flow) -> None:
        """Record a decided flow (event and metrics)."""
        ...

    def flow_ended(self, flow: Flow) -> None:
        """Record a finished flow (event and metrics)."""
        ...

    def count_error(self, kind: str) -> None:
        """Count an error by kind."""
        ...

    def tunnel_opened(self) -> None:
        """A tunnel started relaying."""
        ...

    def tunnel_closed(self) -> None:
        """A tunnel stopped relaying."""
        ...

    def connection_opened(self, conn: ClientConnection) -> str | None:
        """Register a client connection (None), or refuse it: which limit it would pass."""
        ...

    def connection_closed(self, conn: ClientConnection) -> None:
        """Forget a client connection."""
        ...


class Mode(enum.Enum):
    """Where a client connection is in its life (see the module docstring)."""

    HEAD = 1
    CHECKING = 2
    TUNNEL = 3
    HTTP = 4
    CLOSED = 5

    # The modes this one may change to, from _TRANSITIONS (a tuple on the member: looking an
    # Enum up in a dict or set calls its Python-level __hash__, twice per change).
    allowed: tuple[Mode, ...]


# Every change of Mode, as data (h11's _state.py): ClientConnection._to refuses any other. A
# connection that forwarded absolute-form requests may still turn into a tunnel (HTTP ->
# CHECKING), once every earlier answer is out; nothing comes back from a tunnel or from CLOSED.
_TRANSITIONS: dict[Mode, tuple[Mode, ...]] = {
    Mode.HEAD: (Mode.CHECKING, Mode.HTTP, Mode.CLOSED),
    Mode.CHECKING: (Mode.TUNNEL, Mode.CLOSED),
    Mode.TUNNEL: (Mode.CLOSED,),
    Mode.HTTP: (Mode.CHECKING, Mode.CLOSED),
    Mode.CLOSED: (),
}
for _mode, _allowed in _TRANSITIONS.items():
    _mode.allowed = _allowed


class IllegalTransition(RuntimeError):
    """A connection was told to change Mode in a way _TRANSITIONS does not allow (a bug)."""

    def __init__(self, old: Mode, new: Mode) -> None:
        super().__init__(f"connection mode {old.name} -> {new.name} is not allowed")
        self.old = old
        self.new = new


class _Refuse(Exception):
    """Raised inside parser callbacks to answer with ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class UpstreamFailure(ConnectionError):
    """An exchange with an upstream failed: the status to answer and the error kind to count."""

    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.kind = kind


class Request:
    """One parsed request head waiting to be relayed."""

    __slots__ = (
        "body_done",
        "framing",
        "head_size",
        "headers",
        "http10",
        "keep_alive",
        "method",
        "url",
    )

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.head_size = 0  # target and header lines, as llhttp delivers them
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.http10 = False  # an HTTP/1.0 client: answered without chunked coding or 1xx
        self.framing = framing.NO_BODY  # as read, and so as forwarded
        self.body_done = False


class _Nobody:
    """The callbacks of the parser a closed connection keeps (it is never fed)."""


_NO_PARSER = httptools.HttpRequestParser(_Nobody())
_NO_RESPONSE_PARSER = httptools.HttpResponseParser(_Nobody())


class _BodyResumed:
    """Callbacks of the parser that resumes a request after an h2c offer with a body.

    It is first fed a made-up head with the offer's framing: those callbacks are swallowed.
    Everything after (the body, later requests) goes to the connection.
    """

    __slots__ = ("conn", "in_head")

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.in_head = True

    def on_message_begin(self) -> None:
        if not self.in_head:
            self.conn.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.in_head:
            self.conn.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            self.conn.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.in_head:
            self.in_head = False
        else:
            self.conn.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.conn.on_body(body)

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()


class _TunnelUpstream:
    """The destination side of a tunnel as its RawStream sees it: everything goes to the client."""

    __slots__ = ("client",)

    def __init__(self, client: ClientConnection) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.from_upstream(data)

    def eof_received(self) -> bool:
        self.client.upstream_eof()
        return True  # the client may still send: keep the half-closed stream

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.client.pause_client_reading()

    def resume_writing(self) -> None:
        self.client.resume_client_reading()


class _HttpUpstream(asyncio.Protocol):
    """The upstream side of absolute-form forwarding: parses responses and relays them."""

    def __init__(self, client: ClientConnection, max_header_bytes: int) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[bool] | None = None
        self.head_only = False
        self.http10 = False  # the client's version: it gets no 1xx and no chunked coding
        self.chunked = False  # the body is re-chunked toward the client
        self.close_delimited = False  # the upstream's body runs to its close
        self.keep_alive = True  # the client asked to keep its connection
        self.client_close = False  # the client was told Connection: close
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.in_head = False  # a response head is expected or under way
        self.head_timer: asyncio.TimerHandle | None = None  # proxy.response_timeout
        self.raw_head = 0  # bytes received since that head began
        self.max_header_bytes = max_header_bytes
        self.closed = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.done is None or (self.done.done() and not self.in_head):
            # Nothing was asked: bytes now are not an answer to anything. Refuse the connection
            # rather than relay them (or fold them into the next exchange's answer).
            self.client.hub.count_error("bad_upstream_response")
            self._fail(502, "bad_upstream_response", "unsolicited bytes from upstream")
            return
        self.client.flow_bytes_in(len(data))
        if self.in_head:
            self.raw_head += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _Refuse):
                self._fail(cause.status, "bad_upstream_response", cause.reason)
            else:
                log.error("response parser callback failed", error=repr(cause))
                self._fail(502, "internal", "internal error")
            return
        except httptools.HttpParserError as e:
            self._fail(502, "bad_upstream_response", f"malformed response from upstream: {e}")
            return
        except httptools.HttpParserUpgrade:
            self._fail(502, "bad_upstream_response", "upstream switched protocols unasked")
            return
        # A head still incomplete after this many bytes is too large: checked here, not only per
        # complete header line, because the parser keeps concatenating a partial line (a header
        # that never ends would otherwise cost memory and quadratic time without bound).
        if self.in_head and self.raw_head > self.max_header_bytes:
            self._fail(
                502,
                "upstream_head_too_large",
                f"upstream response head larger than {self.max_header_bytes} bytes",
            )

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        if self.done is not None and not self.done.done():
            if self.close_delimited and self.status:
                self.done.set_result(False)
            else:
                self.done.set_exception(
                    UpstreamFailure(
                        502, "upstream_closed", "upstream closed before the response ended"
                    )
                )
        # Unlink the cycles (transport and parser point back here) for reference counting.
        self.transport = None
        self.parser = _NO_RESPONSE_PARSER

    def pause_writing(self) -> None:
        self.client.pause_client_reading()

    def resume_writing(self) -> None:
        self.client.resume_client_reading()

    # -- an exchange
    def begin(self, head_only: bool, http10: bool, keep_alive: bool) -> asyncio.Future[bool]:
        """Expect one response to a request (HEAD, from an HTTP/1.0 client, asking for
        keep-alive); the future says whether the upstream connection stays reusable.
        """
        self.done = done = asyncio.get_running_loop().create_future()
        # An exchange the client abandoned no longer awaits its outcome: mark a failure read,
        # so a later failure is not reported as "Future exception was never retrieved".
        done.add_done_callback(_read_outcome)
        self.head_only = head_only
        self.http10 = http10
        self.keep_alive = keep_alive
        self.status = 0
        self.headers = []
        self.head_size = 0
        self.in_head = True
        self.raw_head = 0
        return self.done

    def expect_head_within(self, seconds: float) -> None:
        """The request is sent: its response head must begin to end within ``seconds``."""
        if self.in_head and self.head_timer is None and self.transport is not None:
            self.head_timer = asyncio.get_running_loop().call_later(
                seconds,
                self._fail,
                504,
                "response_timeout",
                f"no response head within {seconds:g}s",
            )

    def _stop_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _fail(self, status: int, kind: str, reason: str) -> None:
        """End the exchange with an error (answered ``status`` if no head went out) and close."""
        self._stop_timer()
        if self.done is not None and not self.done.done():
            self.done.set_exception(UpstreamFailure(status, kind, reason))
        if self.transport is not None:
            self.transport.close()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.done is None or (self.done.done() and not self.in_head):
            raise _Refuse(502, "unsolicited response from upstream")
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_header_bytes:
            raise _Refuse(502, "upstream response head too large")
        if self.in_head:
            self.headers.append((name, value))
        # else a trailer field: counted against the limit, never forwarded as a head field

    def on_status(self, status: bytes) -> None:
        pass

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status == 101:
            raise _Refuse(502, "upstream switched protocols (101) though no upgrade was asked")
        if 100 <= self.status < 200:
            if self.status == 100 and not self.http10:  # HTTP/1.0 knows no 1xx
                self.client.write(CONTINUE)
            self.headers = []
            self.head_size = self.raw_head = 0
            return
        self.in_head = False
        self._stop_timer()
        try:
            fr = framing.parse_response_framing(self.status, self.headers, self.head_only)
        except ValueError as e:
            raise _Refuse(502, f"upstream response framing: {e}") from None
        http10 = self.http10
        try:
            framing_fields = framing.to_framing_fields(fr, chunked_ok=not http10)
        except ValueError as e:
            raise _Refuse(502, f"upstream response: {e}") from None
        out = [b"HTTP/1.1 %d %s\r\n" % (self.status, _phrase(self.status))]
        for _, name, value in framing.forwarded_fields(self.headers):
            out.append(name + b": " + value + b"\r\n")
        chunked = fr.kind is framing.Kind.CHUNKED
        self.close_delimited = fr.kind is framing.Kind.CLOSE
        # An HTTP/1.0 client gets a chunked body de-chunked, delimited by the close, and keeps
        # the connection only when it asked to and the length is known.
        self.chunked = chunked and not http10
        self.client_close = self.close_delimited or (http10 and (chunked or not self.keep_alive))
        out.append(framing_fields)
        out.append(self.client.via_header)
        if self.client_close:
            out.append(b"Connection: close\r\n")
        elif http10:
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        self.client.write(b"".join(out))
        self.client.note_status(self.status)
        # llhttp cannot be told the request was HEAD: end here and do not reuse the socket.
        if self.head_only and self.done is not None and not self.done.done():
            self.done.set_result(False)

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            return
        if self.chunked:
            self.client.write(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.client.write(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200 or self.head_only:
            return
        if self.chunked:
            self.client.write(b"0\r\n\r\n")
        if self.done is not None and not self.done.done():
            self.done.set_result(self.parser.should_keep_alive() and not self.close_delimited)


def _read_outcome(done: asyncio.Future[bool]) -> None:
    if not done.cancelled():
        done.exception()


_PHRASES = {s.value: s.phrase.encode() for s in HTTPStatus}


def _phrase(status: int) -> bytes:
    return _PHRASES.get(status, b"Unknown")


class ClientConnection:
    """One client of the explicit proxy (the protocol of a RawStream)."""

    # State with its initial value, as class attributes: a connection sets only what it uses
    # (most are tunnels, which never touch the HTTP forwarding state), so creating one costs a
    # few stores instead of thirty.
    mode = Mode.HEAD
    transport: RawStream | None = None
    peer: tuple[IPAddress, int] = (ipaddress.IPv4Address(0), 0)
    peer_text = ""
    flow: Flow | None = None
    request: Request | None = None
    raw_head = 0  # bytes read since the parser last delivered a head, body bytes or a message end
    awaiting_head = True
    items: deque[Request | bytes | None] | None = None  # absolute-form requests and bodies
    items_waiter: asyncio.Future[None] | None = None
    pending_bytes = 0  # of request heads and bodies read, not yet sent upstream
    pending_requests = 0  # request heads read, not yet taken up
    reading_paused = False
    peer_full = False  # the upstream's (or tunnel destination's) write buffer is full
    client_full = False  # the client's write buffer is full: it is not reading its answers
    http_task: asyncio.Task[Any] | None = None
    upstream: _HttpUpstream | None = None
    upstream_key: tuple[IPAddress, int] | None = None
    pipe: RawStream | None = None  # a tunnel's destination
    connecting: Dial | None = None  # a tunnel's connect under way
    peeking = False
    peek_buffer = b""
    client_eof = False
    upstream_eof_seen = False
    exchanging = False  # an absolute-form request is being relayed
    upgrade_body = False  # an h2c offer with a body was dropped: its body is still to be parsed

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.limits = limits = hub.limits
        self.parser = httptools.HttpRequestParser(self)
        self.last_active = hub.clock
        self.head_deadline = hub.clock + limits.head_timeout
        self.via_header = _via_header(limits.via)

    # -- stream callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: RawStream) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            ip, self.peer_text = _source_ip(peer[0])
            self.peer = (ip, peer[1])
        refusal = self.hub.connection_opened(self)
        if refusal is not None:
            self._refuse(503, refusal)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.hub.clock
        if self.mode is Mode.TUNNEL:
            self._tunnel_from_client(data)
            return
        if self.mode is Mode.CHECKING:
            # A tunnel's first bytes may come before the decision: keep them for the peek
            # (pausing the socket instead would cost two epoll changes on every tunnel).
            self.peek_buffer += data
            if len(self.peek_buffer) > MAX_PENDING_BODY:
                self.pause_client_reading()
            return
        if self.mode is Mode.CLOSED:
            return
        self.raw_head += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            if self.request is not None and self.request.method == b"CONNECT":
                self._begin_connect(data[e.args[0] :])
            else:
                self._resume_after_upgrade(data[e.args[0] :])
            return
        except httptools.HttpParserError as e:
            self._parse_failed(e)
            return
        self._check_held()

    def _check_held(self) -> None:
        # Bytes the parser took without delivering any (an incomplete head, or a trailer line
        # that never ends): it keeps partial header lines in memory, so past the head limit
        # they are refused, which bounds what a client can make us hold.
        if self.raw_head > self.limits.max_header_bytes:
            part = "head" if self.awaiting_head else "trailers"
            self._refuse(431, f"request {part} larger than {self.limits.max_header_bytes} bytes")

    def _parse_failed(self, e: httptools.HttpParserError) -> None:
        if isinstance(e, httptools.HttpParserCallbackError):
            cause = e.__context__
            if isinstance(cause, _Refuse):
                self._refuse(cause.status, cause.reason)
            else:
                self.hub.count_error("internal")
                log.error("parser callback failed", error=repr(cause), peer=str(self.peer[0]))
                self._refuse(500, "internal error")
        else:
            self.hub.count_error("bad_request")
            self._refuse(400, f"malformed request: {e}")

    def _resume_after_upgrade(self, rest: bytes) -> None:
        """An h2c offer was dropped (on_headers_complete): go on parsing the request as HTTP/1.1.

        llhttp stops for good at an upgrade, skipping the offer's body: a fresh parser takes the
        bytes after that point, its body first (``_BodyResumed``). A loop, not recursion: one
        read may hold any number of pipelined offers.
        """
        while self.mode is not Mode.CLOSED:
            req = self.request
            assert req is not None
            if self.upgrade_body:
                self.upgrade_body = False
                resumed = _BodyResumed(self)
                self.parser = httptools.HttpRequestParser(resumed)
                # A head with the offer's framing, swallowed by _BodyResumed: the parser then
                # reads the body as the original request's.
                self.parser.feed_data(
                    b"POST / HTTP/1.1\r\n" + framing.to_framing_fields(req.framing) + b"\r\n"
                )
            else:
                self.parser = httptools.HttpRequestParser(self)
            if not rest:
                return
            try:
                self.parser.feed_data(rest)
            except httptools.HttpParserUpgrade as e:
                rest = rest[e.args[0] :]
                if self.request is not None and self.request.method == b"CONNECT":
                    self._begin_connect(rest)
                    return
                continue
            except httptools.HttpParserError as e:
                self._parse_failed(e)
                return
            self._check_held()
            return

    def eof_received(self) -> bool:
        if self.mode is Mode.TUNNEL:
            self.client_eof = True
            pipe_transport = self.pipe
            if pipe_transport is not None and self.peeking:
                self._decide_peeked(protocol="tcp", sni=None)
            if self.upstream_eof_seen or self.transport is None or self.transport.is_closing():
                self.close()
            elif pipe_transport is not None and not pipe_transport.is_closing():
                pipe_transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.mode is not Mode.CLOSED:
            flow = self.flow
            if flow is not None and exc is not None and not self._closed_after_exchange(exc):
                flow.error = flow.error or f"client: {exc}"
            self.close()
        else:
            self._forget()  # closed earlier, with bytes still to send: they are out now

    def _closed_after_exchange(self, exc: Exception) -> bool:
        """A tunnel's client reset after it got every byte the destination sent (see the
        module docstring): the usual end of many clients, not a failure of the flow.
        """
        return (
            self.mode is Mode.TUNNEL
            and isinstance(exc, ConnectionResetError)
            and self.flow is not None
            and self.flow.bytes_in > 0
            and self.transport is not None
            and self.transport.get_write_buffer_size() == 0
        )

    def pause_writing(self) -> None:
        if self.pipe is not None:
            self.pipe.pause_reading()
            return
        # A client that does not read its answers gets no more requests read either: every one
        # would add an answer to the buffer it is not reading.
        self.client_full = True
        self._pause_reading()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.pipe is not None:
            self.pipe.resume_reading()
            return
        self.client_full = False
        self._maybe_resume()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    # -- httptools request callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        self.request = Request()
        self.awaiting_head = True
        self.raw_head = 0
        # Every request head has head_timeout from its first byte, not only a connection's first.
        self.head_deadline = self.hub.clock + self.limits.head_timeout

    def on_url(self, url: bytes) -> None:
        req = self.request
        assert req is not None
        req.url += url
        req.head_size += len(url)
        if len(req.url) > self.limits.max_header_bytes:
            raise _Refuse(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.request
        assert req is not None
        req.head_size += len(name) + len(value) + 4
        if not self.awaiting_head:
            # A trailer field of a chunked body: dropped, never promoted into the head (which
            # may not be written yet); still counted against the head limit.
            if req.head_size > self.limits.max_header_bytes:
                raise _Refuse(431, "request trailers too large")
            return
        req.headers.append((name, value))
        if len(req.headers) > self.limits.max_headers:
            raise _Refuse(431, f"more than {self.limits.max_headers} header fields")

    def on_headers_complete(self) -> None:
        req = self.request
        assert req is not None
        self.awaiting_head = False
        self.raw_head = 0
        if req.head_size > self.limits.max_header_bytes:
            raise _Refuse(431, f"request head larger than {self.limits.max_header_bytes} bytes")
        req.method = self.parser.get_method()
        req.keep_alive = self.parser.should_keep_alive()
        if req.method == b"CONNECT":
            return  # the parser raises HttpParserUpgrade next
        req.http10 = self.parser.get_http_version() == "1.0"
        self.pending_requests += 1
        self.pending_bytes += req.head_size
        if req.method in REFUSED_METHODS:
            raise _Refuse(405, f"method {req.method.decode('latin-1')} not forwarded")
        try:
            req.framing = framing.parse_request_framing(req.headers)
        except ValueError as e:
            raise _Refuse(400, f"request framing: {e}") from None
        if self.parser.should_upgrade():
            self._drop_upgrade(req)
        self._push(req)
        self._limit_pending()

    def _drop_upgrade(self, req: Request) -> None:
        """Drop an h2c upgrade offer (the request goes on as HTTP/1.1, as Squid does); refuse
        any other (websocket and the like cannot be relayed in absolute form: use CONNECT).
        """
        offered = [
            token.strip(b" \t")
            for name, value in req.headers
            if name.lower() == b"upgrade"
            for token in value.split(b",")
            if token.strip(b" \t")
        ]
        others = [t for t in offered if t.lower() != b"h2c"]
        if others:
            names = b", ".join(others)[:100].decode("latin-1")
            raise _Refuse(501, f"protocol upgrade to {names} through the proxy: use CONNECT")
        # Upgrade and HTTP2-Settings are hop-by-hop: forwarded_fields leaves them out. llhttp
        # skips the body of an upgrade request and ends the message at once: that end is not
        # the request's when a body follows (_resume_after_upgrade parses it).
        fr = req.framing
        self.upgrade_body = fr.kind is framing.Kind.CHUNKED or fr.length > 0

    def on_body(self, body: bytes) -> None:
        self.raw_head = 0  # the body moves on: what the parser holds is not growing
        self.pending_bytes += len(body)
        self._push(body)
        self._limit_pending()

    def on_message_complete(self) -> None:
        self.raw_head = 0
        if self.request is not None and self.request.method == b"CONNECT":
            return
        if self.upgrade_body:
            return  # llhttp's early end of an upgrade offer with a body: the body comes next
        if self.request is not None:
            self.request.body_done = True
        self._push(None)

    # -- shared ----------------------------------------------------------------------------------
    def _to(self, mode: Mode) -> None:
        """Change mode, as _TRANSITIONS allows (IllegalTransition otherwise)."""
        if mode not in self.mode.allowed:
            raise IllegalTransition(self.mode, mode)
        self.mode = mode

    def write(self, data: bytes) -> None:
        """Write to the client unless it is gone."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def note_status(self, status: int) -> None:
        """Remember the status forwarded for the current flow."""
        if self.flow is not None:
            self.flow.status = status

    def flow_bytes_in(self, n: int) -> None:
        """Count bytes from the destination."""
        self.last_active = self.hub.clock
        if self.flow is not None:
            self.flow.bytes_in += n

    def pause_client_reading(self) -> None:
        """Stop reading the client (a peer's buffer is full)."""
        self.peer_full = True
        self._pause_reading()

    def resume_client_reading(self) -> None:
        """Read the client again, unless something else still holds it."""
        if self.reading_paused:
            self.peer_full = False
            self._maybe_resume()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        limits = self.limits
        if (
            self.reading_paused
            and self.transport is not None
            and not self.peer_full
            and not self.client_full
            and self.pending_bytes <= limits.max_pending_bytes // 2
            and self.pending_requests < limits.max_pipelined_requests
        ):
            self.reading_paused = False
            self.transport.resume_reading()

    def _limit_pending(self) -> None:
        """Stop reading a client whose requests wait beyond the limits (backpressure).

        What one read brings is parsed whole, so the queue may pass a limit by one read's worth.
        """
        limits = self.limits
        if (
            self.pending_bytes > limits.max_pending_bytes
            or self.pending_requests >= limits.max_pipelined_requests
        ):
            self._pause_reading()

    def _new_flow(self) -> Flow:
        flow = Flow(self.peer[0], self.peer[1], time.time(), time.monotonic())
        flow.source_text = self.peer_text
        self.flow = flow
        return flow

    def _refuse(self, status: int, reason: str) -> None:
        """Answer with an error and close (the connection's framing can no longer be trusted)."""
        if self.mode is Mode.CLOSED:
            return
        if status in (400, 405, 414, 431, 501):
            self.hub.count_error({400: "bad_request", 431: "head_too_large"}.get(status, "refused"))
        self.write(to_error_response(status, reason, close=True))
        transport = self.transport
        if transport is None or transport.is_closing():
            self.close()
            return
        self.transport = None  # close() forgets the connection; its stream closes on its own
        self.close()
        transport.close_after_reading(REFUSAL_LINGER)

    def close(self) -> None:
        """Close both sides and record the end of the current flow."""
        if self.mode is Mode.CLOSED:
            return
        was_tunnel = self.mode is Mode.TUNNEL
        self._to(Mode.CLOSED)
        if self.items_waiter is not None and not self.items_waiter.done():
            self.items_waiter.set_result(None)
        if self.http_task is not None and not self.http_task.done():
            self.http_task.cancel()
        # The destination's stream is closed quietly: this connection needs no connection_lost
        # from it. So is the client's, unless bytes wait to be sent to the client: then the
        # connection counts as open (a draining gateway waits for it) until they are out.
        if self.pipe is not None:
            self.pipe.close_quietly()
        if self.connecting is not None:
            self.connecting.cancel()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        flushing = self.transport is not None and self.transport.get_write_buffer_size() > 0
        if self.transport is not None:
            if flushing:
                self.transport.close()
            else:
                self.transport.close_quietly()
        flow = self.flow
        if was_tunnel and flow is not None:
            if self.peeking:
                self._decide_peeked(protocol="tcp", sni=None, closing=True)
            self.hub.tunnel_closed()
            self._end_flow(flow)
        if not flushing:
            self._forget()

    def _forget(self) -> None:
        """The client's stream is gone: leave the gateway's books and cut reference cycles."""
        self.hub.connection_closed(self)
        # The parser holds this connection's callbacks, and the HTTP upstream points back at
        # it: unlink both so reference counting frees the connection (see RawStream).
        self.parser = _NO_PARSER
        self.upstream = None

    def _end_flow(self, flow: Flow) -> None:
        if flow.ended_mono is None:
            flow.ended_mono = time.monotonic()
            self.hub.flow_ended(flow)

    def expire(self, now: float) -> None:
        """Close the connection if its head or idle timeout passed (called by the sweeper)."""
        if (
            self.awaiting_head
            and now > self.head_deadline
            and (self.mode is Mode.HEAD or (self.mode is Mode.HTTP and not self.exchanging))
        ):
            # (While an answer is being relayed a 408 would cut into it: it waits its turn.)
            self.hub.count_error("head_timeout")
            if self.flow is not None:
                self.flow.error = self.flow.error or "head timeout"
            self._refuse(408, "request head not received in time")
        elif now - self.last_active > self.limits.idle_timeout and self.mode is not Mode.CHECKING:
            if self.flow is not None:
                self.flow.error = self.flow.error or "idle timeout"
            self.hub.count_error("idle_timeout")
            self.close()

    # -- CONNECT -----------------------------------------------------------------------------------
    def _begin_connect(self, rest: bytes) -> None:
        req = self.request
        assert req is not None and self.transport is not None
        if self.mode is Mode.HTTP and (self.exchanging or self.items):
            # A tunnel's 200 must not overtake the answers still owed on this connection.
            self._refuse(400, "CONNECT while earlier requests are being answered")
            return
        self._to(Mode.CHECKING)
        self.peek_buffer = rest
        flow = self._new_flow()
        flow.protocol = "tls"  # assumed until the first bytes say otherwise
        try:
            flow.host, flow.port = parse_authority(req.url.decode("ascii"))
        except (ValueError, UnicodeDecodeError) as e:
            self._refuse(400, f"bad CONNECT target: {e}")
            return
        verdict = check_flow_now(self.hub.runtime, flow, self.hub.loop.time())
        if verdict is None:  # the name must be resolved first
            self.http_task = spawn(self._resolve_then_connect(flow), name=f"connect-{flow.id}")
        else:
            self._connect(flow, verdict)

    async def _resolve_then_connect(self, flow: Flow) -> None:
        verdict = await check_flow(self.hub.runtime, flow)
        if self.mode is not Mode.CLOSED:
            self._connect(flow, verdict)

    def _connect(self, flow: Flow, verdict: Verdict) -> None:
        """Refuse, or start a non-blocking connect to the checked address."""
        if not verdict.allowed:
            self.hub.flow_decided(flow)
            self._refuse(verdict.status, verdict.reason)
            return
        ip = verdict.ip
        assert ip is not None
        if not flow.ip_str or flow.ip is not ip:
            flow.ip_str = ip_text(ip)
        self.connecting = dial(
            self.hub.reactor,
            (flow.ip_str, flow.port),
            _FAMILIES[ip.version],
            self._connected,
            self._connect_failed,
            self.limits.connect_timeout,
        )

    def _connect_failed(self, exc: OSError) -> None:
        flow = self.flow
        assert flow is not None
        if isinstance(exc, TimeoutError):
            self._upstream_failed(flow, 504, f"connect to {flow.ip}:{flow.port} timed out")
        else:
            reason = f"connect to {flow.ip}:{flow.port}: {exc.strerror or exc}"
            self._upstream_failed(flow, 502, reason)

    def _connected(self, sock: _socket.socket) -> None:
        if self.mode is Mode.CLOSED:
            sock.close()
            return
        self.pipe = RawStream(self.hub.reactor, sock, _TunnelUpstream(self))
        self._to(Mode.TUNNEL)
        self.hub.tunnel_opened()
        self.write(CONNECT_ESTABLISHED)
        self.pipe.resume_reading()
        self.peeking = True
        self.resume_client_reading()
        if self.peek_buffer:
            data, self.peek_buffer = self.peek_buffer, b""
            self._tunnel_from_client(data)

    def _upstream_failed(self, flow: Flow, status: int, reason: str) -> None:
        self.hub.count_error("upstream_timeout" if status == 504 else "upstream_unreachable")
        if flow.verdict is not None:
            flow.verdict = flow.verdict.unreachable(status)
        flow.error = reason
        flow.status = status
        self.hub.flow_decided(flow)
        self._refuse(status, reason)

    def _tunnel_from_client(self, data: bytes) -> None:
        flow = self.flow
        assert flow is not None
        if self.peeking:
            if not self.peek_buffer and data[0] != TLS_HANDSHAKE:
                # What the parser would say (not a TLS record), without building its exception.
                self.peek_buffer = data
                self._decide_peeked(protocol="tcp", sni=None)
                return
            self.peek_buffer += data
            try:
                hello = parse_client_hello(self.peek_buffer)
            except ValueError:
                self._decide_peeked(protocol="tcp", sni=None)
                return
            if hello is None:
                if len(self.peek_buffer) <= MAX_HELLO_SIZE + 5:
                    return
                self._decide_peeked(protocol="tcp", sni=None)
                return
            sni: str | None = None
            if hello.sni is not None:
                try:
                    host = parse_host(hello.sni)
                except ValueError:
                    self._deny_tunnel(f"invalid TLS server name {hello.sni[:100]!r}")
                    return
                sni = host.name if host.name is not None else None
            self._decide_peeked(protocol="tls", sni=sni)
            return
        flow.bytes_out += len(data)
        if self.pipe is not None:
            self.pipe.write(data)

    def _decide_peeked(self, protocol: Any, sni: str | None, closing: bool = False) -> None:
        """The first client bytes arrived: confirm or refuse the tunnel, then let them through."""
        flow = self.flow
        assert flow is not None
        self.peeking = False
        same = protocol == "tls" and (
            sni is None or (flow.host is not None and sni == flow.host.name)
        )
        if same:
            flow.sni = sni
        elif sni is None and not self.hub.runtime.policy.protocol_sensitive:
            flow.protocol = protocol  # what recheck_tunnel would conclude, without a Verdict
        else:
            verdict: Verdict = recheck_tunnel(self.hub.runtime, flow, protocol, sni)
            if not verdict.allowed:
                self.hub.flow_decided(flow)
                if not closing:
                    self._deny_tunnel(verdict.reason, decided=True)
                return
        if not closing:
            # The client's first bytes go out before the event is built: it is not their
            # business (a failed send is reported from the loop, after the event).
            self._flush_peek()
            if self.transport is not None and self.pipe is not None:
                # Decided for good: bytes now flow socket to socket without the protocol.
                self.transport.relay(self.pipe, self._count_out)
                self.pipe.relay(self.transport, self.flow_bytes_in)
        self.hub.flow_decided(flow)

    def _flush_peek(self) -> None:
        data, self.peek_buffer = self.peek_buffer, b""
        if data and self.flow is not None:
            self.flow.bytes_out += len(data)
            if self.pipe is not None:
                self.pipe.write(data)

    def _deny_tunnel(self, reason: str, decided: bool = False) -> None:
        flow = self.flow
        assert flow is not None
        if not decided:
            flow.verdict = Verdict.deny(reason)
            self.hub.flow_decided(flow)
        self.peek_buffer = b""
        self.close()

    def _count_out(self, n: int) -> None:
        self.last_active = self.hub.clock
        if self.flow is not None:
            self.flow.bytes_out += n

    def from_upstream(self, data: bytes) -> None:
        """Bytes from the tunnel's destination."""
        self.flow_bytes_in(len(data))
        self.write(data)

    def upstream_eof(self) -> None:
        """The destination finished sending."""
        self.upstream_eof_seen = True
        if self.client_eof:
            self.close()  # both sides done: close sends the FIN, a shutdown first would be wasted
        elif self.transport is not None:
            self.transport.write_eof()

    def upstream_lost(self, exc: Exception | None) -> None:
        """The destination's connection closed."""
        if exc is not None and self.flow is not None:
            self.flow.error = self.flow.error or f"upstream: {exc}"
        self.close()

    # -- absolute-form HTTP ------------------------------------------------------------------------
    def _push(self, item: Request | bytes | None) -> None:
        if self.items is None:
            self.items = deque()
        self.items.append(item)
        if self.items_waiter is not None and not self.items_waiter.done():
            self.items_waiter.set_result(None)
        if self.http_task is None:
            self._to(Mode.HTTP)
            self.http_task = spawn(self._serve_http(), name="http-client")

    async def _next_item(self) -> Request | bytes | None:
        while not self.items:
            if self.mode is Mode.CLOSED:
                raise ConnectionError("client gone")
            self.items_waiter = asyncio.get_running_loop().create_future()
            await self.items_waiter
        item = self.items.popleft()
        if isinstance(item, bytes):
            self.pending_bytes -= len(item)
        elif item is not None:
            self.pending_requests -= 1
            self.pending_bytes -= item.head_size
        if self.reading_paused:
            self._maybe_resume()
        return item

    async def _serve_http(self) -> None:
        try:
            while self.mode is not Mode.CLOSED:
                item = await self._next_item()
                if not isinstance(item, Request):
                    continue  # body of a refused request already answered
                self.exchanging = True
                keep_going = await self._exchange(item)
                self.exchanging = False
                if not keep_going:
                    self.close()
                    return
        except ConnectionError:
            self.close()

    async def _exchange(self, req: Request) -> bool:
        flow = self._new_flow()
        flow.protocol = "http"
        flow.method = req.method.decode("ascii")
        try:
            target = _parse_target(req.url)
        except ValueError as e:
            self.hub.count_error("bad_request")
            self.write(to_error_response(400, str(e), close=True))
            return False
        flow.host, flow.port, path, flow.url = target
        # Decided at once when the name's answer is cached (most requests), with no coroutine.
        verdict = check_flow_now(self.hub.runtime, flow, self.hub.loop.time())
        if verdict is None:
            verdict = await check_flow(self.hub.runtime, flow)
        if not verdict.allowed:
            flow.status = verdict.status
            self.hub.flow_decided(flow)
            close = not (req.body_done and req.keep_alive)
            self.write(to_error_response(verdict.status, verdict.reason, close=close))
            if not close:
                await self._skip_body()
            return not close
        self.hub.flow_decided(flow)
        assert verdict.ip is not None
        upstream = self.upstream  # the connection kept alive from the last request, if it fits
        if upstream is None or upstream.closed or self.upstream_key != (verdict.ip, flow.port):
            try:
                upstream = await self._connect_upstream(verdict.ip, flow.port)
            except TimeoutError:
                return self._http_upstream_failed(
                    flow, 504, f"connect to {verdict.ip}:{flow.port} timed out"
                )
            except OSError as e:
                return self._http_upstream_failed(
                    flow, 502, f"connect to {verdict.ip}:{flow.port}: {e.strerror or e}"
                )
        done = upstream.begin(req.method == b"HEAD", req.http10, req.keep_alive)
        assert upstream.transport is not None
        head = _request_head(req, path, flow, self.via_header)
        chunked = req.framing.kind is framing.Kind.CHUNKED
        flow.bytes_out += len(head)
        upstream.transport.write(head)
        try:
            while True:
                item = await self._next_item()
                if item is None:
                    break
                assert isinstance(item, bytes)
                flow.bytes_out += len(item)
                upstream.transport.write(b"%x\r\n%s\r\n" % (len(item), item) if chunked else item)
            if chunked:
                upstream.transport.write(b"0\r\n\r\n")
            upstream.expect_head_within(self.limits.response_timeout)
            reusable = await done
        except ConnectionError as e:
            flow.error = str(e)
            status = 502
            if isinstance(e, UpstreamFailure):
                self.hub.count_error(e.kind)
                status = e.status
            if flow.status is None:
                flow.status = status
                self.write(to_error_response(status, f"upstream: {e}", close=True))
            self._end_flow(flow)
            self._drop_upstream()
            return False
        if not reusable:
            self._drop_upstream()
        self._end_flow(flow)
        return req.keep_alive and not upstream.client_close

    def _http_upstream_failed(self, flow: Flow, status: int, reason: str) -> bool:
        self.hub.count_error("upstream_timeout" if status == 504 else "upstream_unreachable")
        flow.error = reason
        flow.status = status
        self.write(to_error_response(status, reason, close=True))
        self._end_flow(flow)
        return False

    async def _skip_body(self) -> None:
        while (await self._next_item()) is not None:
            pass

    def _drop_upstream(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        self.upstream = None
        self.upstream_key = None

    async def _connect_upstream(self, ip: IPAddress, port: int) -> _HttpUpstream:
        """A new upstream connection for absolute-form requests, in place of the kept one."""
        key = (ip, port)
        self._drop_upstream()
        loop = asyncio.get_running_loop()
        limit = self.limits.max_header_bytes
        sock = await open_socket(
            self.hub.reactor,
            (ip_text(ip), port),
            _FAMILIES[ip.version],
            self.limits.connect_timeout,
        )
        _, upstream = await loop.create_connection(lambda: _HttpUpstream(self, limit), sock=sock)
        self.upstream = upstream
        self.upstream_key = key
        if self.client_full and upstream.transport is not None:
            upstream.transport.pause_reading()  # the client still has earlier answers to read
        return upstream


@functools.lru_cache(maxsize=16)
def _via_header(via: str) -> bytes:
    return f"Via: 1.1 {via}\r\n".encode()


_SOURCE_IPS: dict[str, tuple[IPAddress, str]] = {}
_SOURCE_IP_CACHE = 65536  # clients are few and repeat: parse each address once


def _source_ip(text: str) -> tuple[IPAddress, str]:
    """A peer address as the socket spells it -> (address, canonical text)."""
    found = _SOURCE_IPS.get(text)
    if found is None:
        ip = ipaddress.ip_address(text.partition("%")[0])
        if len(_SOURCE_IPS) >= _SOURCE_IP_CACHE:
            _SOURCE_IPS.clear()
        found = _SOURCE_IPS[text] = (ip, ip_text(ip))
    return found


def _parse_target(url: bytes) -> tuple[Host, int, bytes, str]:
    """Absolute-form target -> (host, port, origin-form path, canonical URL for events/feeds)."""
    if not url.lower().startswith(b"http://"):
        if url.lower().startswith(b"https://"):
            raise ValueError("https:// in absolute form: use CONNECT for TLS")
        raise ValueError("request target must be an absolute http:// URL")
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError as e:
        raise ValueError(f"bad URL: {e}") from e
    if parsed.host is None or not parsed.host:
        raise ValueError("URL has no host")
    host_text = parsed.host.decode("utf-8", "strict")
    if ":" in host_text and not host_text.startswith("["):
        host_text = f"[{host_text}]"
    host = parse_host(host_text)
    port = 80 if parsed.port is None else parsed.port
    if port == 0:
        raise ValueError("port 0 is not a destination")  # as CONNECT refuses it
    path = parsed.path or b"/"
    if parsed.query:
        path += b"?" + parsed.query
    canonical = f"http://{host.authority(port, 80)}{path.decode('latin-1')}"
    return host, port, path, canonical


# Request fields the gateway writes itself: Host from the target, Via extended (after the rest).
_REPLACED_REQUEST_FIELDS = frozenset({b"host"})


def _request_head(req: Request, path: bytes, flow: Flow, via: bytes) -> bytes:
    host = flow.host
    assert host is not None
    authority = host.authority(flow.port, 80)
    out = [req.method + b" " + path + b" HTTP/1.1\r\nHost: " + authority.encode() + b"\r\n"]
    incoming_via: list[bytes] = []
    for lower, name, value in framing.forwarded_fields(req.headers, _REPLACED_REQUEST_FIELDS):
        if lower == b"via":
            incoming_via.append(value)
        else:
            out.append(name + b": " + value + b"\r\n")
    if incoming_via:
        out.append(b"Via: " + b", ".join(incoming_via) + b", " + via[5:])
    else:
        out.append(via)
    out.append(framing.to_framing_fields(req.framing))
    out.append(b"\r\n")
    return b"".join(out)
