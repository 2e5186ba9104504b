"""A CONNECT tunnel's destination side: connect to a checked address, read the client's first
bytes as a TLS ClientHello, decide again with what they show, then relay bytes both ways.

``TunnelConnection`` is the tunnel piece of a client connection (see ``connection.py`` for how
the pieces join); it needs the tunnel's target and the client's bytes after the CONNECT head,
not the head's parser, so a listener that learns the target some other way can use it too.

Rules:

- The destination is the address the decision path allowed (``Verdict.ip``), connected to by
  ``egressgw.net.dial``; the name is never resolved again. The 200 goes out once connected.
- The client's first bytes are read as a ClientHello (``wire.tlshello``) before any passes: the
  tunnel is decided again with the protocol and the SNI they show (``recheck_tunnel``: an SNI
  can refuse a tunnel, never unlock one). Bytes that are not TLS make it a ``tcp`` tunnel. Up
  to ``MAX_PENDING_BODY`` bytes that arrive while the flow is being decided are kept for that.
- Once decided, bytes go socket to socket (``RawStream.relay``) without this module's code;
  EOF, errors and backpressure still come here (each side's full buffer pauses the other's
  reading).
- A tunnel's outcome: a client reset (RST) after the destination sent bytes and every one of
  them was handed to the client's socket is a normal close (clients close with unread input,
  such as a TLS close_notify, and the kernel resets: the exchange itself was whole); a reset
  before any byte from the destination, or with bytes still undelivered, is a failure with
  the error in the event. The gateway cannot see whether the client application read them.
- Either side's EOF is passed on as a half-close; the tunnel closes once both sides finished.
"""

from __future__ import annotations

import _socket
from typing import Any

from egressgw.decision.names import parse_authority, parse_host
from egressgw.decision.path import check_flow_latest, check_flow_now, recheck_tunnel
from egressgw.decision.verdict import Verdict
from egressgw.egress import egress_source
from egressgw.flow import Flow, ip_text
from egressgw.listeners.connection import FAMILIES, Connection, IPAddress, Mode
from egressgw.net.dial import Dial, dial
from egressgw.net.rawstream import RawStream
from egressgw.wire.responses import CONNECT_ESTABLISHED
from egressgw.wire.tlshello import MAX_HELLO_SIZE, TLS_HANDSHAKE, parse_client_hello
from siem.tasks import spawn

# Bytes of a tunnel's first client bytes buffered while its flow is decided. (Absolute-form
# requests have their own limits: proxy.max_pending_bytes and proxy.max_pipelined_requests.)
MAX_PENDING_BODY = 256 * 1024


class TunnelUpstream:
    """The destination side of a tunnel as its RawStream sees it: everything goes to the client."""

    __slots__ = ("client",)

    def __init__(self, client: TunnelConnection) -> None:
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


class TunnelConnection(Connection):
    """The tunnel piece of a client connection: target -> decision -> connect -> peek -> relay."""

    pipe: RawStream | None = None  # a tunnel's destination
    connecting: Dial | None = None  # a tunnel's connect under way
    peeking = False
    peek_buffer = b""
    client_eof = False
    upstream_eof_seen = False

    # -- stream callbacks ----------------------------------------------------------------------
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
        """The client's stream is gone: close what is left and leave the gateway's books."""
        if self.mode is not Mode.CLOSED:
            flow = self.flow
            if flow is not None and exc is not None and not self._closed_after_exchange(exc):
                flow.error = flow.error or f"client: {exc}"
            self.close()
        # Whatever the stream still holds will never be sent, so nothing is left to wait for
        # (close() counts a failed stream's unsent bytes as still flushing).
        self._forget()

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

    # -- CONNECT -----------------------------------------------------------------------------------
    def _open_tunnel(self, target: bytes, rest: bytes, authorization: bytes | None) -> None:
        """Decide a tunnel to ``target`` (``host:port``) for a client that presented
        ``authorization`` (a Proxy-Authorization value); ``rest``: its bytes after the request.
        """
        self._to(Mode.CHECKING)
        self.peek_buffer = rest
        flow = self._new_flow()
        if authorization is not None:
            flow.credential = self._credential(authorization)
        flow.protocol = "tls"  # assumed until the first bytes say otherwise
        try:
            flow.host, flow.port = parse_authority(target.decode("ascii"))
        except (ValueError, UnicodeDecodeError) as e:
            self._refuse(400, f"bad CONNECT target: {e}")
            return
        verdict = check_flow_now(self.hub.runtime, flow, self.hub.loop.time())
        if verdict is None:  # the name must be resolved first
            self.http_task = spawn(self._resolve_then_connect(flow), name=f"connect-{flow.id}")
        else:
            self._connect(flow, verdict)

    async def _resolve_then_connect(self, flow: Flow) -> None:
        verdict = await check_flow_latest(self.hub, flow)
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
        self._dial_tunnel(flow, ip)

    def _dial_tunnel(self, flow: Flow, ip: IPAddress, mark: int | None = None) -> None:
        """Connect to ``flow.ip_str`` and port, from the workload's egress source if any."""
        egress_ips = self.hub.egress_ips
        self.connecting = dial(
            self.hub.reactor,
            (flow.ip_str, flow.port),
            FAMILIES[ip.version],
            self._connected,
            self._connect_failed,
            self.limits.connect_timeout,
            egress_source(flow.workload, egress_ips) if egress_ips else None,
            mark,
        )

    def _close_streams(self, reason: str | None) -> bool:
        """Close the destination's stream and any connect under way, then the client's, and
        record ``reason`` on the flow; True while the client's unsent bytes still drain.

        The destination's stream is closed quietly: the connection needs no connection_lost
        from it. So is the client's, unless bytes wait to be sent to the client: then the
        connection counts as open (a draining gateway waits for it) until they are out.
        """
        if self.pipe is not None:
            self.pipe.close_quietly()
        if self.connecting is not None:
            self.connecting.cancel()
        transport = self.transport
        flushing = transport is not None and transport.get_write_buffer_size() > 0
        if transport is not None:
            if flushing:
                transport.close()
            else:
                transport.close_quietly()
        flow = self.flow
        if reason is not None and flow is not None and flow.error is None:
            flow.error = reason  # before the end event, which reports it
        return flushing

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
        self.pipe = RawStream(self.hub.reactor, sock, TunnelUpstream(self))
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
