"""Absolute-form HTTP/1.1 forwarding: each request decided as a flow of its own, relayed over a
pooled upstream connection, its answer relayed back in the client's version; all in callbacks.

``ForwardConnection`` is the forwarding piece of a client connection (see ``connection.py`` for
how the pieces join). The request heads come parsed (``Request``, from ``explicit.py``) into a
queue (``_push``), with the bodies' bytes and a ``None`` at each request's end; once a read is
parsed, ``_advance`` takes them up in order, as far as the exchange in progress lets it
(``Step``), so pipelined requests wait their turn. There is no Task or Future per request: a
name whose answer is cached is decided at once, a parked upstream is taken from the gateway's
pool (``hub.upstreams``, ``egressgw.net.pool``) or a new one dialled (``egressgw.net.dial``),
the head written, and the response relayed by the upstream's own callbacks
(``upstreams.HttpUpstream``), which call back ``response_done`` or ``upstream_failed``. Only a
name that must be resolved first costs a task (``_DECIDING``).

Rules:

- Pipelining is bounded: past ``proxy.max_pending_bytes`` of heads and bodies read but not yet
  sent, or ``proxy.max_pipelined_requests`` heads waiting, the client is not read until they
  drain (one read's worth may pass a limit: what one read brings is parsed whole).
- Upstreams are pooled per (destination address, port, source address): an idle keep-alive
  upstream serves whichever client goes there next from the same source (``egress_ips``), up
  to ``proxy.max_idle_upstreams`` (``proxy.max_idle_upstreams_per_destination`` per key) for
  ``proxy.upstream_idle_timeout``; one its peer closed while parked leaves the pool. A request
  that cannot be retried (not ``IDEMPOTENT``, or with a body) takes a parked upstream only
  after a peek shows it still open; one that can is retried once, on a new connection, when a
  reused upstream fails before one byte of its answer.
- A response head must begin to end within ``proxy.response_timeout`` of the request's end
  (504 if nothing was answered yet; checked once a second); a head larger than
  ``proxy.max_header_bytes`` is a 502.
- Bytes from an upstream that was asked nothing, and a 101 nobody asked for, are a 502.
- An HTTP/1.0 client is answered in a version it understands: no 1xx, a chunked body
  de-chunked and delimited by the close, ``Connection: close`` unless it asked for keep-alive
  and the length is known; a transfer coding it cannot know is a 502.
- Hop-by-hop fields (and those a ``Connection`` field names) are not forwarded; ``Host`` comes
  from the target, ``Via`` is extended; the body goes with the framing it was read with.
- A refused request with a whole body and keep-alive is answered and the connection goes on;
  any other refusal or failure answers with ``Connection: close`` and ends the connection.
- Every request is a flow with its own events: decided (``flow_decided``), then ended with its
  bytes and status (``flow_ended``), also when the client goes away before its answer.
"""

from __future__ import annotations

import _socket
import enum
import functools
import time
from collections import deque

import httptools

from egressgw.decision.names import Host, parse_host
from egressgw.decision.path import check_flow_latest, check_flow_now
from egressgw.decision.verdict import Verdict
from egressgw.egress import egress_source
from egressgw.flow import Flow, ip_text
from egressgw.listeners.connection import FAMILIES, Connection, IPAddress, Mode
from egressgw.listeners.upstreams import HttpUpstream, UpstreamFailure
from egressgw.net.dial import Dial, dial
from egressgw.net.rawstream import RawStream
from egressgw.wire import framing
from egressgw.wire.responses import to_error_response
from siem.tasks import spawn

# Methods whose request may be sent twice to the effect of once (RFC 9110 §9.2.2): only these,
# and only without a body, are retried when a reused upstream fails before answering.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})


