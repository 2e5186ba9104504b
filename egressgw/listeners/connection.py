"""What every client connection of the proxy shares: its modes, the gateway it reports to,
writing to the client and backpressure.

A client connection is one class built from three pieces, each in its own module:

    connection.py  this base: Mode and its transition table, the Hub, write, pausing and
                   resuming the client, refusals, the flow's start and end
    tunnel.py      TunnelConnection: a CONNECT tunnel's destination side (dial, peek, relay)
    forward.py     ForwardConnection: absolute-form requests relayed through an upstream
    explicit.py    ClientConnection(TunnelConnection, ForwardConnection): request heads, dispatch
    transparent.py TransparentConnection(TunnelConnection): redirected TCP, no request head

Why mixins over one state object and not objects of their own: the pieces share one
connection's state (its mode, flow, stream and backpressure flags), and a tunnel costs every
attribute access and call it adds (``bench/tunnel_cost.py`` counts them): a method found
through a base class costs nothing more than one defined on the class itself, while a
separate object per piece would add a link to follow on every callback. Each piece reads only
the state it declares or this base declares.

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
- Every state has a time limit: a request head ``head_timeout`` (408), deciding the resolver's
  timeout (502), connecting ``connect_timeout`` (504), the response head ``response_timeout``
  (504), no traffic ``idle_timeout`` (closed); each counted by kind and recorded in the event.
- Backpressure: each side's transport pauses the other side's reading when its write buffer is
  full, so a slow reader never makes the gateway buffer without bound. The client is read again
  only when nothing holds it: a peer's full buffer, its own unread answers, or the pipelining
  bounds (``proxy.max_pending_bytes``, ``proxy.max_pipelined_requests``).
- One connection's trouble (malformed input, a slow peer, an unreachable upstream) ends that
  connection only; errors are counted by kind.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol

from egressgw.config.model import ProxyConfig
from egressgw.decision.path import Runtime
from egressgw.flow import Flow, ip_text
from egressgw.identity.workload import Credential, parse_credential
from egressgw.net.pool import IdlePool
from egressgw.net.rawstream import RawStream, Reactor
from egressgw.wire.responses import to_error_response

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}

# Seconds a refused client may go on sending (read and dropped) before its connection closes:
# closing with its input unread would reset the connection, and the client might never read
# the refusal (RawStream.close_after_reading).
REFUSAL_LINGER = 2.0


class Hub(Protocol):
    """What a connection needs from the gateway around it."""

    runtime: Runtime
    limits: ProxyConfig
    loop: asyncio.AbstractEventLoop
    reactor: Reactor  # the epoll set of the proxy's sockets
    clock: float  # a coarse monotonic clock, updated by the idle sweeper
    egress_ips: Mapping[str, IPAddress]  # namespace -> source address (``egress_ips``)
    upstreams: IdlePool[Any]  # idle absolute-form upstreams, shared by every client connection

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


# Every change of Mode, as data (h11's _state.py): Connection._to refuses any other. A
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


class Nobody:
    """The callbacks of a parser a closed connection keeps (it is never fed)."""


class Refuse(Exception):
    """Raised inside parser callbacks to answer with ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Connection:
    """The state and the methods every piece of a client connection uses."""

    # State with its initial value, as class attributes: a connection sets only what it uses
    # (most are tunnels, which never touch the HTTP forwarding state), so creating one costs a
    # few stores instead of thirty.
    mode = Mode.HEAD
    transport: RawStream | None = None
    peer: tuple[IPAddress, int] = (ipaddress.IPv4Address(0), 0)
    peer_text = ""
    flow: Flow | None = None
    pending_bytes = 0  # of request heads and bodies read, not yet sent upstream
    pending_requests = 0  # request heads read, not yet taken up
    reading_paused = False
    peer_full = False  # the upstream's (or tunnel destination's) write buffer is full
    client_full = False  # the client's write buffer is full: it is not reading its answers
    # A tunnel's name lookup, or the task relaying absolute-form requests: cancelled at close.
    http_task: asyncio.Task[Any] | None = None
    # Set by the connection's constructor:
    hub: Hub
    limits: ProxyConfig
    last_active: float  # hub.clock when bytes last moved

    def close(self, reason: str | None = None) -> None:
        """Close both sides and record the end of the current flow (``reason``: why, when the
        gateway cuts it, e.g. at shutdown; the flow keeps an error it already had).
        """
        raise NotImplementedError  # the connection class that joins the pieces closes them all

    def _forget(self) -> None:
        """The client's stream is gone: leave the gateway's books and cut reference cycles."""
        raise NotImplementedError  # the joining class knows what it holds

    def _credential(self, header: bytes) -> Credential | None:
        """A Proxy-Authorization value -> the credential a flow presents; None when malformed.

        No inventory verifies a credential yet, so a malformed one is no credential (counted as
        ``bad_credential``) rather than a 407 that would lock clients out for nothing.
        """
        try:
            return parse_credential(header)
        except ValueError:
            self.hub.count_error("bad_credential")
            return None

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

    def _end_flow(self, flow: Flow) -> None:
        if flow.ended_mono is None:
            flow.ended_mono = time.monotonic()
            self.hub.flow_ended(flow)


_SOURCE_IPS: dict[str, tuple[IPAddress, str]] = {}
_SOURCE_IP_CACHE = 65536  # clients are few and repeat: parse each address once


def source_ip(text: str) -> tuple[IPAddress, str]:
    """A peer address as the socket spells it -> (address, canonical text).

    An IPv4 client of a dual-stack listener is spelt ``::ffff:a.b.c.d``: it is that IPv4
    address, which identity, policy and events know it by.
    """
    found = _SOURCE_IPS.get(text)
    if found is None:
        ip = ipaddress.ip_address(text.partition("%")[0])
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if len(_SOURCE_IPS) >= _SOURCE_IP_CACHE:
            _SOURCE_IPS.clear()
        found = _SOURCE_IPS[text] = (ip, ip_text(ip))
    return found
