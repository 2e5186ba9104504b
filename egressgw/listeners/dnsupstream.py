"""The DNS proxy's upstream side: queries forwarded over a few long-lived UDP sockets per upstream.

Rules:

1. Each upstream gets ``SOCKETS_PER_UPSTREAM`` UDP sockets, opened on its first query and kept
   until it leaves ``dns.upstreams`` or the proxy closes; each is bound to a port the kernel
   picks at random and carries ``node.exempt_mark`` in node mode. No socket, task or timeout
   object is made per query.
2. A query goes out under a fresh random id, unused on its socket (sockets taken in turn), at
   the end of the loop's turn with the turn's other datagrams (``net.sendbatch``; a send the
   kernel refuses ends that try then, with its error as the reason); the
   answer is matched by socket (so upstream), id and question. What matches nothing is dropped
   and counted: a datagram from any other address (``dns_upstream_foreign``), or one whose id
   no query waits for (late: its query timed out), whose question differs, or that is no DNS
   answer (``dns_upstream_unmatched``). An answer of FORMERR, SERVFAIL, NOTIMP or REFUSED
   without a question matches by id (as dnspython's ``is_response``).
3. Upstreams are tried in order within ``timeout`` in all: each try gets an equal share of the
   time left (the first of two upstreams half of it; a single upstream all of it), then the next
   is tried. A try's end is one ``loop.call_at`` timer, cancelled by the answer.
4. An answer with TC set is asked again over TCP of the same upstream within the time left (a
   task and a socket of its own: truncation is rare).
5. ``done`` is called once per query: with the ``Answer`` (its bytes still carry the forwarded
   id: the caller restores the client's), or with a text naming what each upstream did.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from egressgw.net.dial import SO_MARK
from egressgw.net.sendbatch import SendBatch
from egressgw.wire import dnsmsg
from egressgw.wire.dnsread import OPCODE_MASK, QR, TC, Response, read_response, with_id
from siem.tasks import spawn

log = structlog.get_logger("egressgw.dns")

Address = tuple[str, int]
SOCKETS_PER_UPSTREAM = 4
UDP_RECEIVE = 65535
READS_PER_WAKEUP = 64  # datagrams taken off one socket before other work gets its turn
_EMPTY_QUESTION_RCODES = frozenset({1, 2, 4, 5})  # FORMERR, SERVFAIL, NOTIMP, REFUSED


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream's answer to a forwarded query."""

    wire: bytes  # as received: the forwarded id, not the client's
    response: Response
    upstream: Address


Done = Callable[[Answer | str], None]


@dataclass(slots=True, eq=False)
class _Ask:
    """One query on its way through the upstreams."""

    wire: bytes
    question: tuple[str, int, int]
    upstreams: tuple[Address, ...]
    deadline: float  # loop time
    done: Done
    tried: int = 0
    problems: list[str] = field(default_factory=list)
    ident: int = 0
    sock: _Socket | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True, eq=False)
class _Socket:
    """One long-lived UDP socket to one upstream and the queries waiting on it, by id."""

    sock: socket.socket
    upstream: Address
    pending: dict[int, _Ask] = field(default_factory=dict)


