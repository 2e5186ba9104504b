"""Tests of the DNS proxy's shell with a stand-in hub: bounds, sinkhole, upstream failure."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from pathlib import Path
from typing import Any, cast

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from egressgw.config.model import DnsConfig, load_policy
from egressgw.decision.answers import AnswerLog
from egressgw.decision.guard import Guard
from egressgw.decision.path import NoThreats, Runtime
from egressgw.identity.static import StaticInventory
from egressgw.listeners.dns import DnsProxy
from egressgw.listeners.dnsupstream import SOCKETS_PER_UPSTREAM
from egressgw.record.dnsevents import DnsExchange
from egressgw.resolver import Resolver
from siem.tasks import spawn

POLICY = """\
default: allow
tiers:
  - name: security
    rules:
      - name: no-casino
        action: deny
        to: {domains: ["casino.test"]}
"""


class Hub:
    """Records exchanges and error counts."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.exchanges: list[DnsExchange] = []
        self.errors: list[str] = []

    def dns_answered(self, x: DnsExchange) -> None:
        """Keep the exchange."""
        self.exchanges.append(x)

    def count_error(self, kind: str) -> None:
        """Keep the kind."""
        self.errors.append(kind)


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    """A hub over a policy denying casino.test."""
    (tmp_path / "p.yaml").write_text(POLICY)
    rt = Runtime(
        load_policy((tmp_path / "p.yaml",), set()),
        Guard(),
        StaticInventory([]),
        cast(Resolver, None),
        NoThreats(),
    )
    return Hub(rt)


def proxy(hub: Hub, **settings: Any) -> DnsProxy:
    """A proxy (not listening) with the given dns settings."""
    cfg = DnsConfig.model_validate({"upstreams": ["127.0.0.1:9"], **settings})
    return DnsProxy(hub, cfg, AnswerLog())


def query(name: str, kind: str = "A") -> bytes:
    """A query's bytes."""
    return dns.message.make_query(name, kind).to_wire()


def test_sinkhole_answers_a_denied_name_at_once(hub: Hub) -> None:
    """With blocked_answer sinkhole a denied name gets the sinkhole address, and an event."""
    p = proxy(hub, blocked_answer="sinkhole", sinkhole="192.0.2.254")
    reply, pending = p.begin(query("casino.test"), ("10.99.0.2", 5000), "udp")
    assert pending is None and reply is not None
    answer = dns.message.from_wire(reply)
    assert answer.rcode() == dns.rcode.NOERROR
    assert answer.answer[0][0].address == "192.0.2.254"
    assert hub.exchanges[0].verdict is not None and not hub.exchanges[0].verdict.allowed


def test_one_flooding_source_is_refused_past_its_share(hub: Hub) -> None:
    """Past max_inflight_per_source a source gets REFUSED; another source is still forwarded."""
    p = proxy(hub, max_inflight_per_source=2, max_inflight=10)
    for _ in range(2):
        assert p.begin(query("a.test"), ("10.99.0.2", 5000), "udp")[1] is not None
    reply, pending = p.begin(query("a.test"), ("10.99.0.2", 5000), "udp")
    assert pending is None and reply is not None
    assert dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED
    assert hub.errors == ["dns_busy"]
    assert p.begin(query("a.test"), ("10.99.0.3", 5000), "udp")[1] is not None
    assert p.inflight == 3


def test_total_in_flight_is_bounded(hub: Hub) -> None:
    """Past max_inflight every source is refused until queries finish."""
    p = proxy(hub, max_inflight=3)
    for i in range(3):
        assert p.begin(query("a.test"), (f"10.99.0.{i + 2}", 5000), "udp")[1] is not None
    reply, _ = p.begin(query("a.test"), ("10.99.0.9", 5000), "udp")
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED


