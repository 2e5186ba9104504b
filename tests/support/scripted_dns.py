"""A tiny UDP DNS server whose A answers a test scripts per query, and which logs every query.

dnsmasq answers the same thing every time; DNS rebinding and TTL caching need
answers that change between queries and a count of the queries the gateway
made. `ScriptedDns(answers, ttls)` answers the n-th A query for a name with
`answers[name][min(n, len - 1)]` and TTL `ttls.get(name, 0)`, AAAA queries
with no data, other names with NXDOMAIN.

Two ways for a nameserver to be slow, for tests of callers that give up: queries for a name in
`unanswered` (or any name under it, like a zone whose servers are down) are counted and never
answered, and the answer to a name in `delays` leaves that many seconds after its query came.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

RECV_SIZE = 4096
POLL_TIMEOUT = 0.1
STOP_TIMEOUT = 5.0
DEFAULT_TTL = 0


def answer_query(
    wire: bytes, answers: Mapping[str, Sequence[str]], seen: int, ttls: Mapping[str, int]
) -> tuple[bytes, str, str]:
    """Return (response wire, query name, query type) for one query; `seen` = earlier A queries."""
    query = dns.message.from_wire(wire)
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    rtype = dns.rdatatype.to_text(question.rdtype)
    response = dns.message.make_response(query)
    ips = answers.get(name)
    if ips is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif question.rdtype == dns.rdatatype.A:
        ip = ips[min(seen, len(ips) - 1)]
        ttl = ttls.get(name, DEFAULT_TTL)
        response.answer.append(dns.rrset.from_text(question.name, ttl, "IN", "A", ip))
    return response.to_wire(), name, rtype


def in_zones(name: str, zones: Iterable[str]) -> bool:
    """Return whether `name` is one of `zones` or a name under one of them."""
    return any(name == zone or name.endswith("." + zone) for zone in zones)


class ScriptedDns:
    """Context manager serving scripted A answers on 127.0.0.1:<free UDP port>."""

    def __init__(
        self,
        answers: Mapping[str, Sequence[str]],
        ttls: Mapping[str, int] | None = None,
        unanswered: Iterable[str] = (),
        delays: Mapping[str, float] | None = None,
    ) -> None:
        self.answers = {name.lower(): list(ips) for name, ips in answers.items()}
        self.ttls = {name.lower(): ttl for name, ttl in (ttls or {}).items()}
        self.unanswered = tuple(zone.lower() for zone in unanswered)
        self.delays = {name.lower(): delay for name, delay in (delays or {}).items()}
        self._timers: list[threading.Timer] = []
        self.queries: Counter[tuple[str, str]] = Counter()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(POLL_TIMEOUT)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="scripted-dns", daemon=True)

    @property
    def nameserver(self) -> str:
        """Return this server as `host:port`, the gateway's resolver.nameservers form."""
        return f"127.0.0.1:{self.port}"

    def count(self, name: str, rtype: str = "A") -> int:
        """Return how many `rtype` queries for `name` arrived."""
        with self._lock:
            return self.queries[(name.lower(), rtype)]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self._sock.recvfrom(RECV_SIZE)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                with self._lock:
                    name = dns.message.from_wire(wire).question[0].name
                    seen = self.queries[(name.to_text(omit_final_dot=True).lower(), "A")]
                    reply, qname, rtype = answer_query(wire, self.answers, seen, self.ttls)
                    self.queries[(qname, rtype)] += 1
            except (dns.exception.DNSException, IndexError):
                # Not a query this server can answer: drop it, as a real server would.
                continue
            if in_zones(qname, self.unanswered):
                continue
            delay = self.delays.get(qname)
            if delay:
                timer = threading.Timer(delay, self._send, (reply, peer))
                timer.daemon = True
                self._timers.append(timer)
                timer.start()
                continue
            self._sock.sendto(reply, peer)

    def _send(self, reply: bytes, peer: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):  # the server stopped before this answer was due
            self._sock.sendto(reply, peer)

    def __enter__(self) -> ScriptedDns:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(STOP_TIMEOUT)
        for timer in self._timers:
            timer.cancel()
            timer.join(STOP_TIMEOUT)
        self._sock.close()
