"""The explicit proxy: request heads read, then each request dispatched to a tunnel (CONNECT) or
to absolute-form forwarding.

``ClientConnection`` joins the pieces (``connection.py`` says how, and states the modes and the
rules every piece keeps): this module parses request heads (httptools/llhttp, limits on size,
count and time), answers what must be refused before any piece sees it, and moves the
connection along the mode table:

    HEAD --CONNECT--> CHECKING --connected--> TUNNEL            (tunnel.py)
    HEAD --absolute-form request--> HTTP                        (forward.py)
    HTTP --CONNECT, once every earlier answer is out--> CHECKING
    any --refusal, EOF, error, timeout--> CLOSED

Client connections are ``RawStream``s (egressgw.net.rawstream: sockets on the proxy's own epoll
set, no Transport or Task per connection); this class is their protocol. A tunnel's client EOF
is handled by the tunnel piece (``TunnelConnection.eof_received``): only a tunnel keeps a
half-closed client.

Rules:

- Any method the parser knows is forwarded in absolute form, except ``REFUSED_METHODS`` (405).
- A request head is bounded: ``proxy.max_header_bytes`` (431, 414 for the target alone, counted
  while a line is still incomplete), ``proxy.max_headers`` fields (431), ``proxy.head_timeout``
  from its first byte (408). Trailer fields count against the same limit and are dropped.
- An ``Upgrade: h2c`` offer in absolute form is dropped (with ``HTTP2-Settings``) and the request
  forwarded as HTTP/1.1, as Squid does; other upgrades (websocket) are refused with 501: a
  protocol that takes over the connection goes through CONNECT.
- A CONNECT while earlier absolute-form answers are owed is refused (400): a tunnel's 200 must
  not overtake them.
"""

from __future__ import annotations

from typing import Protocol, cast

import httptools
import structlog

from egressgw.listeners.connection import (
    Hub,
    Mode,
    Nobody,
    Refuse,
    source_ip,
)
from egressgw.listeners.forward import REQUEST_DROPPED, ForwardConnection, Request
from egressgw.listeners.tunnel import MAX_PENDING_BODY, TunnelConnection
from egressgw.net.rawstream import RawStream
from egressgw.wire import framing

log = structlog.get_logger("egressgw.listeners.explicit")

# Any method the parser knows is forwarded in absolute form (WebDAV's PROPFIND and the like
# included), except these, answered 405: TRACE echoes the request back, cookies and credentials
# included, to whatever script can read the answer.
REFUSED_METHODS = frozenset({b"TRACE"})


class ExplicitHub(Hub, Protocol):
    """What an explicit proxy's connection needs from the gateway: a Hub that keeps the books."""

    def connection_opened(self, conn: ClientConnection) -> str | None:
        """Register a client connection (None), or refuse it: which limit it would pass."""
        ...

    def connection_closed(self, conn: ClientConnection) -> None:
        """Forget a client connection."""
        ...


_NO_PARSER = httptools.HttpRequestParser(Nobody())


class _Dropping:
    """The parser of a connection whose refusal waits its turn: what arrives is dropped."""

    def feed_data(self, data: bytes) -> None:
        pass


_DROPPING = cast(httptools.HttpRequestParser, _Dropping())


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


