"""Absolute-form HTTP/1.1 forwarding: each request decided as a flow of its own, relayed over an
upstream connection kept for keep-alive, its answer relayed back in the client's version.

``ForwardConnection`` is the forwarding piece of a client connection (see ``connection.py`` for
how the pieces join). The request heads come parsed (``Request``, from ``explicit.py``) through
a queue (``_push``), with the bodies' bytes and a ``None`` at each request's end; one task takes
them in order (``_serve_http``), so pipelined requests wait their turn. The upstream side is an
asyncio Protocol (``_HttpUpstream``) that parses responses with httptools; it is opened by
``egressgw.net.dial`` on the gateway's epoll set, one connection per client, reused while the
next request goes to the same address and port.

Rules:

- Pipelining is bounded: past ``proxy.max_pending_bytes`` of heads and bodies read but not yet
  sent, or ``proxy.max_pipelined_requests`` heads waiting, the client is not read until they
  drain (one read's worth may pass a limit: what one read brings is parsed whole).
- A response head must begin to end within ``proxy.response_timeout`` of the request's end
  (504 if nothing was answered yet); a head larger than ``proxy.max_header_bytes`` is a 502.
- Bytes from an upstream that was asked nothing, and a 101 nobody asked for, are a 502.
- An HTTP/1.0 client is answered in a version it understands: no 1xx, a chunked body
  de-chunked and delimited by the close, ``Connection: close`` unless it asked for keep-alive
  and the length is known; a transfer coding it cannot know is a 502.
- Hop-by-hop fields (and those a ``Connection`` field names) are not forwarded; ``Host`` comes
  from the target, ``Via`` is extended; the body goes with the framing it was read with.
- A refused request with a whole body and keep-alive is answered and the connection goes on;
  any other refusal or failure answers with ``Connection: close`` and ends the connection.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from http import HTTPStatus
from typing import cast

import httptools
import structlog

from egressgw.decision.names import Host, parse_host
from egressgw.decision.path import check_flow_latest, check_flow_now
from egressgw.egress import egress_source
from egressgw.flow import Flow, ip_text
from egressgw.listeners.connection import FAMILIES, Connection, IPAddress, Mode, Nobody, Refuse
from egressgw.net.dial import open_socket
from egressgw.wire import framing
from egressgw.wire.responses import CONTINUE, to_error_response
from siem.tasks import spawn

log = structlog.get_logger("egressgw.listeners.forward")

_NO_RESPONSE_PARSER = httptools.HttpResponseParser(Nobody())


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
        "proxy_authorization",
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
        # Its Proxy-Authorization value (b"" when sent twice): read for identity, never
        # forwarded (framing.HOP_BY_HOP), never logged.
        self.proxy_authorization: bytes | None = None


class _HttpUpstream(asyncio.Protocol):
    """The upstream side of absolute-form forwarding: parses responses and relays them."""

    def __init__(self, client: ForwardConnection, max_header_bytes: int) -> None:
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
            if isinstance(cause, Refuse):
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
            raise Refuse(502, "unsolicited response from upstream")
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_header_bytes:
            raise Refuse(502, "upstream response head too large")
        if self.in_head:
            self.headers.append((name, value))
        # else a trailer field: counted against the limit, never forwarded as a head field

    def on_status(self, status: bytes) -> None:
        pass

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status == 101:
            raise Refuse(502, "upstream switched protocols (101) though no upgrade was asked")
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
            raise Refuse(502, f"upstream response framing: {e}") from None
        http10 = self.http10
        try:
            framing_fields = framing.to_framing_fields(fr, chunked_ok=not http10)
        except ValueError as e:
            raise Refuse(502, f"upstream response: {e}") from None
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


class ForwardConnection(Connection):
    """The forwarding piece of a client connection: requests queued, decided, relayed in turn."""

    items: deque[Request | bytes | None] | None = None  # absolute-form requests and bodies
    items_waiter: asyncio.Future[None] | None = None
    upstream: _HttpUpstream | None = None
    upstream_key: tuple[IPAddress, int, str | None] | None = None  # destination and source
    exchanging = False  # an absolute-form request is being relayed
    via_header = b""  # this gateway's Via field, set once forwarding begins

    def _push(self, item: Request | bytes | None) -> None:
        if self.items is None:
            self.items = deque()
        self.items.append(item)
        if self.items_waiter is not None and not self.items_waiter.done():
            self.items_waiter.set_result(None)
        if self.http_task is None:
            self._to(Mode.HTTP)
            # Only forwarding needs it: a tunnel never computes it.
            self.via_header = via_field(self.limits.via)
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
        if req.proxy_authorization is not None:
            flow.credential = self._credential(req.proxy_authorization)
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
            verdict = await check_flow_latest(self.hub, flow)
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
        egress_ips = self.hub.egress_ips
        source = egress_source(flow.workload, egress_ips) if egress_ips else None
        # An upstream is kept per (destination, source address): a request of another namespace
        # (after an identity change) never rides a connection that leaves from another address.
        if (
            upstream is None
            or upstream.closed
            or self.upstream_key != (verdict.ip, flow.port, source)
        ):
            try:
                upstream = await self._connect_upstream(verdict.ip, flow.port, source)
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

    async def _connect_upstream(
        self, ip: IPAddress, port: int, source: str | None = None
    ) -> _HttpUpstream:
        """A new upstream connection for absolute-form requests, in place of the kept one."""
        key = (ip, port, source)
        self._drop_upstream()
        loop = asyncio.get_running_loop()
        limit = self.limits.max_header_bytes
        sock = await open_socket(
            self.hub.reactor,
            (ip_text(ip), port),
            FAMILIES[ip.version],
            self.limits.connect_timeout,
            source,
        )
        _, upstream = await loop.create_connection(lambda: _HttpUpstream(self, limit), sock=sock)
        self.upstream = upstream
        self.upstream_key = key
        if self.client_full and upstream.transport is not None:
            upstream.transport.pause_reading()  # the client still has earlier answers to read
        return upstream


@functools.lru_cache(maxsize=16)
def via_field(via: str) -> bytes:
    """The ``Via`` field this gateway adds, for the name ``proxy.via``."""
    return f"Via: 1.1 {via}\r\n".encode()


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