class Request:
    """One parsed request head waiting to be relayed."""

    __slots__ = (
        "body_done",
        "fields",
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
        # (lowercased name, name, value) of the fields forwarded (framing.split_fields)
        self.fields: list[tuple[bytes, bytes, bytes]] | None = None
        self.keep_alive = True
        self.http10 = False  # an HTTP/1.0 client: answered without chunked coding or 1xx
        self.framing = framing.NO_BODY  # as read, and so as forwarded
        self.body_done = False
        # Its Proxy-Authorization value (b"" when sent twice): read for identity, never
        # forwarded (framing.HOP_BY_HOP), never logged.
        self.proxy_authorization: bytes | None = None


class Step(enum.Enum):
    """Where the request being relayed is."""

    DECIDING = 1  # its name is being resolved (a task: the slow path's one await)
    CONNECTING = 2  # a new upstream connection is being dialled
    SENDING = 3  # the head went upstream; body bytes follow as they are read
    WAITING = 4  # the whole request went upstream; its answer is awaited
    SKIPPING = 5  # refused with keep-alive: the rest of its body is read and dropped


# The steps as module globals: read on every turn of ``_advance``.
_DECIDING, _CONNECTING, _SENDING, _WAITING, _SKIPPING = Step


class Exchange:
    """One request being relayed: what it is, where it goes, how far it got."""

    # Initial values as class attributes: a request sets only what it uses.
    step = _DECIDING
    key: tuple[str, int, str | None] = ("", 0, None)
    head = b""  # as written upstream, kept for a retry
    request_done = False  # its last byte went upstream
    response_done = False  # its answer is whole
    reusable = False  # the upstream may be parked after it
    reused = False  # on a parked upstream
    retried = False
    ip: IPAddress | None = None  # the address it goes to, once decided

    def __init__(self, req: Request, flow: Flow, path: bytes, authority: bytes) -> None:
        self.req = req
        self.flow = flow
        self.path = path
        self.authority = authority
        # Sent twice, it has the effect of once: retried on a new upstream if a reused one
        # fails before answering (a body, even of length 0, is never sent twice).
        self.retryable = req.method in IDEMPOTENT and req.framing is framing.NO_BODY


class ForwardConnection(Connection):
    """The forwarding piece of a client connection: requests queued, decided, relayed in turn."""

    items: deque[Request | bytes | None] | None = None  # absolute-form requests and bodies
    exchange: Exchange | None = None  # the request being relayed
    upstream: HttpUpstream | None = None  # the upstream carrying it
    dialing: Dial | None = None  # a new upstream's connect under way
    exchanging = False  # an absolute-form request is being relayed
    via_header = b""  # this gateway's Via field, set once forwarding begins
    # A refusal (status, reason) that waits for the answers owed before it (``_refuse``).
    refusal: tuple[int, str] | None = None

    def _push(self, item: Request | bytes | None) -> None:
        """Queue a request head, body bytes or a request's end (taken up by ``_advance``)."""
        items = self.items
        if items is None:
            self._to(Mode.HTTP)
            # Only forwarding needs it: a tunnel never computes it.
            self.via_header = via_field(self.limits.via)
            items = self.items = deque()
        items.append(item)

    def _advance(self) -> None:
        """Take up what was read, as far as the request in progress lets (``Step``).

        Safe to call again from inside itself (a callback that finishes at once): every turn
        reads the state anew.
        """
        items = self.items
        while self.mode is Mode.HTTP:
            x = self.exchange
            if x is not None and x.step is not _SENDING and x.step is not _SKIPPING:
                return  # a callback moves it on
            if not items:
                if self.refusal is not None:
                    # Every earlier answer is out, or the request in progress needs bytes that
                    # will not be read any more: the refusal's turn.
                    status, reason = self.refusal
                    if x is not None and x.flow.error is None:
                        x.flow.error = f"cut short: the connection was refused: {reason}"
                    Connection._refuse(self, status, reason)
                return
            item = items.popleft()
            if item is None:  # a request's end
                if x is None:
                    pass  # (of one refused before it began)
                elif x.step is _SENDING:
                    self._end_body(x)
                else:  # the end of a skipped body
                    self.exchange = None
                    self.exchanging = False
            elif isinstance(item, bytes):
                self.pending_bytes -= len(item)
                if x is not None and x.step is _SENDING:
                    self._send_body(x, item)
            else:
                self.pending_requests -= 1
                self.pending_bytes -= item.head_size
                if self.reading_paused:
                    self._maybe_resume()
                self._begin(item)
                continue
            if self.reading_paused:
                self._maybe_resume()

    def _refuse(self, status: int, reason: str) -> None:
        """Answer with an error and close; while earlier answers are owed, after them.

        A refusal written at once would land inside an answer being relayed (a pipelined
        request refused as its predecessor's body streams). Nothing more is read meanwhile.
        """
        if self.mode is Mode.HTTP and (self.exchange is not None or self.items):
            if self.refusal is None:
                self.refusal = (status, reason)
                self._stop_parsing()
                self._pause_reading()
                self._advance()
            return
        Connection._refuse(self, status, reason)

    def _stop_parsing(self) -> None:
        """Parse nothing more the client sends (the joining class holds the parser)."""
        raise NotImplementedError

    # -- deciding ------------------------------------------------------------------------------
    def _begin(self, req: Request) -> None:
        self.exchanging = True
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
            self.close()
            return
        flow.host, flow.port, path, flow.url, authority = target
        x = self.exchange = Exchange(req, flow, path, authority)
        # Decided at once when the name's answer is cached (most requests), with no coroutine.
        verdict = check_flow_now(self.hub.runtime, flow, self.hub.loop.time())
        if verdict is None:
            self.http_task = spawn(self._decide_later(x), name=f"http-{flow.id}")
        else:
            self._decided(x, verdict)

    async def _decide_later(self, x: Exchange) -> None:
        verdict = await check_flow_latest(self.hub, x.flow)
        if self.exchange is x and self.mode is Mode.HTTP:
            self._decided(x, verdict)
            self._advance()

    def _decided(self, x: Exchange, verdict: Verdict) -> None:
        flow, req = x.flow, x.req
        if not verdict.allowed:
            flow.status = verdict.status
            self.hub.flow_decided(flow)
            close = not (req.body_done and req.keep_alive)
            self.write(to_error_response(verdict.status, verdict.reason, close=close))
            if close:
                self.close()
            else:
                x.step = _SKIPPING
            return
        self.hub.flow_decided(flow)
        ip = verdict.ip
        assert ip is not None
        x.ip = ip
        if not flow.ip_str or flow.ip is not ip:
            flow.ip_str = ip_text(ip)
        egress_ips = self.hub.egress_ips
        # An upstream is kept per (destination, source address): a request of another namespace
        # never rides a connection that leaves from another address.
        source = egress_source(flow.workload, egress_ips) if egress_ips else None
        x.key = key = (flow.ip_str, flow.port, source)
        pool = self.hub.upstreams
        upstream = pool.take(key)
        if not x.retryable:
            # Not one to send twice: a parked upstream its peer closed meanwhile (the close not
            # read yet) must not take it.
            while upstream is not None and not upstream.still_open():
                upstream.close()
                upstream = pool.take(key)
        if upstream is None:
            self._dial(x)
        else:
            self._send_head(x, upstream, reused=True)

    # -- connecting ----------------------------------------------------------------------------
    def _dial(self, x: Exchange) -> None:
        x.step = _CONNECTING
        ip = x.ip
        assert ip is not None
        pending = dial(
            self.hub.reactor,
            (x.flow.ip_str, x.flow.port),
            FAMILIES[ip.version],
            self._upstream_connected,
            self._upstream_unreachable,
            self.limits.connect_timeout,
            x.key[2],
        )
        if x.step is _CONNECTING and self.exchange is x:
            self.dialing = pending  # (None when the outcome was reported already)

    def _upstream_connected(self, sock: _socket.socket) -> None:
        self.dialing = None
        x = self.exchange
        if x is None or x.step is not _CONNECTING or self.mode is not Mode.HTTP:
            sock.close()
            return
        hub = self.hub
        upstream = HttpUpstream(hub, hub.upstreams, x.key)
        upstream.transport = RawStream(hub.reactor, sock, upstream)
        upstream.transport.resume_reading()
        self._send_head(x, upstream, reused=False)
        self._advance()

    def _upstream_unreachable(self, exc: OSError) -> None:
        self.dialing = None
        x = self.exchange
        if x is None or x.step is not _CONNECTING:
            return
        flow = x.flow
        if isinstance(exc, TimeoutError):
            status, reason = 504, f"connect to {flow.ip_str}:{flow.port} timed out"
        else:
            status, reason = 502, f"connect to {flow.ip_str}:{flow.port}: {exc.strerror or exc}"
        self.hub.count_error("upstream_timeout" if status == 504 else "upstream_unreachable")
        flow.error = reason
        flow.status = status
        self._end_exchange(x)
        self.write(to_error_response(status, reason, close=True))
        self.close()

    # -- relaying ------------------------------------------------------------------------------
    def _send_head(self, x: Exchange, upstream: HttpUpstream, reused: bool) -> None:
        x.reused = reused
        x.step = _SENDING
        self.upstream = upstream
        req = x.req
        upstream.begin(self, req.method == b"HEAD", req.http10, req.keep_alive)
        head = x.head
        if not head:
            head = x.head = _request_head(req, x.path, x.flow, self.via_header, x.authority)
        x.flow.bytes_out = len(head)  # (a retried request has no body: counted once)
        stream = upstream.transport
        if self.client_full:
            stream.pause_reading()  # the client still has earlier answers to read
        stream.write(head)
        if x.request_done and self.upstream is upstream:
            self._request_sent(x, upstream)

    def _send_body(self, x: Exchange, item: bytes) -> None:
        upstream = self.upstream
        assert upstream is not None
        x.flow.bytes_out += len(item)
        if x.req.framing.kind is framing.Kind.CHUNKED:
            upstream.transport.write(b"%x\r\n%s\r\n" % (len(item), item))
        else:
            upstream.transport.write(item)

    def _end_body(self, x: Exchange) -> None:
        upstream = self.upstream
        assert upstream is not None
        if x.req.framing.kind is framing.Kind.CHUNKED:
            upstream.transport.write(b"0\r\n\r\n")
        x.request_done = True
        self._request_sent(x, upstream)

    def _request_sent(self, x: Exchange, upstream: HttpUpstream) -> None:
        if x.response_done:
            self._finish(x)
            return
        x.step = _WAITING
        if upstream.in_head:
            upstream.head_deadline = time.monotonic() + self.limits.response_timeout

    def response_done(self, reusable: bool) -> None:
        """The upstream relayed the whole answer (``reusable``: it may be parked)."""
        x = self.exchange
        if x is None:
            return
        x.response_done = True
        x.reusable = reusable
        if x.request_done:
            self._finish(x)
            self._advance()

    def upstream_failed(self, failure: UpstreamFailure, answered_nothing: bool) -> None:
        """The upstream failed the exchange (and is closed): retry it, or answer and close."""
        x = self.exchange
        self.upstream = None
        if x is None or self.mode is not Mode.HTTP:
            return
        if (
            x.reused
            and answered_nothing
            and x.retryable
            and not x.retried
            and failure.kind == "upstream_closed"
        ):
            # A parked upstream closed by its peer as this request went out: once more, anew.
            x.retried = True
            self.hub.count_error("upstream_reuse_failed")
            self._dial(x)
            return
        flow = x.flow
        flow.error = str(failure)
        self.hub.count_error(failure.kind)
        if flow.status is None:
            flow.status = failure.status
            self.write(to_error_response(failure.status, f"upstream: {failure}", close=True))
        self._end_exchange(x)
        self.close()

    def _finish(self, x: Exchange) -> None:
        """The exchange is whole both ways: park or close its upstream, end the flow."""
        upstream = self.upstream
        self.upstream = None
        assert upstream is not None
        stream = upstream.transport
        if x.reusable and not upstream.closed and not stream.buffer:
            if not stream.reading:
                stream.resume_reading()  # parked, its peer's close must be heard
            self.hub.upstreams.park(x.key, upstream, self.hub.clock)
        else:
            upstream.close()
        if self.peer_full:
            self.resume_client_reading()  # that upstream's full buffer no longer holds it
        self._end_exchange(x)
        if not x.req.keep_alive or upstream.client_close:
            self.close()

    def _end_exchange(self, x: Exchange) -> None:
        self.exchange = None
        self.exchanging = False
        self._end_flow(x.flow)

    def _close_forward(self, reason: str | None) -> None:
        """The connection closes: drop the exchange in progress and its upstream."""
        if self.dialing is not None:
            self.dialing.cancel()
            self.dialing = None
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.close()
        x = self.exchange
        if x is not None:
            self.exchange = None
            self.exchanging = False
            if x.step is not _DECIDING and x.step is not _SKIPPING:
                # Decided and allowed: its end event says why it ended early.
                flow = x.flow
                if flow.error is None:
                    flow.error = reason or "client closed before the response ended"
                self._end_flow(flow)

    def _expire_forward(self, now: float) -> None:
        """The response head's deadline (called by the sweeper through ``expire``)."""
        upstream = self.upstream
        if upstream is not None:
            upstream.expire(now)


@functools.lru_cache(maxsize=16)
def via_field(via: str) -> bytes:
    """The ``Via`` field this gateway adds, for the name ``proxy.via``."""
    return f"Via: 1.1 {via}\r\n".encode()


def _parse_target(url: bytes) -> tuple[Host, int, bytes, str, bytes]:
    """Absolute-form target -> (host, port, origin-form path, canonical URL for events/feeds,
    authority for the Host field).
    """
    scheme = url[:8].lower()
    if not scheme.startswith(b"http://"):
        if scheme == b"https://":
            raise ValueError("https:// in absolute form: use CONNECT for TLS")
        raise ValueError("request target must be an absolute http:// URL")
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError as e:
        raise ValueError(f"bad URL: {e}") from e
    key = (parsed.host, parsed.port)
    found = _TARGETS.get(key)
    if found is None:
        found = _parse_authority(*key)
        if len(_TARGETS) >= _TARGETS_CACHE:
            _TARGETS.clear()
        _TARGETS[key] = found
    host, port, origin, authority = found
    path = parsed.path or b"/"
    if parsed.query:
        path += b"?" + parsed.query
    return host, port, path, origin + path.decode("latin-1"), authority


# Each target's host and port parsed once (most requests go to a few): by the URL parser's host
# and port, the canonical Host, port, "http://authority" and the Host field's value.
_TARGETS: dict[tuple[bytes | None, int | None], tuple[Host, int, str, bytes]] = {}
_TARGETS_CACHE = 4096


def _parse_authority(raw_host: bytes | None, raw_port: int | None) -> tuple[Host, int, str, bytes]:
    if not raw_host:
        raise ValueError("URL has no host")
    host_text = raw_host.decode("utf-8", "strict")
    if ":" in host_text and not host_text.startswith("["):
        host_text = f"[{host_text}]"
    host = parse_host(host_text)
    port = 80 if raw_port is None else raw_port
    if port == 0:
        raise ValueError("port 0 is not a destination")  # as CONNECT refuses it
    authority = host.authority(port, 80)
    return host, port, f"http://{authority}", authority.encode()


# Request fields the gateway writes itself: Host from the target, Via extended (after the rest).
REQUEST_DROPPED = framing.NOT_FORWARDED | {b"host"}


def _request_head(
    req: Request, path: bytes, flow: Flow, via: bytes, authority: bytes | None = None
) -> bytes:
    if authority is None:
        host = flow.host
        assert host is not None
        authority = host.authority(flow.port, 80).encode()
    fields = req.fields
    if fields is None:
        fields = framing.split_fields(req.headers, REQUEST_DROPPED)[0]
    out = [req.method, b" ", path, b" HTTP/1.1\r\nHost: ", authority, b"\r\n"]
    incoming_via: list[bytes] = []
    for lower, name, value in fields:
        if lower == b"via":
            incoming_via.append(value)
        else:
            out += (name, b": ", value, b"\r\n")
    if incoming_via:
        out.append(b"Via: " + b", ".join(incoming_via) + b", " + via[5:])
    else:
        out.append(via)
    out.append(framing.to_framing_fields(req.framing))
    out.append(b"\r\n")
    return b"".join(out)