class ClientConnection(TunnelConnection, ForwardConnection):
    """One client of the explicit proxy (the protocol of a RawStream)."""

    hub: ExplicitHub
    request: Request | None = None
    raw_head = 0  # bytes read since the parser last delivered a head, body bytes or a message end
    awaiting_head = True
    upgrade_body = False  # an h2c offer with a body was dropped: its body is still to be parsed

    def __init__(self, hub: ExplicitHub) -> None:
        self.hub = hub
        self.limits = limits = hub.limits
        self.parser = httptools.HttpRequestParser(self)
        self.last_active = hub.clock
        self.head_deadline = hub.clock + limits.head_timeout

    # -- stream callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: RawStream) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            ip, self.peer_text = source_ip(peer[0])
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
                if self.items:
                    self._advance()
            return
        except httptools.HttpParserError as e:
            self._parse_failed(e)
            return
        self._check_held()
        if self.items:
            self._advance()  # what this read brought, taken up now that it is parsed whole

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
            if isinstance(cause, Refuse):
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

    def pause_writing(self) -> None:
        if self.pipe is not None:
            self.pipe.pause_reading()
            return
        # A client that does not read its answers gets no more requests read either: every one
        # would add an answer to the buffer it is not reading.
        self.client_full = True
        self._pause_reading()
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.pipe is not None:
            self.pipe.resume_reading()
            return
        self.client_full = False
        self._maybe_resume()
        if self.upstream is not None:
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
            raise Refuse(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.request
        assert req is not None
        req.head_size += len(name) + len(value) + 4
        if not self.awaiting_head:
            # A trailer field of a chunked body: dropped, never promoted into the head (which
            # may not be written yet); still counted against the head limit.
            if req.head_size > self.limits.max_header_bytes:
                raise Refuse(431, "request trailers too large")
            return
        req.headers.append((name, value))
        # The first byte first: most heads have no Proxy-Authorization, and a tunnel's cost is
        # counted per instruction.
        if name[0] in b"Pp" and name.lower() == b"proxy-authorization":
            # Twice is malformed (b"" parses as no credential): which one would identity trust?
            req.proxy_authorization = value if req.proxy_authorization is None else b""
        if len(req.headers) > self.limits.max_headers:
            raise Refuse(431, f"more than {self.limits.max_headers} header fields")

    def on_headers_complete(self) -> None:
        req = self.request
        assert req is not None
        self.awaiting_head = False
        self.raw_head = 0
        if req.head_size > self.limits.max_header_bytes:
            raise Refuse(431, f"request head larger than {self.limits.max_header_bytes} bytes")
        req.method = self.parser.get_method()
        req.keep_alive = self.parser.should_keep_alive()
        if req.method == b"CONNECT":
            return  # the parser raises HttpParserUpgrade next
        req.http10 = self.parser.get_http_version() == "1.0"
        self.pending_requests += 1
        self.pending_bytes += req.head_size
        if req.method in REFUSED_METHODS:
            raise Refuse(405, f"method {req.method.decode('latin-1')} not forwarded")
        try:
            req.fields, framing_fields = framing.split_fields(req.headers, REQUEST_DROPPED)
            if framing_fields:  # (most requests have none: no body, framing.NO_BODY)
                req.framing = framing.parse_request_framing(framing_fields)
        except ValueError as e:
            raise Refuse(400, f"request framing: {e}") from None
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
            raise Refuse(501, f"protocol upgrade to {names} through the proxy: use CONNECT")
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

    # -- dispatch ------------------------------------------------------------------------------
    def _begin_connect(self, rest: bytes) -> None:
        req = self.request
        assert req is not None
        if self.mode is Mode.HTTP and (self.exchanging or self.items):
            # A tunnel's 200 must not overtake the answers still owed on this connection.
            self._refuse(400, "CONNECT while earlier requests are being answered")
            return
        self._open_tunnel(req.url, rest, req.proxy_authorization)

    def close(self, reason: str | None = None) -> None:
        """Close both sides and record the end of the current flow (``reason``: why, when the
        gateway cuts it, e.g. at shutdown; the flow keeps an error it already had).
        """
        if self.mode is Mode.CLOSED:
            return
        was_tunnel = self.mode is Mode.TUNNEL
        self._to(Mode.CLOSED)
        task = self.http_task
        if task is not None and not task.done():
            task.cancel()
        if self.items is not None:
            # Only forwarding sets its state (exchange, upstream): a tunnel has none to look at.
            self._close_forward(reason)
        flushing = self._close_streams(reason)
        flow = self.flow
        if was_tunnel and flow is not None:
            if self.peeking:
                self._decide_peeked(protocol="tcp", sni=None, closing=True)
            self.hub.tunnel_closed()
            self._end_flow(flow)
        if not flushing:
            self._forget()

    def _stop_parsing(self) -> None:
        """A refusal waits for earlier answers: nothing more the client sends is parsed."""
        self.parser = _DROPPING

    def _forget(self) -> None:
        """The client's stream is gone: leave the gateway's books and cut reference cycles."""
        self.hub.connection_closed(self)
        # The parser holds this connection's callbacks, and the HTTP upstream points back at
        # it: unlink both so reference counting frees the connection (see RawStream).
        self.parser = _NO_PARSER
        self.upstream = None

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
        elif self.exchanging:
            self._expire_forward(now)  # the response head's deadline