def text(address: Address) -> str:
    """An upstream as reasons name it: ``IP:port``, ``[IPv6]:port``."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Upstreams:
    """The upstream sockets and the queries in flight on them."""

    def __init__(
        self,
        count_error: Callable[[str], None],
        mark: int | None = None,
        sends: SendBatch | None = None,
    ) -> None:
        self.count_error = count_error
        self.mark = mark
        # Queries leave at the end of the loop's turn, with the turn's other datagrams.
        self.sends = sends if sends is not None else SendBatch()
        self._configured: frozenset[Address] = frozenset()
        self._pools: dict[Address, list[_Socket]] = {}
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def configure(self, upstreams: list[Address]) -> None:
        """Take the upstream list; sockets of upstreams no longer in it are closed."""
        self._configured = frozenset(upstreams)
        for upstream in [u for u in self._pools if u not in self._configured]:
            self._close_pool(upstream)

    def sockets(self) -> int:
        """How many upstream sockets are open."""
        return sum(len(pool) for pool in self._pools.values())

    def inflight(self) -> int:
        """How many queries wait for an upstream's UDP answer."""
        return sum(len(s.pending) for pool in self._pools.values() for s in pool)

    def close(self) -> None:
        """Close every socket; queries waiting end with their timers (as having no answer)."""
        self._closed = True
        for upstream in list(self._pools):
            self._close_pool(upstream)

    def ask(
        self,
        wire: bytes,
        question: tuple[str, int, int],
        upstreams: tuple[Address, ...],
        timeout: float,
        done: Done,
    ) -> None:
        """Forward ``wire`` (``question`` read from it) to ``upstreams`` in order; then ``done``."""
        loop = self._loop = asyncio.get_running_loop()
        self._try(_Ask(wire, question, upstreams, loop.time() + timeout, done))

    # -- one query ------------------------------------------------------------------------------
    def _try(self, a: _Ask) -> None:
        loop = self._loop
        assert loop is not None
        while a.tried < len(a.upstreams):
            upstream = a.upstreams[a.tried]
            share = len(a.upstreams) - a.tried
            a.tried += 1
            now = loop.time()
            left = a.deadline - now
            if left <= 0:
                a.problems.append(f"{text(upstream)}: no time left")
                break
            if self._closed:
                a.problems.append(f"{text(upstream)}: the proxy is closing")
                break
            if upstream not in self._configured:
                a.problems.append(f"{text(upstream)}: no longer in dns.upstreams")
                continue
            try:
                s = self._socket(upstream, loop)
            except OSError as e:
                a.problems.append(f"{text(upstream)}: {e}")
                continue
            ident = _free_id(s)
            self.sends.send(s.sock.sendto, with_id(a.wire, ident), upstream, self._unsent, a)
            s.pending[ident] = a
            a.sock, a.ident = s, ident
            a.timer = loop.call_at(now + left / share, self._expired, a)
            return
        self._finish(a, "no upstream answered: " + "; ".join(a.problems))

    def _unsent(self, a: _Ask, exc: OSError) -> None:
        # The send failed once the turn ended: this try is over, as a timeout would end it.
        s, timer = a.sock, a.timer
        if s is None:
            return
        s.pending.pop(a.ident, None)
        if timer is not None:
            timer.cancel()
        a.sock = a.timer = None
        a.problems.append(f"{text(s.upstream)}: {exc}")
        self._try(a)

    def _expired(self, a: _Ask) -> None:
        s = a.sock
        if s is not None:
            s.pending.pop(a.ident, None)
            a.problems.append(f"{text(s.upstream)}: timed out")
        a.sock = a.timer = None
        self._try(a)

    def _finish(self, a: _Ask, outcome: Answer | str) -> None:
        try:
            a.done(outcome)
        except Exception:  # one query's failure must not stop the socket's other answers
            log.exception("dns answer handling failed")

    # -- answers --------------------------------------------------------------------------------
    def _readable(self, s: _Socket) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                data, addr = s.sock.recvfrom(UDP_RECEIVE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an ICMP error of an earlier datagram: the try ends by its timer
            self._received(s, data, addr)

    def _received(self, s: _Socket, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] != s.upstream[0] or addr[1] != s.upstream[1]:
            self.count_error("dns_upstream_foreign")
            return
        a = s.pending.get(int.from_bytes(data[:2], "big")) if len(data) >= 12 else None
        if a is None:
            self.count_error("dns_upstream_unmatched")
            return
        truncated = bool(data[2] & (TC >> 8))
        try:
            r = read_response(data, records=not truncated)
        except ValueError:
            self.count_error("dns_upstream_unmatched")
            return
        if not _answers(r, a.question):
            self.count_error("dns_upstream_unmatched")
            return
        del s.pending[a.ident]
        if a.timer is not None:
            a.timer.cancel()
        a.sock = a.timer = None
        if truncated:
            spawn(self._over_tcp(a, s.upstream), name=f"dns tcp {a.question[0]}")
            return
        self._finish(a, Answer(data, r, s.upstream))

    async def _over_tcp(self, a: _Ask, upstream: Address) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(a.deadline):
                data = await self._tcp_exchange(upstream, with_id(a.wire, a.ident))
            r = read_response(data)
            if r.id != a.ident or not _answers(r, a.question):
                raise ValueError("upstream answered another query over TCP")
        except TimeoutError:
            a.problems.append(f"{text(upstream)}: timed out over TCP")
        except (OSError, ValueError) as e:
            a.problems.append(f"{text(upstream)}: {e}")
        else:
            self._finish(a, Answer(data, r, upstream))
            return
        if loop.time() < a.deadline:
            self._try(a)
        else:
            self._finish(a, "no upstream answered: " + "; ".join(a.problems))

    async def _tcp_exchange(self, upstream: Address, wire: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        sock = socket.socket(_family(upstream), socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if self.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            await loop.sock_connect(sock, upstream)
            await loop.sock_sendall(sock, dnsmsg.to_tcp_wire(wire))
            head = await _receive_exactly(loop, sock, 2)
            return await _receive_exactly(loop, sock, struct.unpack("!H", head)[0])
        finally:
            sock.close()

    # -- sockets --------------------------------------------------------------------------------
    def _socket(self, upstream: Address, loop: asyncio.AbstractEventLoop) -> _Socket:
        pool = self._pools.get(upstream)
        if pool is None:
            pool = self._pools[upstream] = [
                self._open(upstream, loop) for _ in range(SOCKETS_PER_UPSTREAM)
            ]
        self._turn = (self._turn + 1) % len(pool)
        return pool[self._turn]

    def _open(self, upstream: Address, loop: asyncio.AbstractEventLoop) -> _Socket:
        family = _family(upstream)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        except OSError:
            sock.close()
            raise
        s = _Socket(sock, upstream)
        loop.add_reader(sock.fileno(), self._readable, s)
        return s

    def _close_pool(self, upstream: Address) -> None:
        for s in self._pools.pop(upstream, []):
            if self._loop is not None:
                self._loop.remove_reader(s.sock.fileno())
            s.sock.close()


def _free_id(s: _Socket) -> int:
    if len(s.pending) >= 0x8000:
        raise OSError("no free query id on the upstream socket")
    while True:
        ident = secrets.randbits(16)
        if ident not in s.pending:
            return ident


def _answers(r: Response, question: tuple[str, int, int]) -> bool:
    """True when ``r`` is an answer to a query with ``question`` (its id matched already)."""
    if not r.flags & QR or r.flags & OPCODE_MASK:
        return False
    if r.question is None:
        return r.rcode in _EMPTY_QUESTION_RCODES
    return r.question == question


def _family(upstream: Address) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET


async def _receive_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(sock, n - len(out))
        if not chunk:
            raise ConnectionError("upstream closed the TCP connection mid-answer")
        out += chunk
    return bytes(out)
