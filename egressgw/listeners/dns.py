"""The DNS proxy (``dns.listen``): UDP and TCP on one port, forwarding to ``dns.upstreams``.

The I/O shell over ``wire.dnsread`` (the fields of a message the fast path needs, read off the
bytes, and the proxy's own answers written from the query's bytes), ``wire.dnsmsg`` (dnspython,
only to cut an answer too long for the client's UDP), ``decision.dnsanswer``
(verdicts) and ``listeners.dnsupstream`` (the upstream sockets). For each query:

1. Read its header and question (a malformed one gets FORMERR when its header is readable,
   else nothing), find the workload behind the client's address (``Inventory.lookup``), judge
   the question. A refused name is answered at once (NXDOMAIN or the sinkhole).
2. Otherwise forward the client's bytes under a fresh random id over one of the few long-lived
   UDP sockets of the first upstream, then the next (each try gets its share of ``dns.timeout``
   left); again over TCP when the upstream truncated its answer, so the whole answer is judged.
   Answers are matched by upstream, id and question; others are dropped and counted. Upstream
   sockets carry ``node.exempt_mark`` in node mode, so the node's redirection rules leave them
   alone. No task, socket or timeout object is made per UDP query: the answer's arrival (or the
   try's timer) carries the query on.
3. Judge the answer (CNAME targets, addresses); a refused answer becomes the blocked answer.
   Addresses answered are recorded per client (``AnswerLog``) for the transparent listener.
4. Send it under the client's id: the upstream's own bytes when they fit (over UDP, the client's
   size; over TCP always), else cut at a record with TC set (the client retries over TCP). Every
   exchange that was decided is told to the DNS consumers (events).

Bounds: at most ``max_inflight`` upstream queries at once and ``max_inflight_per_source`` per
client address; a query beyond either is answered REFUSED at once (counted as ``dns_busy``, no
event: a flood must not flood the spool). At most ``max_tcp_connections`` TCP clients, each
closed after ``tcp_idle_timeout`` without a query; TCP queries of one connection are answered
in order.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import structlog

from egressgw.config.model import DnsConfig
from egressgw.decision.answers import AnswerLog
from egressgw.decision.dnsanswer import DnsVerdict, is_internal, judge_answer, judge_question, who
from egressgw.decision.names import parse_ip_port
from egressgw.decision.path import Runtime
from egressgw.identity.workload import Peer
from egressgw.listeners.connection import source_ip
from egressgw.listeners.dnsupstream import Answer, Upstreams
from egressgw.net.sendbatch import SendBatch
from egressgw.record.dnsevents import DnsExchange
from egressgw.wire import dnsmsg, dnsread

log = structlog.get_logger("egressgw.dns")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Transport = Literal["udp", "tcp"]


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


@dataclass(slots=True)
class Pending:
    """A query judged allowed, waiting for its upstream answer."""

    wire: bytes
    query: dnsread.Query
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
        # UDP answers and upstream queries leave together at the end of each turn of the loop.
        self._sends = SendBatch()
        self._upstreams = Upstreams(hub.count_error, mark, self._sends)
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
        self._upstream_order = tuple(self.upstreams)
        self._upstreams.configure(self.upstreams)
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
        """Stop listening, close the TCP clients and the upstream sockets (queries in flight end
        by their timeout, unanswered).
        """
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        for writer in list(self._tcp_clients):
            writer.close()
        self._upstreams.close()

    def upstream_sockets(self) -> int:
        """How many upstream UDP sockets are open (a fixed few per upstream, whatever the load)."""
        return self._upstreams.sockets()

    def _udp_query(self, wire: bytes, addr: tuple[str, int]) -> None:
        if self._udp is None:
            return
        reply, pending = self.begin(wire, addr, "udp")
        if reply is not None:
            self._sends.send(self._udp_send, reply, addr)
        elif pending is not None:
            self.forward(pending, lambda data: self._sends.send(self._udp_send, data, addr))

    def _udp_send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._udp is not None:  # (closed since the answer was held)
            self._udp.sendto(data, addr)

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
            query = dnsread.read_query(wire)
        except ValueError:
            self.hub.count_error("dns_malformed")
            return dnsmsg.formerr(wire), None
        client, client_text = source_ip(addr[0])  # a dual-stack socket's IPv4 client unmapped
        name = query.name
        rt = self.hub.runtime
        w = rt.inventory.lookup(Peer(client))
        x = DnsExchange(
            client_text, addr[1], transport, time.time(), name, _type_text(query.qtype), query.id, w
        )
        asked = judge_question(rt, w, who(w, client_text), name)
        if not asked.allowed:
            return self._blocked(wire, query, x, asked, time.monotonic()), None
        if (
            self.inflight >= self.cfg.max_inflight
            or self.per_source.get(client_text, 0) >= self.cfg.max_inflight_per_source
        ):
            self.hub.count_error("dns_busy")
            return dnsread.refusal(wire, query, dns.rcode.REFUSED), None
        self.inflight += 1
        self.per_source[client_text] = self.per_source.get(client_text, 0) + 1
        return None, Pending(wire, query, x, asked, rt, client, client_text, time.monotonic())

    def forward(self, p: Pending, reply: Callable[[bytes], None]) -> None:
        """Steps 2 to 4 for a query ``begin`` let through: ``reply`` gets the reply's bytes."""

        def answered(outcome: Answer | str) -> None:
            try:
                data = self._answered(p, outcome)
            except Exception:  # a bug must still answer the client (a TCP client waits for it)
                log.exception("dns answer handling failed", name=p.exchange.name)
                self.hub.count_error("dns_internal")
                data = dnsread.refusal(p.wire, p.query, dns.rcode.SERVFAIL)
            reply(data)

        question = (p.query.name, p.query.qtype, dnsread.CLASS_IN)
        self._upstreams.ask(p.wire, question, self._upstream_order, self.cfg.timeout, answered)

    async def finish(self, p: Pending) -> bytes:
        """``forward``, awaited: the reply's bytes."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def reply(data: bytes) -> None:
            if not future.done():  # a TCP client may be gone
                future.set_result(data)

        self.forward(p, reply)
        return await future

    def _answered(self, p: Pending, outcome: Answer | str) -> bytes:
        x, query = p.exchange, p.query
        self._release(p.client_text)
        if isinstance(outcome, str):
            x.verdict, x.error = p.asked, outcome
            x.response_code = "SERVFAIL"
            return self._done(x, dnsread.refusal(p.wire, query, dns.rcode.SERVFAIL), p)
        x.upstream = outcome.upstream
        records = list(outcome.response.records)
        internal = is_internal(x.name, self.cfg.internal_domains)
        source = who(x.workload, p.client_text)
        verdict = judge_answer(p.runtime, x.workload, source, x.name, records, p.asked, internal)
        if not verdict.allowed:
            return self._blocked(p.wire, query, x, verdict, p.started_mono)
        x.verdict = verdict
        now = time.monotonic()
        for r in records:
            ip = r.ip
            if ip is not None:
                self.answers.record(p.client, x.name, ip, r.ttl, now)
        x.response_code = _rcode_text(outcome.response.rcode)
        x.answers = records
        raw = dnsread.with_id(outcome.wire, query.id)  # the client's id back
        if x.transport == "tcp" or dnsmsg.fits_udp(raw, query.udp_limit):
            return self._done(x, raw, p)  # the upstream's own bytes, when the client takes them
        return self._done(x, _cut(raw, p.wire, query), p)

    def _release(self, client: str) -> None:
        self.inflight -= 1
        left = self.per_source[client] - 1
        if left:
            self.per_source[client] = left
        else:
            del self.per_source[client]

    def _blocked(
        self,
        wire: bytes,
        query: dnsread.Query,
        x: DnsExchange,
        verdict: DnsVerdict,
        started_mono: float,
    ) -> bytes:
        x.verdict = verdict
        reply, x.answers = dnsread.blocked(wire, query, self.sinkhole)
        x.response_code = "NXDOMAIN" if self.sinkhole is None else "NOERROR"
        x.duration = time.monotonic() - started_mono
        self.hub.dns_answered(x)
        return reply

    def _done(self, x: DnsExchange, reply: bytes, p: Pending) -> bytes:
        x.duration = time.monotonic() - p.started_mono
        self.hub.dns_answered(x)
        return reply


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy) -> None:
        self.received: Callable[[bytes, tuple[str, int]], None] = proxy._udp_query

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.received(data, (str(addr[0]), addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors of earlier replies (a client gone): nothing to do for anyone else.
        pass


@functools.cache
def _type_text(qtype: int) -> str:
    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(qtype))


@functools.cache
def _rcode_text(rcode: int) -> str:
    return dns.rcode.to_text(dns.rcode.Rcode.make(rcode))


def _cut(raw: bytes, wire: bytes, query: dnsread.Query) -> bytes:
    """An answer too long for the client's UDP: cut at a record with TC set."""
    try:
        response = dns.message.from_wire(raw)
    except (dns.exception.DNSException, ValueError, IndexError):
        # Read by the proxy's reader but not by dnspython: the question alone, with TC.
        return dnsread.truncated(wire, query)
    return dnsmsg.to_udp_wire(response, query.udp_limit)


def _address(text: str) -> tuple[str, int]:
    ip, port = parse_ip_port(text, 53)
    return str(ip), port
