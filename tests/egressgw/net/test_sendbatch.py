"""SendBatch on real UDP sockets: held until the loop's turn ends, in order, failures reported."""

from __future__ import annotations

import asyncio
import socket

from egressgw.net.sendbatch import SendBatch


async def test_datagrams_leave_together_after_the_turn_in_order() -> None:
    """Nothing is sent while the caller runs; after one turn of the loop, all in order."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    batch = SendBatch()
    try:
        for i in range(5):
            batch.send(sender.sendto, b"%d" % i, receiver.getsockname())
        try:
            receiver.recv(16)
            raise AssertionError("a datagram left before the turn ended")
        except BlockingIOError:
            pass
        await asyncio.sleep(0)  # the turn ends: the batch is flushed
        got = []
        for _ in range(5):
            got.append(
                await asyncio.wait_for(asyncio.get_running_loop().sock_recv(receiver, 16), 5)
            )
        assert got == [b"0", b"1", b"2", b"3", b"4"]
    finally:
        receiver.close()
        sender.close()


async def test_a_failed_send_is_reported_with_its_token_and_the_rest_still_go() -> None:
    """EACCES (broadcast without SO_BROADCAST) goes to ``failed``; the next datagram is sent."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    failures: list[tuple[object, OSError]] = []
    batch = SendBatch()
    try:
        batch.send(
            sender.sendto,
            b"x",
            ("255.255.255.255", 9),
            lambda token, exc: failures.append((token, exc)),
            "first",
        )
        batch.send(sender.sendto, b"after", receiver.getsockname())
        batch.send(sender.sendto, b"no callback", ("255.255.255.255", 9))  # dropped quietly
        await asyncio.sleep(0)
        assert [(t, type(e)) for t, e in failures] == [("first", PermissionError)]
        receiver.settimeout(5)
        assert receiver.recv(16) == b"after"
    finally:
        receiver.close()
        sender.close()