def test_garbage_gets_formerr_or_nothing(hub: Hub) -> None:
    """A message with a readable header gets FORMERR; a scrap gets no answer."""
    p = proxy(hub)
    reply, _ = p.begin(bytes.fromhex("12340100") + b"\xff" * 10, ("10.99.0.2", 5000), "udp")
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR
    assert p.begin(b"\x01", ("10.99.0.2", 5000), "udp") == (None, None)


async def test_silent_upstream_gives_servfail_and_frees_the_slot(hub: Hub) -> None:
    """An upstream that never answers: SERVFAIL within dns.timeout, the reason in the event."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        port = silent.getsockname()[1]
        cfg = DnsConfig.model_validate({"upstreams": [f"127.0.0.1:{port}"], "timeout": 0.3})
        p = DnsProxy(hub, cfg, AnswerLog())
        _, pending = p.begin(query("a.test"), ("10.99.0.2", 5000), "udp")
        assert pending is not None
        reply = await p.finish(pending)
        p.close()
    finally:
        silent.close()
    assert dns.message.from_wire(reply).rcode() == dns.rcode.SERVFAIL
    assert hub.exchanges[0].error == f"no upstream answered: 127.0.0.1:{port}: timed out"
    assert p.inflight == 0 and p.per_source == {}


async def test_answered_addresses_are_recorded_for_the_client(hub: Hub) -> None:
    """An answer forwarded to a client is recorded (client, IP) -> name in the answer log."""
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    upstream.setblocking(False)
    loop = asyncio.get_running_loop()

    async def answer_once() -> None:
        data, addr = await loop.sock_recvfrom(upstream, 4096)
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", "192.0.2.5"))
        await loop.sock_sendto(upstream, r.to_wire(), addr)

    try:
        cfg = DnsConfig.model_validate({"upstreams": [f"127.0.0.1:{upstream.getsockname()[1]}"]})
        log = AnswerLog()
        p = DnsProxy(hub, cfg, log)
        server = spawn(answer_once(), name="upstream")
        _, pending = p.begin(query("api.test"), ("10.99.0.2", 5000), "udp")
        assert pending is not None
        reply = await p.finish(pending)
        await server
        p.close()
    finally:
        upstream.close()
    assert dns.message.from_wire(reply).answer[0][0].address == "192.0.2.5"
    client, ip = ipaddress.ip_address("10.99.0.2"), ipaddress.ip_address("192.0.2.5")
    assert log.name_of(client, ip, time.monotonic()) == "api.test"


class FakeUpstream:
    """A UDP socket on loopback the test answers from, keeping what it received."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    async def receive(self) -> tuple[dns.message.Message, tuple[str, int]]:
        """The next query and where it came from (generous deadline: CI is loaded)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(10):
            data, addr = await loop.sock_recvfrom(self.sock, 4096)
        return dns.message.from_wire(data), addr

    async def answer(
        self,
        q: dns.message.Message,
        addr: tuple[str, int],
        ip: str,
        sock: socket.socket | None = None,
    ) -> None:
        """Answer ``q`` with one A record (from ``sock`` when given: a spoofer's)."""
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", ip))
        await asyncio.get_running_loop().sock_sendto(sock or self.sock, r.to_wire(), addr)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


async def wait_for(condition: Any, what: str) -> None:
    """Poll until ``condition()`` holds, up to 10 s (never a fixed sleep)."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def with_id(name: str, ident: int) -> bytes:
    """A query for ``name`` with the given id."""
    q = dns.message.make_query(name, "A")
    q.id = ident
    return q.to_wire()


async def test_ids_are_rewritten_upstream_and_restored_for_the_client(hub: Hub) -> None:
    """Queries go upstream under fresh ids; each client gets its own answer under its own id."""
    up = FakeUpstream()
    p = proxy(hub, upstreams=[up.address], timeout=30)
    try:
        # Ten clients that all picked id 7: the upstream must still tell their answers apart.
        replies = []
        for i in range(10):
            _, pending = p.begin(with_id(f"n{i}.test", 7), (f"10.99.0.{i + 2}", 5000), "udp")
            assert pending is not None
            replies.append(asyncio.ensure_future(p.finish(pending)))
        seen = [await up.receive() for _ in range(10)]
        assert any(q.id != 7 for q, _ in seen)
        for q, addr in reversed(seen):  # answered out of order
            index = int(q.question[0].name.labels[0][1:])
            await up.answer(q, addr, f"192.0.2.{index + 1}")
        for i, reply in enumerate(replies):
            answer = dns.message.from_wire(await reply)
            assert answer.id == 7
            assert str(answer.question[0].name) == f"n{i}.test."
            assert answer.answer[0][0].address == f"192.0.2.{i + 1}"
    finally:
        p.close()
        up.close()


async def test_spoofed_and_mismatched_answers_are_dropped_and_counted(hub: Hub) -> None:
    """An answer from another address, or with another question, is dropped; the real one wins."""
    up = FakeUpstream()
    spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    spoofer.bind(("127.0.0.1", 0))
    spoofer.setblocking(False)
    p = proxy(hub, upstreams=[up.address], timeout=30)
    try:
        _, pending = p.begin(query("bank.test"), ("10.99.0.2", 5000), "udp")
        assert pending is not None
        reply = asyncio.ensure_future(p.finish(pending))
        q, addr = await up.receive()
        await up.answer(q, addr, "203.0.113.66", sock=spoofer)  # right id, wrong sender
        await wait_for(lambda: "dns_upstream_foreign" in hub.errors, "the foreign answer")
        other = dns.message.make_query("evil.test", "A")
        other.id = q.id
        await up.answer(other, addr, "203.0.113.67")  # right sender and id, other question
        await wait_for(lambda: "dns_upstream_unmatched" in hub.errors, "the mismatched answer")
        assert not reply.done()
        await up.answer(q, addr, "192.0.2.5")
        answer = dns.message.from_wire(await reply)
        assert answer.answer[0][0].address == "192.0.2.5"
    finally:
        p.close()
        up.close()
        spoofer.close()


async def test_late_answer_is_dropped_and_the_next_upstream_answers(hub: Hub) -> None:
    """The first upstream's try times out, the second answers; a late answer is dropped."""
    slow, fast = FakeUpstream(), FakeUpstream()
    # Each of the two tries gets half: 3 s for the second to be answered right after it asks.
    p = proxy(hub, upstreams=[slow.address, fast.address], timeout=6)
    try:
        _, pending = p.begin(query("api.test"), ("10.99.0.2", 5000), "udp")
        assert pending is not None
        reply = asyncio.ensure_future(p.finish(pending))
        q1, addr1 = await slow.receive()
        q2, addr2 = await fast.receive()  # only after the first try ended
        assert q2.question == q1.question
        await fast.answer(q2, addr2, "192.0.2.2")
        answer = dns.message.from_wire(await reply)
        assert answer.answer[0][0].address == "192.0.2.2"
        await slow.answer(q1, addr1, "203.0.113.1")  # too late: its query is over
        await wait_for(lambda: "dns_upstream_unmatched" in hub.errors, "the late answer")
        [x] = hub.exchanges
        assert x.upstream == ("127.0.0.1", fast.sock.getsockname()[1])
        assert p.inflight == 0 and p.per_source == {}
    finally:
        p.close()
        slow.close()
        fast.close()


async def test_upstream_sockets_stay_few_across_many_queries(hub: Hub) -> None:
    """Two hundred queries leave from the same few sockets; a reload that drops the upstream
    closes them.
    """
    up = FakeUpstream()
    p = proxy(hub, upstreams=[up.address], max_inflight_per_source=1000, timeout=30)
    ports = set()
    try:
        for batch in range(4):
            replies = []
            for i in range(50):
                name = f"n{batch}-{i}.test"
                _, pending = p.begin(query(name), ("10.99.0.2", 5000), "udp")
                assert pending is not None
                replies.append(asyncio.ensure_future(p.finish(pending)))
            for _ in range(50):
                q, addr = await up.receive()
                ports.add(addr[1])
                await up.answer(q, addr, "192.0.2.3")
            for reply in replies:
                assert dns.message.from_wire(await reply).rcode() == dns.rcode.NOERROR
        assert p.upstream_sockets() == SOCKETS_PER_UPSTREAM
        assert len(ports) <= SOCKETS_PER_UPSTREAM
        p.configure(DnsConfig.model_validate({"upstreams": ["127.0.0.1:9"]}))
        assert p.upstream_sockets() == 0
    finally:
        p.close()
        up.close()


async def test_truncated_answer_is_asked_again_over_tcp(hub: Hub) -> None:
    """An upstream answer with TC set: the same upstream is asked over TCP, under the same id."""
    up = FakeUpstream()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        tcp.bind(("127.0.0.1", up.sock.getsockname()[1]))
    except OSError:
        tcp.close()
        up.close()
        pytest.skip("the fake upstream's port is taken for TCP on this machine")
    tcp_ids: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(2), "big")
        q = dns.message.from_wire(await reader.readexactly(size))
        tcp_ids.append(q.id)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", "192.0.2.8"))
        wire = r.to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, sock=tcp)
    p = proxy(hub, upstreams=[up.address], timeout=30)
    try:
        _, pending = p.begin(with_id("big.test", 99), ("10.99.0.2", 5000), "udp")
        assert pending is not None
        reply = asyncio.ensure_future(p.finish(pending))
        q, addr = await up.receive()
        cut = dns.message.make_response(q)
        cut.flags |= dns.flags.TC
        await asyncio.get_running_loop().sock_sendto(up.sock, cut.to_wire(), addr)
        answer = dns.message.from_wire(await reply)
        assert answer.id == 99 and answer.answer[0][0].address == "192.0.2.8"
        assert tcp_ids == [q.id]
        assert hub.exchanges[0].answers[0].data == "192.0.2.8"
    finally:
        p.close()
        server.close()
        up.close()


