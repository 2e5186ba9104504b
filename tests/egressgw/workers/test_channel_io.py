"""The worker's end of the channel on a real socket pair: when events are written, and what
happens when the supervisor stops reading."""

import asyncio
import ipaddress
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from egressgw.decision.verdict import Verdict
from egressgw.flow import Flow
from egressgw.workers import worker as worker_module
from egressgw.workers.channel import EVENT, Decoder, decode_message
from egressgw.workers.worker import Channel, SendOnDecision

WAIT = 10.0


def event(n: int, size: int = 100) -> dict[str, Any]:
    return {"event": {"id": f"e-{n}"}, "pad": "x" * size}


class Peer:
    """The supervisor's end, read by hand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.decoder = Decoder()

    def frames(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return out
            if not data:
                return out
            out += self.decoder.feed(data)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, Peer]]:
    ours, theirs = socket.socketpair()
    channel = Channel(lambda msg: None)
    await asyncio.get_running_loop().create_unix_connection(lambda: channel, sock=ours)
    yield channel, Peer(theirs)
    await channel.aclose()
    theirs.close()


def flow(verdict: Verdict) -> Flow:
    f = Flow(ipaddress.ip_address("10.0.0.1"), 40000, time.time(), time.monotonic())
    f.verdict = verdict
    return f


async def test_events_go_out_once_per_loop_turn(pair: tuple[Channel, Peer]) -> None:
    """Events submitted in one callback are written together when the turn ends, not before."""
    channel, peer = pair
    for i in range(3):
        channel.submit(event(i))
    assert peer.frames() == []
    await asyncio.sleep(0)
    frames = peer.frames()
    assert [k for k, _ in frames] == [EVENT] * 3
    assert [p.count(b"e-") for _, p in frames] == [1, 1, 1]


async def test_a_refusal_is_written_before_its_answer_can_be(pair: tuple[Channel, Peer]) -> None:
    """After a refused flow's decision the event is in the socket at once; an allowed one waits
    for the end of the turn (its answer comes from the destination, later)."""
    channel, peer = pair
    consumer = SendOnDecision(channel)
    channel.submit(event(1))
    consumer.flow_decided(flow(Verdict.allow(ipaddress.ip_address("192.0.2.1"), "ok")))
    assert peer.frames() == []
    channel.submit(event(2))
    consumer.flow_decided(flow(Verdict.deny("policy")))
    assert len(peer.frames()) == 2


async def test_a_full_channel_drops_counts_and_reports_the_loss(
    pair: tuple[Channel, Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the supervisor not reading and the queue over its bound, events are dropped and
    counted; once it reads again, a ``lost`` message with the count comes before new events."""
    channel, peer = pair
    monkeypatch.setattr(worker_module, "MAX_UNSENT", 64 * 1024)
    dropped: list[int] = []
    channel.on_drop = dropped.append
    n = 0
    deadline = time.monotonic() + WAIT
    while not dropped:
        assert time.monotonic() < deadline, "never dropped"
        for _ in range(50):
            channel.submit(event(n, size=4000))
            n += 1
        await asyncio.sleep(0)
    received = 0
    reported: list[int] = []
    deadline = time.monotonic() + WAIT
    while not reported:
        for kind, payload in peer.frames():
            if kind == EVENT:
                received += 1
            else:
                msg = decode_message(payload)
                assert msg["op"] == "lost"
                reported.append(msg["count"])
        assert time.monotonic() < deadline, "the loss was never reported"
        channel.submit(event(n))  # the report rides on the next write
        n += 1
        await asyncio.sleep(0.01)
    await channel.aclose()  # what is left goes out
    received += sum(1 for kind, _ in peer.frames() if kind == EVENT)
    assert reported == [sum(dropped)]
    assert received + sum(dropped) == n, "an event neither arrived nor was counted"
