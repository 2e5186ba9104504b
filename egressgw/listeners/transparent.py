"""The transparent listener: TCP that the node's nftables rules redirected (``redirect to :PORT``)
is accepted here, its original destination read, its first bytes peeked for a name, and then
decided and relayed by the tunnel piece, as a CONNECT tunnel would be, with no request head.

Modes (``connection.Mode``): HEAD while the first bytes are peeked, CHECKING while the name's
binding and the flow are decided, TUNNEL once connected, CLOSED.

Rules:

- The destination is the original one (``SO_ORIGINAL_DST``): its IP and port are the flow's
  host and port, and the only address ever connected to (with ``node.exempt_mark`` in node
  mode, and the namespace's ``egress_ips`` source). A connection that was not redirected (no
  original destination, or the listener's own address) is reset and counted.
- The first bytes are read as a TLS ClientHello (the SNI) or an HTTP/1 request head (the Host),
  for up to ``transparent.peek_timeout``: a client that sends nothing first (SMTP, SSH: the
  server speaks first) is decided by address. Other bytes are a ``tcp`` flow with no name.
- A claimed name must be bound to the original address (``decision.binding``): the gateway's
  DNS proxy gave this client that address for it within its TTL, or the gateway's resolver
  resolves it there. Otherwise the connection is refused, whatever policy says of the name
  (a permitted SNI on a forbidden address is domain fronting).
- Policy judges the bound name with the address (``decide_transparent``); with no name, the
  name the client got the address for from the DNS proxy, if any, else the address alone. One
  decision path: identity, feeds, policy and events are the explicit proxy's.
- A refusal comes after the decision event. Plain HTTP is answered in its own protocol (403
  with the reason, or 502/504 when the connect fails) and closed; any other protocol has none
  in which to say why, and is reset (``SO_LINGER`` 0), which tells the client at once.
- The peeked bytes go to the destination first, unchanged, then bytes flow socket to socket.
- Plain HTTP stays read after its first head (``listeners.hostwatch``): every later request
  on the connection (keep-alive, pipelined) must name the same host, or the connection is reset
  before that request reaches the destination, with a refused flow of its own; else one
  permitted name would carry requests for any other name served at the same address.
- A request that asks to change protocols (``Upgrade``: WebSocket) is sent on, and what the
  client sends after it is held until the destination answers: a ``101`` switches the
  connection to opaque bytes (as a TLS connection's are after its ClientHello); any other
  answer means the destination still reads HTTP, so the held bytes are read as requests, held
  to the same host. An upgrade nobody grants carries no request past the check.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from typing import Any, Protocol

from egressgw.decision.answers import AnswerLog
from egressgw.decision.binding import Binding, canonical, classify_binding
from egressgw.decision.names import Host, parse_host
from egressgw.decision.path import decide_transparent
from egressgw.decision.verdict import Verdict
from egressgw.flow import Flow, ip_text
from egressgw.identity.workload import Peer
from egressgw.listeners.connection import Hub, IPAddress, Mode, source_ip
from egressgw.listeners.hostwatch import HostWatch
from egressgw.listeners.tunnel import MAX_PENDING_BODY, TunnelConnection, TunnelUpstream
from egressgw.net.origdst import original_dst
from egressgw.net.rawstream import RawStream
from egressgw.resolver import ResolveError
from egressgw.wire.httphost import parse_http_host
from egressgw.wire.tlshello import MAX_HELLO_SIZE, TLS_HANDSHAKE, parse_client_hello
from siem.tasks import spawn

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends a reset


class TransparentHub(Hub, Protocol):
    """What a transparent connection needs from the gateway."""

    answers: AnswerLog  # the DNS proxy's answers, per client
    exempt_mark: int | None  # SO_MARK of outbound connections (node mode)
    peek_timeout: float  # transparent.peek_timeout

    def connection_opened(self, conn: TransparentConnection) -> str | None:
        """Register a client connection (None), or refuse it: which limit it would pass."""
        ...

    def connection_closed(self, conn: TransparentConnection) -> None:
        """Forget a client connection."""
        ...


class TransparentConnection(TunnelConnection):
    """One redirected client connection (the protocol of a RawStream)."""

    hub: TransparentHub
    claimed: str | None = None  # the name the first bytes claimed (None: an address or none)
    host_watch: HostWatch | None = None  # plain HTTP: the Host of each later request
    switching: bytes | None = None  # client bytes held after an Upgrade, until the answer
    switch_answer = b""  # the destination's first bytes after an Upgrade, while too few to read
    original: tuple[IPAddress, int] | None = None
    peek_timer: asyncio.TimerHandle | None = None

    def __init__(self, hub: TransparentHub) -> None:
        self.hub = hub
        self.limits = hub.limits
        self.last_active = hub.clock

    # -- stream callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: RawStream) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            ip, self.peer_text = source_ip(peer[0])
            self.peer = (ip, peer[1])
        sock = transport.get_extra_info("socket")
        try:
            original = original_dst(sock)
        except (OSError, ValueError):
            original = None
        if original is None or original == _own(sock):
            # Connected to the port itself: no destination to decide, and none to loop back to.
            self.hub.count_error("not_redirected")
            self._reset()
            return
        self.original = original
        refusal = self.hub.connection_opened(self)
        if refusal is not None:
            self._refuse_flow(self._flow_to_original("tcp"), refusal)
            return
        self.peek_timer = self.hub.loop.call_later(self.hub.peek_timeout, self._peek_timed_out)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.hub.clock
        mode = self.mode
        if mode is Mode.TUNNEL:
            if self.switching is not None:
                self.switching += data  # an Upgrade awaits its answer (see the docstring)
                if len(self.switching) > MAX_PENDING_BODY:
                    self.pause_client_reading()
            elif self.host_watch is None:
                self._tunnel_from_client(data)
            else:
                passed = self._hosts_hold(data)
                if passed:
                    self._tunnel_from_client(passed)
        elif mode is Mode.HEAD:
            self.peek_buffer += data
            self._peek()
        elif mode is Mode.CHECKING:
            self.peek_buffer += data
            if len(self.peek_buffer) > MAX_PENDING_BODY:
                self.pause_client_reading()

    def eof_received(self) -> bool:
        if self.mode is Mode.HEAD:
            self.client_eof = True
            self._begin("tcp", None)  # all the client will send first is here
            return True
        if self.mode is Mode.CHECKING:
            self.client_eof = True  # passed on once connected
            return True
        return super().eof_received()

    def pause_writing(self) -> None:
        if self.pipe is not None:
            self.pipe.pause_reading()

    def resume_writing(self) -> None:
        if self.pipe is not None:
            self.pipe.resume_reading()

    # -- peek ----------------------------------------------------------------------------------
    def _peek(self) -> None:
        buf = self.peek_buffer
        if buf[0] == TLS_HANDSHAKE:
            try:
                hello = parse_client_hello(buf)
            except ValueError:
                self._begin("tcp", None)
                return
            if hello is None:
                if len(buf) > MAX_HELLO_SIZE + 5:
                    self._begin("tcp", None)
                return
            self._claim("tls", hello.sni)
            return
        try:
            head = parse_http_host(buf)
        except ValueError:
            self._begin("tcp", None)
            return
        if head is not None:
            self._claim("http", head.host)

    def _peek_timed_out(self) -> None:
        self.peek_timer = None
        if self.mode is Mode.HEAD:
            self._begin("tcp", None)

    def _claim(self, protocol: Any, text: str | None) -> None:
        """The first bytes name a host (``text``): a name is claimed, an IP literal is not."""
        if text is None:
            self._begin(protocol, None)
            return
        try:
            host = parse_host(text)
        except ValueError:
            flow = self._begin_flow(protocol)
            what = "TLS server name" if protocol == "tls" else "HTTP Host"
            self._refuse_flow(flow, f"invalid {what} {text[:100]!r}")
            return
        self._begin(protocol, host.name)

    # -- decide --------------------------------------------------------------------------------
    def _flow_to_original(self, protocol: Any) -> Flow:
        flow = self._new_flow()
        assert self.original is not None
        ip, flow.port = self.original
        flow.host = Host(None, ip)
        flow.protocol = protocol
        return flow

    def _begin_flow(self, protocol: Any) -> Flow:
        if self.peek_timer is not None:
            self.peek_timer.cancel()
            self.peek_timer = None
        self._to(Mode.CHECKING)
        return self._flow_to_original(protocol)

    def _begin(self, protocol: Any, claimed: str | None) -> None:
        """Bind the claimed name to the original address, then decide (see the docstring)."""
        flow = self._begin_flow(protocol)
        self.claimed = claimed
        if protocol == "tls":
            flow.sni = claimed
        ip = flow.host.ip if flow.host is not None else None
        assert ip is not None
        answered = self.hub.answers.name_of(self.peer[0], ip, time.monotonic())
        if claimed is None or (answered is not None and canonical(answered) == claimed):
            self._decide(flow, classify_binding(claimed, ip, answered, None))
            return
        rt = self.hub.runtime
        cached = rt.resolver.cached(claimed, self.hub.loop.time())
        if cached is None:
            self.http_task = spawn(
                self._resolve_then_decide(flow, claimed, answered), name=f"bind-{flow.id}"
            )
        elif isinstance(cached, ResolveError):
            self._decide(flow, classify_binding(claimed, ip, answered, None, str(cached)))
        else:
            self._decide(flow, classify_binding(claimed, ip, answered, cached.ips))

    async def _resolve_then_decide(self, flow: Flow, claimed: str, answered: str | None) -> None:
        ip = flow.host.ip if flow.host is not None else None
        assert ip is not None
        try:
            resolution = await self.hub.runtime.resolver.resolve(claimed, self.peer_text)
        except ResolveError as e:
            binding = classify_binding(claimed, ip, answered, None, str(e))
        else:
            binding = classify_binding(claimed, ip, answered, resolution.ips)
        if self.mode is not Mode.CLOSED:
            self._decide(flow, binding)

    def _decide(self, flow: Flow, binding: Binding) -> None:
        if binding.refusal is not None:
            self._refuse_flow(flow, binding.refusal)
            return
        verdict = decide_transparent(self.hub.runtime, flow, binding.name)
        if not verdict.allowed:
            self.hub.flow_decided(flow)
            self._refuse(verdict.status, verdict.reason)
            return
        self._connect(flow, verdict)

    def _refuse_flow(self, flow: Flow, reason: str) -> None:
        """Refuse before policy (an unbound or invalid name): the event still says who it was."""
        flow.workload = self.hub.runtime.inventory.lookup(Peer(flow.source_ip, flow.credential))
        flow.verdict = Verdict.deny(reason)
        self.hub.flow_decided(flow)
        self._refuse(403, reason)

    # -- connect and relay ---------------------------------------------------------------------
    def _connect(self, flow: Flow, verdict: Verdict) -> None:
        """Start a non-blocking connect to the original address (marked, from the egress source)."""
        ip = verdict.ip
        assert ip is not None
        flow.ip_str = ip_text(ip)
        self._dial_tunnel(flow, ip, self.hub.exempt_mark)

    def _connected(self, sock: _socket.socket) -> None:
        self.connecting = None
        if self.mode is Mode.CLOSED:
            sock.close()
            return
        flow = self.flow
        assert flow is not None
        if flow.protocol == "http":
            # Requests pipelined behind the first, read while deciding, are held to its host too.
            self.host_watch = HostWatch()
            passed = self._hosts_hold(self.peek_buffer)
            if passed is None:
                sock.close()
                return
            self.peek_buffer = passed
        self.pipe = RawStream(self.hub.reactor, sock, TunnelUpstream(self))
        self._to(Mode.TUNNEL)
        self.hub.tunnel_opened()
        self.pipe.resume_reading()
        self._flush_peek()  # what the client sent first goes first
        if self.client_eof:
            self.pipe.write_eof()
        self.resume_client_reading()
        if self.transport is not None:
            if self.host_watch is None:
                self.transport.relay(self.pipe, self._count_out)
            if self.switching is None:
                self.pipe.relay(self.transport, self.flow_bytes_in)
        self.hub.flow_decided(flow)

    def _refuse(self, status: int, reason: str) -> None:
        """Plain HTTP is answered (403, 502, 504) and closed; any other protocol is reset."""
        if self.flow is not None and self.flow.protocol == "http" and self.mode is Mode.CHECKING:
            super()._refuse(status, reason)
        else:
            self._reset()

    # -- later requests of plain HTTP ----------------------------------------------------------
    def _hosts_hold(self, data: bytes) -> bytes | None:
        """What of ``data`` goes on now, if every request head completed in it names the
        connection's host (bytes after an Upgrade are held for its answer); else None: the
        connection is reset and a refused flow of its own says why.
        """
        watch = self.host_watch
        assert watch is not None
        try:
            hosts = watch.feed(data)
        except ValueError as e:
            self._cut_later(None, f"later request on a kept-alive connection: {e}")
            return None
        for text in hosts:
            name: str | None = None
            if text is not None:
                try:
                    name = parse_host(text).name
                except ValueError:
                    self._cut_later(None, f"invalid HTTP Host {text[:100]!r} on a later request")
                    return None
            if name != self.claimed:
                first = self.claimed or "no name"
                self._cut_later(
                    name,
                    f"HTTP Host {name or text} on a connection bound to {first}: "
                    "a new name needs a new connection",
                )
                return None
        if watch.upgraded:
            # Held until the destination answers the Upgrade (see the docstring).
            self.switching = data[watch.upgrade_at :]
            self.switch_answer = b""
            self.pause_client_reading()
            if self.pipe is not None:
                self.pipe.unrelay()  # its answer comes through from_upstream, to be read
            return data[: watch.upgrade_at]
        return data

    def from_upstream(self, data: bytes) -> None:
        """Bytes from the destination; after an Upgrade, its answer decides what follows."""
        super().from_upstream(data)
        if self.switching is None or self.mode is not Mode.TUNNEL:
            return
        answer = self.switch_answer + data
        if len(answer) < len(b"HTTP/1.1 101") and b"\n" not in answer:
            self.switch_answer = answer  # too few bytes to read the status yet
            return
        held, self.switching, self.switch_answer = self.switching, None, b""
        transport, pipe = self.transport, self.pipe
        if transport is None or pipe is None:
            return
        if answer.startswith((b"HTTP/1.1 101", b"HTTP/1.0 101")):
            # Switched: opaque from here on, socket to socket, as any tunnel.
            self.host_watch = None
            transport.relay(pipe, self._count_out)
            pipe.relay(transport, self.flow_bytes_in)
            if held:
                self._tunnel_from_client(held)
        else:
            # Not switched: the client still speaks HTTP, read as before from a new head.
            self.host_watch = HostWatch()
            pipe.relay(transport, self.flow_bytes_in)
            passed = self._hosts_hold(held) if held else b""
            if passed is None:
                return
            if passed:
                self._tunnel_from_client(passed)
        if self.mode is Mode.TUNNEL:
            self.resume_client_reading()

    def _cut_later(self, name: str | None, reason: str) -> None:
        """A later request is refused: its own denied flow, then a reset of the connection."""
        current = self.flow
        refused = self._flow_to_original("http")
        if name is not None:
            assert refused.host is not None
            refused.host = Host(name, refused.host.ip)
        refused.workload = self.hub.runtime.inventory.lookup(
            Peer(refused.source_ip, refused.credential)
        )
        refused.verdict = Verdict.deny(reason)
        self.hub.flow_decided(refused)
        self.flow = current  # the connection's flow ends with the reason it was cut
        if current is not None and current.error is None:
            current.error = f"refused: {reason}"
        self.peek_buffer = b""
        self._reset()

    def _reset(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            sock = transport.get_extra_info("socket")
            with contextlib.suppress(OSError):  # already gone: closing is all there is left
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self.close()

    def close(self, reason: str | None = None) -> None:
        """Close both sides and record the end of a relayed flow (``reason``: why the gateway
        cut it, e.g. at shutdown).
        """
        if self.mode is Mode.CLOSED:
            return
        was_tunnel = self.mode is Mode.TUNNEL
        self._to(Mode.CLOSED)
        if self.peek_timer is not None:
            self.peek_timer.cancel()
            self.peek_timer = None
        task = self.http_task
        if task is not None and not task.done():
            task.cancel()
        flushing = self._close_streams(reason)
        flow = self.flow
        if was_tunnel and flow is not None:
            self.hub.tunnel_closed()
            self._end_flow(flow)
        if not flushing:
            self._forget()

    def _forget(self) -> None:
        if self.original is not None:
            self.hub.connection_closed(self)

    def expire(self, now: float) -> None:
        """Close the connection once idle past ``proxy.idle_timeout`` (called by the sweeper)."""
        if self.mode is Mode.TUNNEL and now - self.last_active > self.limits.idle_timeout:
            if self.flow is not None:
                self.flow.error = self.flow.error or "idle timeout"
            self.hub.count_error("idle_timeout")
            self.close()


def _own(sock: _socket.socket) -> tuple[IPAddress, int] | None:
    """The listener's own address as the accepted socket sees it."""
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return None
    return ipaddress.ip_address(host.partition("%")[0]), port
