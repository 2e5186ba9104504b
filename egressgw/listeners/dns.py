"""The DNS proxy (``dns.listen``): UDP and TCP on one port, forwarding to ``dns.upstreams``.

The I/O shell over ``wire.dnsmsg`` (bytes <-> messages) and ``decision.dnsanswer`` (verdicts).
For each query:

1. Parse it (a malformed one gets FORMERR when its header is readable, else nothing), find the
   workload behind the client's address (``Inventory.lookup``), judge the question. A refused
   name is answered at once (NXDOMAIN or the sinkhole), without a task or an upstream query.
2. Otherwise forward the client's bytes unchanged to the first upstream (then the next, within
   ``dns.timeout`` in all): UDP first, again over TCP when the upstream truncated its answer,
   so the whole answer is judged. Upstream sockets carry ``node.exempt_mark`` in node mode, so
   the node's redirection rules leave them alone.
3. Judge the answer (CNAME targets, addresses); a refused answer becomes the blocked answer.
   Addresses answered are recorded per client (``AnswerLog``) for the transparent listener.
4. Send it: over UDP cut to the client's size with TC set when longer (the client retries over
   TCP); over TCP whole. Every exchange that was decided is told to the DNS consumers (events).

Bounds: at most ``max_inflight`` upstream queries at once and ``max_inflight_per_source`` per
client address; a query beyond either is answered REFUSED at once (counted as ``dns_busy``, no
event: a flood must not flood the spool). At most ``max_tcp_connections`` TCP clients, each
closed after ``tcp_idle_timeout`` without a query; TCP queries of one connection are answered
in order. Upstream queries use sockets of their own, closed when the query ends or times out
(dnspython's query functions are not used here: a cancelled one can leak its socket under
uvloop).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import dns.flags
import dns.message
import dns.rcode
import structlog

from egressgw.config.model import DnsConfig
from egressgw.decision.answers import AnswerLog
from egressgw.decision.dnsanswer import DnsVerdict, is_internal, judge_answer, judge_question, who
from egressgw.decision.names import parse_ip_port
from egressgw.decision.path import Runtime
from egressgw.identity.workload import Peer
from egressgw.listeners.connection import source_ip
from egressgw.net.dial import SO_MARK
from egressgw.record.dnsevents import DnsExchange
from egressgw.wire import dnsmsg
from siem.tasks import spawn

log = structlog.get_logger("egressgw.dns")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Transport = Literal["udp", "tcp"]
UDP_RECEIVE = 65535


class DnsHub(Protocol):
    """What the DNS proxy needs from the running gateway."""

    @property
    def runtime(self) -> Runtime:
        """The current policy, guard, inventory and threat source."""
        ...

    def dns_answered(self, x: DnsExchange) -> None:
        """Tell every DNS consumer about an exchange."""
        ...

    def count_error(self, kind: str) -> None:
        """Count an error by kind."""
        ...


class UpstreamError(Exception):
    """No upstream gave an answer; the message says what each did."""


@dataclass(slots=True)
class Pending:
    """A query judged allowed, waiting for its upstream answer."""

    query: dns.message.Message
    wire: bytes
    exchange: DnsExchange
    asked: DnsVerdict
    runtime: Runtime
    client: IPAddress
    client_text: str
    started_mono: float


class DnsProxy:
    """UDP and TCP listeners of the DNS proxy and the upstream forwarding."""

    def __init__(
        self, hub: DnsHub, cfg: DnsConfig, answers: AnswerLog, mark: int | None = None
    ) -> None:
        self.hub = hub
        self.answers = answers
        self.mark = mark
        self.configure(cfg)
        self.inflight = 0
        self.per_source: dict[str, int] = {}
        self.address: tuple[str, int] | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients: set[asyncio.StreamWriter] = set()

    def configure(self, cfg: DnsConfig) -> None:
        """Take (new) settings: upstreams, blocked answers, bounds and timeouts apply from the
        next query on; ``listen`` and the answer records' bounds only at start.
        """
        self.cfg = cfg
        self.upstreams = [_address(u) for u in cfg.upstreams]
        self.sinkhole: IPAddress | None = cfg.sinkhole if cfg.blocked_answer == "sinkhole" else None

    # -- listeners ------------------------------------------------------------------------------
    async def start(self, listen: str) -> None:
        """Bind TCP, then UDP on the same port (port 0: the port TCP got), and serve."""
        loop = asyncio.get_running_loop()
        host, port = _address(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        tcp = socket.socket(family, socket.SOCK_STREAM)
        udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, port))
            port = tcp.getsockname()[1]
            udp.bind((host, port))
            tcp.setblocking(False)
            udp.setblocking(False)
        except OSError:
            tcp.close()
            udp.close()
            raise
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp, backlog=256)
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp)
        self._udp = transport
        self.address = (host, port)

    def close(self) -> None:
        """Stop listening and close the TCP clients (queries in flight end by their timeout)."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        for writer in list(self._tcp_clients):
            writer.close()

    def _udp_query(self, wire: bytes, addr: tuple[str, int]) -> None:
        transport = self._udp
        if transport is None:
            return
        reply, pending = self.begin(wire, addr, "udp")
        if reply is not None:
            transport.sendto(reply, addr)
        elif pending is not None:
            spawn(self._udp_finish(pending, addr), name=f"dns {pending.exchange.name}")

    async def _udp_finish(self, pending: Pending, addr: tuple[str, int]) -> None:
        reply = await self.finish(pending)
        if self._udp is not None:
            self._udp.sendto(reply, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tcp_clients) >= self.cfg.max_tcp_connections:
            self.hub.count_error("dns_too_many_tcp_connections")
            writer.close()
            return
        self._tcp_clients.add(writer)
        peer = writer.get_extra_info("peername")
        addr = (peer[0], peer[1])
        try:
            while True:
                async with asyncio.timeout(self.cfg.tcp_idle_timeout):
                    head = await reader.readexactly(2)
                    (size,) = struct.unpack("!H", head)
                    wire = await reader.readexactly(size)
                reply, pending = self.begin(wire, addr, "tcp")
                if pending is not None:
                    reply = await self.finish(pending)
                if reply is None:
                    break  # not even a header: nothing to answer, and no framing to trust
                writer.write(dnsmsg.to_tcp_wire(reply))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_clients.discard(writer)
            writer.close()

    # -- one query ------------------------------------------------------------------------------
    def begin(
        self, wire: bytes, addr: tuple[str, int], transport: Transport
    ) -> tuple[bytes | None, Pending | None]:
        """Steps 1 and the bounds: a reply to send now, or a query to forward, or neither."""
        try:
            query = dnsmsg.parse_query(wire)
        except ValueError:
            self.hub.count_error("dns_malformed")
            return dnsmsg.formerr(wire), None
        client, client_text = source_ip(addr[0])  # a dual-stack socket's IPv4 client unmapped
        name, qtype = dnsmsg.question(query)
        rt = self.hub.runtime
        w = rt.inventory.lookup(Peer(client))
        x = DnsExchange(client_text, addr[1], transport, time.time(), name, qtype, query.id, w)
        asked = judge_question(rt, w, who(w, client_text), name)
        if not asked.allowed:
            return self._blocked(query, x, asked, transport, time.monotonic()), None
        if (
            self.inflight >= self.cfg.max_inflight
            or self.per_source.get(client_text, 0) >= self.cfg.max_inflight_per_source
        ):
            self.hub.count_error("dns_busy")
            return self._encode(dnsmsg.refusal(query, dns.rcode.REFUSED), query, transport), None
        self.inflight += 1
        self.per_source[client_text] = self.per_source.get(client_text, 0) + 1
        return None, Pending(query, wire, x, asked, rt, client, client_text, time.monotonic())

    async def finish(self, p: Pending) -> bytes:
        """Steps 2 to 4 for a query ``begin`` let through: the reply's bytes."""
        x, query = p.exchange, p.query
        try:
            raw, response, x.upstream = await self._forward(p.wire, query)
        except UpstreamError as e:
            x.verdict, x.error = p.asked, str(e)
            response = dnsmsg.refusal(query, dns.rcode.SERVFAIL)
            return self._done(x, response, None, query, p.started_mono)
        finally:
            self._release(p.client_text)
        records = dnsmsg.answer_records(response)
        internal = is_internal(x.name, self.cfg.internal_domains)
        source = who(x.workload, p.client_text)
        verdict = judge_answer(p.runtime, x.workload, source, x.name, records, p.asked, internal)
        if not verdict.allowed:
            return self._blocked(query, x, verdict, x.transport, p.started_mono)
        x.verdict = verdict
        now = time.monotonic()
        for r in records:
            ip = r.ip
            if ip is not None:
                self.answers.record(p.client, x.name, ip, r.ttl, now)
        return self._done(x, response, raw, query, p.started_mono)

    def _release(self, client: str) -> None:
        self.inflight -= 1
        left = self.per_source[client] - 1
        if left:
            self.per_source[client] = left
        else:
            del self.per_source[client]

    def _blocked(
        self,
        query: dns.message.Message,
        x: DnsExchange,
        verdict: DnsVerdict,
        transport: Transport,
        started_mono: float,
    ) -> bytes:
        x.verdict = verdict
        return self._done(x, dnsmsg.blocked(query, self.sinkhole), None, query, started_mono)

    def _done(
        self,
        x: DnsExchange,
        response: dns.message.Message,
        raw: bytes | None,
        query: dns.message.Message,
        started_mono: float,
    ) -> bytes:
        x.response_code = dnsmsg.rcode_text(response)
        x.answers = dnsmsg.answer_records(response)
        x.duration = time.monotonic() - started_mono
        self.hub.dns_answered(x)
        if raw is not None and (x.transport == "tcp" or dnsmsg.fits_udp(raw, _limit(query))):
            return raw  # the upstream's own bytes, when the client takes them whole
        return self._encode(response, query, x.transport)

    @staticmethod
    def _encode(response: dns.message.Message, query: dns.message.Message, t: Transport) -> bytes:
        if t == "udp":
            return dnsmsg.to_udp_wire(response, _limit(query))
        return response.to_wire()

    # -- upstreams ------------------------------------------------------------------------------
    async def _forward(
        self, wire: bytes, query: dns.message.Message
    ) -> tuple[bytes, dns.message.Message, tuple[str, int]]:
        """The first answer an upstream gives, within ``dns.timeout`` in all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.timeout
        problems = []
        for upstream in self.upstreams:
            left = deadline - loop.time()
            if left <= 0:
                problems.append(f"{_text(upstream)}: no time left")
                break
            try:
                async with asyncio.timeout(left):
                    raw = await self._exchange(upstream, wire, "udp")
                    response = dnsmsg.parse_response(raw, query)
                    if response.flags & dns.flags.TC:
                        raw = await self._exchange(upstream, wire, "tcp")
                        response = dnsmsg.parse_response(raw, query)
                return raw, response, upstream
            except TimeoutError:
                problems.append(f"{_text(upstream)}: timed out")
            except (OSError, ValueError) as e:
                problems.append(f"{_text(upstream)}: {e}")
        raise UpstreamError("no upstream answered: " + "; ".join(problems))

    async def _exchange(self, upstream: tuple[str, int], wire: bytes, t: Transport) -> bytes:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        kind = socket.SOCK_DGRAM if t == "udp" else socket.SOCK_STREAM
        sock = socket.socket(family, kind)
        try:
            sock.setblocking(False)
            if self.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            await loop.sock_connect(sock, upstream)
            if t == "udp":
                await loop.sock_sendall(sock, wire)
                return await _receive_udp(loop, sock, wire[:2])
            await loop.sock_sendall(sock, dnsmsg.to_tcp_wire(wire))
            head = await _receive_exactly(loop, sock, 2)
            return await _receive_exactly(loop, sock, struct.unpack("!H", head)[0])
        finally:
            sock.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy) -> None:
        self.received: Callable[[bytes, tuple[str, int]], None] = proxy._udp_query

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.received(data, (str(addr[0]), addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors of earlier replies (a client gone): nothing to do for anyone else.
        pass


async def _receive_udp(loop: asyncio.AbstractEventLoop, sock: socket.socket, ident: bytes) -> bytes:
    while True:
        data = await loop.sock_recv(sock, UDP_RECEIVE)
        if data[:2] == ident:
            return data  # other datagrams (late answers, spoofing attempts) are skipped


async def _receive_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(sock, n - len(out))
        if not chunk:
            raise ConnectionError("upstream closed the TCP connection mid-answer")
        out += chunk
    return bytes(out)


def _limit(query: dns.message.Message) -> int:
    return dnsmsg.udp_limit(query)


def _address(text: str) -> tuple[str, int]:
    ip, port = parse_ip_port(text, 53)
    return str(ip), port


def _text(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
