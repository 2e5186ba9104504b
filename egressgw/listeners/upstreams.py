"""The upstream side of absolute-form forwarding: one HTTP/1.1 connection to a destination,
its responses parsed (httptools) and relayed to the client whose request it carries, kept in
the gateway's pool (``egressgw.net.pool``) between requests.

``HttpUpstream`` is the protocol of a ``RawStream`` on the gateway's epoll set; everything
happens in its callbacks. While it carries a request it belongs to one client connection
(``client``); parked in the pool it belongs to none.

Rules:

- One exchange at a time: ``begin`` says what the client asked (HEAD, its HTTP version,
  keep-alive), the client writes the request, and the response comes back through
  ``client.response_done(reusable)`` once whole, or ``client.upstream_failed(...)``.
- Completion is reported after the parser returns, never from inside it: bytes after the end
  of a response in the same read are unsolicited (502, the upstream closed), not the answer to
  the client's next request.
- Bytes from an upstream that was asked nothing (parked, or its answer already whole), and a
  101 nobody asked for, close it (counted as ``bad_upstream_response``).
- A response head larger than ``proxy.max_header_bytes`` is a 502 (counted while a line is
  still incomplete: the parser would otherwise concatenate a line that never ends).
- ``head_deadline`` (``time.monotonic()``) is when the response head must have begun to end;
  the gateway's sweeper checks it (``expire``, once a second).
- An HTTP/1.0 client gets no 1xx and no chunked coding (de-chunked, delimited by the close);
  a transfer coding it cannot know is a 502. Hop-by-hop fields are not forwarded; ``Via`` is
  added. A response to HEAD leaves the connection unusable (llhttp cannot be told it was HEAD).
- Parked, its peer's close (EOF or error) takes it out of the pool.
"""

from __future__ import annotations

import socket
from collections.abc import Hashable
from http import HTTPStatus
from typing import Protocol

import httptools
import structlog

from egressgw.listeners.connection import Hub, Nobody, Refuse
from egressgw.net.pool import IdlePool
from egressgw.net.rawstream import RawStream
from egressgw.wire import framing
from egressgw.wire.responses import CONTINUE

log = structlog.get_logger("egressgw.listeners.upstreams")

_NO_RESPONSE_PARSER = httptools.HttpResponseParser(Nobody())
_NEVER = float("inf")


class UpstreamFailure(ConnectionError):
    """An exchange with an upstream failed: the status to answer and the error kind to count."""

    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.kind = kind


class UpstreamClient(Protocol):
    """What an upstream needs of the client connection whose request it carries."""

    via_header: bytes

    def write(self, data: bytes) -> None:
        """Send bytes to the client."""
        ...

    def note_status(self, status: int) -> None:
        """The response's status, forwarded."""
        ...

    def flow_bytes_in(self, n: int) -> None:
        """Count bytes from the upstream."""
        ...

    def pause_client_reading(self) -> None:
        """The upstream's write buffer is full."""
        ...

    def resume_client_reading(self) -> None:
        """It drained."""
        ...

    def response_done(self, reusable: bool) -> None:
        """The whole response went to the client; ``reusable``: the upstream may be parked."""
        ...

    def upstream_failed(self, failure: UpstreamFailure, answered_nothing: bool) -> None:
        """The exchange failed (the upstream is closed); ``answered_nothing``: not one byte
        of a response came.
        """
        ...