async def test_a_send_that_fails_ends_its_try_at_once_and_the_next_upstream_answers(
    hub: Hub,
) -> None:
    """Queries leave at the end of the loop's turn; one the kernel refuses (a broadcast address
    without SO_BROADCAST: EACCES, nothing leaves the host) ends its try then, not at its timer.
    """
    fast = FakeUpstream()
    p = proxy(hub, upstreams=["255.255.255.255:53", fast.address], timeout=20)
    try:
        _, pending = p.begin(query("api.test"), ("10.99.0.2", 5000), "udp")
        assert pending is not None
        reply = asyncio.ensure_future(p.finish(pending))
        started = time.monotonic()
        q, addr = await fast.receive()  # the first try's share would be 10 s
        assert time.monotonic() - started < 5
        await fast.answer(q, addr, "192.0.2.3")
        answer = dns.message.from_wire(await reply)
        assert answer.answer[0][0].address == "192.0.2.3"
        assert p.inflight == 0
    finally:
        p.close()
        fast.close()


async def test_only_a_refused_send_answers_servfail_naming_the_error(hub: Hub) -> None:
    """With no other upstream, the refused send is the reason given."""
    p = proxy(hub, upstreams=["255.255.255.255:53"], timeout=20)
    try:
        _, pending = p.begin(query("api.test"), ("10.99.0.2", 5000), "udp")
        assert pending is not None
        reply = await asyncio.wait_for(p.finish(pending), 5)
    finally:
        p.close()
    assert dns.message.from_wire(reply).rcode() == dns.rcode.SERVFAIL
    error = hub.exchanges[0].error or ""
    assert error.startswith("no upstream answered: 255.255.255.255:53: ")
    assert "Permission denied" in error