class HttpUpstream:
    """An upstream HTTP/1.1 connection (the protocol of its RawStream)."""

    transport: RawStream

    def __init__(self, hub: Hub, pool: IdlePool[HttpUpstream], key: Hashable) -> None:
        self.hub = hub
        self.pool = pool
        self.key = key  # (destination address, port, source address)
        self.max_header_bytes = hub.limits.max_header_bytes
        self.parser = httptools.HttpResponseParser(self)
        self.client: UpstreamClient | None = None
        self.expecting = False  # a response is owed to ``client``
        self.complete = False  # the response ended during the current read
        self.answered = False  # a byte of the response came
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
        self.raw_head = 0  # bytes received since that head began
        self.head_deadline = 0.0  # time.monotonic() by which the head must have come
        self.keep_alive_after = False  # the finished response leaves the connection usable
        # What one read brings for the client, written in one send after the parser returns
        # (a small response's head and body would otherwise cost a system call each).
        self.out: list[bytes] = []
        self.closed = False

    # -- an exchange
    def begin(
        self, client: UpstreamClient, head_only: bool, http10: bool, keep_alive: bool
    ) -> None:
        """Carry a request of ``client`` (HEAD, from an HTTP/1.0 client, asking for keep-alive)."""
        self.client = client
        self.expecting = True
        self.complete = self.answered = False
        self.head_only = head_only
        self.http10 = http10
        self.keep_alive = keep_alive
        self.status = self.raw_head = 0
        self.in_head = True
        self.head_deadline = _NEVER

    def still_open(self) -> bool:
        """True unless the peer closed it (or sent bytes) while it was parked: one peek."""
        try:
            self.transport.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return False  # b"" is its EOF; any byte would be unsolicited

    def expire(self, now: float) -> None:
        """Fail with 504 when the response head is late (called by the sweeper)."""
        if self.in_head and now > self.head_deadline:
            timeout = self.hub.limits.response_timeout
            self._fail(504, "response_timeout", f"no response head within {timeout:g}s")

    def close(self) -> None:
        """Close quietly (parked and dropped, or abandoned by its client)."""
        if not self.closed:
            self.closed = True
            self.client = None
            self.expecting = False
            self.transport.close_quietly()
            self.parser = _NO_RESPONSE_PARSER

    def _fail(self, status: int, kind: str, reason: str) -> None:
        """End the exchange with an error and close."""
        client = self.client
        answered_nothing = not self.answered
        expecting = self.expecting
        self.close()
        if client is not None and expecting:
            client.upstream_failed(UpstreamFailure(status, kind, reason), answered_nothing)

    # -- RawStream callbacks
    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or not self.expecting:
            # Nothing was asked: bytes now answer nothing. Close rather than relay them (or
            # fold them into the next exchange's answer).
            self.hub.count_error("bad_upstream_response")
            self.pool.discard(self)
            self.close()
            return
        self.answered = True
        client.flow_bytes_in(len(data))
        if self.in_head:
            self.raw_head += len(data)
        failure: tuple[int, str, str] | None = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, Refuse):
                failure = (cause.status, "bad_upstream_response", cause.reason)
            else:
                log.error("response parser callback failed", error=repr(cause))
                failure = (502, "internal", "internal error")
        except httptools.HttpParserError as e:
            failure = (502, "bad_upstream_response", f"malformed response from upstream: {e}")
        except httptools.HttpParserUpgrade:
            failure = (502, "bad_upstream_response", "upstream switched protocols unasked")
        out = self.out
        if out:
            client.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.complete:
            # The response is whole: what failed came after it, and closes the upstream only.
            self.complete = self.expecting = False
            reusable = self.keep_alive_after
            if failure is not None:
                self.hub.count_error(failure[1])
                reusable = False
                self.close()
            self.client = None
            client.response_done(reusable)
            return
        if failure is None and self.in_head and self.raw_head > self.max_header_bytes:
            failure = (
                502,
                "upstream_head_too_large",
                f"upstream response head larger than {self.max_header_bytes} bytes",
            )
        if failure is not None:
            self.hub.count_error(failure[1])
            self._fail(*failure)

    def eof_received(self) -> bool:
        return False  # the stream closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.parser = _NO_RESPONSE_PARSER
        client, expecting = self.client, self.expecting
        self.client = None
        self.expecting = False
        if client is None or not expecting:
            self.pool.discard(self)  # parked: its peer closed it
            return
        if self.close_delimited and self.status and not self.in_head:
            client.response_done(False)  # the close delimits the body: the answer is whole
            return
        reason = "upstream closed before the response ended"
        if exc is not None:
            reason = f"upstream: {exc}"
        client.upstream_failed(UpstreamFailure(502, "upstream_closed", reason), not self.answered)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_client_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_client_reading()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if not self.expecting or self.complete:
            raise Refuse(502, "unsolicited response from upstream")
        self.headers = []
        self.head_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_header_bytes:
            raise Refuse(502, "upstream response head too large")
        if self.in_head:
            self.headers.append((name, value))
        # else a trailer field: counted against the limit, never forwarded as a head field

    def on_headers_complete(self) -> None:
        client = self.client
        assert client is not None
        self.status = status = self.parser.get_status_code()
        if status == 101:
            raise Refuse(502, "upstream switched protocols (101) though no upgrade was asked")
        if status < 200:
            if status == 100 and not self.http10:  # HTTP/1.0 knows no 1xx
                self.out.append(CONTINUE)
            self.headers = []
            self.head_size = self.raw_head = 0
            return
        self.in_head = False
        fields, framed_by = framing.split_fields(self.headers)
        try:
            fr = framing.parse_response_framing(status, framed_by, self.head_only)
        except ValueError as e:
            raise Refuse(502, f"upstream response framing: {e}") from None
        http10 = self.http10
        try:
            framing_fields = framing.to_framing_fields(fr, chunked_ok=not http10)
        except ValueError as e:
            raise Refuse(502, f"upstream response: {e}") from None
        out = self.out
        out.append(_status_line(status))
        for _, name, value in fields:
            out += (name, b": ", value, b"\r\n")
        chunked = fr.kind is framing.Kind.CHUNKED
        self.close_delimited = fr.kind is framing.Kind.CLOSE
        # An HTTP/1.0 client gets a chunked body de-chunked, delimited by the close, and keeps
        # the connection only when it asked to and the length is known.
        self.chunked = chunked and not http10
        self.client_close = self.close_delimited or (http10 and (chunked or not self.keep_alive))
        out.append(framing_fields)
        out.append(client.via_header)
        if self.client_close:
            out.append(b"Connection: close\r\n")
        elif http10:
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        client.note_status(status)
        if self.head_only:
            # llhttp cannot be told the request was HEAD: the response ends here, and the
            # connection is not reused (the parser may wait for a body that never comes).
            self.keep_alive_after = False
            self.complete = True

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            return
        if self.chunked:
            self.out.append(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.status < 200 or self.head_only:
            return
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
        self.keep_alive_after = self.parser.should_keep_alive() and not self.close_delimited
        self.complete = True


_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status
