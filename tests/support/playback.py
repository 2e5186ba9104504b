"""Play mutated client cases against a proxy and judge what came back and what got through.

`play_cases` runs `mutation.ClientCase`s over real sockets, a bounded number at
a time, and keeps every byte each connection received. Two pure judges follow:

- `response_problems`: what a client got must be HTTP/1.1 responses (a
  truncated last one is fine when the connection ended), no 101 (the proxy
  does no upgrades), and an upstream answer (tagged) only for a request of
  this very connection, each at most once: an extra or stale response relayed
  to a client is a desync.
- `unexplained_traffic`: every request an upstream received must match an
  allowed decision event of the gateway (method, URL, address, port), every
  tunnel connection that carried bytes an allowed tunnel decision, and
  nothing may reach a forbidden listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .clients import REASON_HEADER, parse_response
from .gateway import field
from .mutation import TAG_HEADER, ClientCase, Close, HalfClose, Hang, Pause, Reset, Send
from .scripted_upstream import UpstreamConnection

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
READ_SIZE = 65536
CASE_TIMEOUT = 4.0  # the gateway's idle timeout (2 s) plus its sweep interval, and slack
TUNNEL_QUIET = 0.3  # a tunnel that said nothing for this long is done
ALLOWED_ACTIONS = ("connection_allowed", "would_deny")


@dataclass
class CaseResult:
    """What one case's connection saw."""

    case: ClientCase
    received: bytes
    ending: str  # eof, reset, done, timeout, client-close, client-reset, refused
    seconds: float


def _final_responses(buf: bytes, head_only: bool) -> list[dict[str, str]] | str:
    """Return the headers of the final responses in `buf`, or a problem description."""
    finals: list[dict[str, str]] = []
    pos = 0
    while pos < len(buf):
        try:
            parsed = parse_response(buf[pos:], head_only=head_only)
            if parsed is not None and head_only and REASON_HEADER in parsed[0].headers:
                parsed = parse_response(buf[pos:])  # the proxy's own answer has a body
        except ValueError as e:
            return f"malformed response at byte {pos}: {e}"
        if parsed is None:
            tail = buf[pos:]
            if not b"HTTP/1.1 ".startswith(tail[:9]):
                return f"junk where a response should start at byte {pos}: {tail[:120]!r}"
            return finals  # the last response was cut short by the end of the connection
        response, used = parsed
        if response.status == 101:
            return f"a 101 reached the client at byte {pos}: {buf[pos : pos + 120]!r}"
        if response.status >= 200:
            finals.append(response.headers)
        pos += used
    return finals


def response_problems(result: CaseResult) -> list[str]:
    """Return what is wrong with the bytes a case's client received (empty if nothing)."""
    case, buf = result.case, result.received
    if case.kind == "connect" and (b"\r\n\r\n" not in buf or buf.startswith(b"HTTP/1.1 200 ")):
        return []  # no answer yet, or a tunnel: what follows is the destination's business
    finals = _final_responses(buf, head_only=case.head_request)
    if isinstance(finals, str):
        return [finals]
    problems = []
    seen: Counter[str] = Counter()
    for headers in finals:
        tag = headers.get(TAG_HEADER.lower())
        if tag is None:
            continue
        seen[tag] += 1
        if tag not in case.tags:
            problems.append(f"an upstream answer tagged {tag} reached a client that never sent it")
        elif seen[tag] > 1:
            problems.append(
                f"the upstream answer tagged {tag} reached the client {seen[tag]} times"
            )
    return problems


def _enough(case: ClientCase, buf: bytes) -> bool:
    """True once a client of `case` has every answer it can expect (it may close)."""
    if case.kind == "connect":
        return False
    finals = _final_responses(buf, head_only=case.head_request)
    return isinstance(finals, list) and len(finals) >= len(case.tags)


async def _play(case: ClientCase, host: str, port: int, source: str) -> CaseResult:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))
    try:
        await loop.sock_connect(sock, (host, port))
    except OSError:
        sock.close()
        return CaseResult(case, b"", "refused", time.monotonic() - started)
    buf = bytearray()
    ending = "timeout"
    eof = asyncio.Event()
    enough = asyncio.Event()
    last_byte = time.monotonic()

    async def read() -> None:
        nonlocal ending, last_byte
        try:
            while chunk := await loop.sock_recv(sock, READ_SIZE):
                buf.extend(chunk)
                last_byte = time.monotonic()
                if _enough(case, bytes(buf)):
                    enough.set()
            ending = "eof"
        except ConnectionResetError:
            ending = "reset"
        except OSError:
            ending = "reset"
        eof.set()

    reader = loop.create_task(read())
    client_end = ""
    try:
        for step in case.steps:
            if isinstance(step, Send):
                try:
                    await loop.sock_sendall(sock, step.data)
                except OSError:
                    break  # the proxy closed: what it said is in buf
            elif isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, HalfClose):
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    break
            elif isinstance(step, Close):
                client_end = "client-close"
                break
            elif isinstance(step, Reset):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client_end = "client-reset"
                break
            elif isinstance(step, Hang):
                break
        if not client_end:
            deadline = started + CASE_TIMEOUT
            while not eof.is_set() and not enough.is_set() and time.monotonic() < deadline:
                if case.kind == "connect" and time.monotonic() - last_byte > TUNNEL_QUIET:
                    break
                try:
                    await asyncio.wait_for(eof.wait(), 0.05)
                except TimeoutError:
                    continue
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        sock.close()
    if client_end:
        ending = client_end
    elif enough.is_set() and not eof.is_set():
        ending = "done"
    return CaseResult(case, bytes(buf), ending, time.monotonic() - started)


async def _play_all(
    cases: Sequence[ClientCase], host: str, port: int, source: str, concurrency: int
) -> list[CaseResult]:
    gate = asyncio.Semaphore(concurrency)

    async def one(case: ClientCase) -> CaseResult:
        async with gate:
            return await _play(case, host, port, source)

    return list(await asyncio.gather(*(one(c) for c in cases)))


def play_cases(
    cases: Sequence[ClientCase], host: str, port: int, source: str, concurrency: int
) -> list[CaseResult]:
    """Play every case against host:port from address `source`, `concurrency` at a time."""
    return asyncio.run(_play_all(cases, host, port, source, concurrency))


# ---- what reached the upstream ------------------------------------------------------------------


def _address(text: object) -> str:
    """An address as the upstream's socket sees it (IPv4-mapped IPv6 is the IPv4 address)."""
    try:
        ip = ipaddress.ip_address(str(text))
    except ValueError:
        return str(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _http_key(event: dict[str, Any]) -> tuple[str, int, str, str]:
    return (
        _address(field(event, "destination.ip")),
        int(field(event, "destination.port") or 0),
        str(field(event, "http.request.method")),
        str(field(event, "url.full")),
    )


def unexplained_traffic(
    connections: Iterable[UpstreamConnection], events: Iterable[dict[str, Any]]
) -> list[str]:
    """Return every upstream request or tunnel that no allowed decision event accounts for."""
    allowed_http: Counter[tuple[str, int, str, str]] = Counter()
    allowed_tunnels: Counter[tuple[str, int]] = Counter()
    any_tunnels: Counter[tuple[str, int]] = Counter()
    for event in events:
        action = field(event, "event.action")
        protocol = field(event, "network.protocol")
        if action == "connection_ended":
            continue
        address = (
            _address(field(event, "destination.ip")),
            int(field(event, "destination.port") or 0),
        )
        if protocol == "http" and action in ALLOWED_ACTIONS:
            allowed_http[_http_key(event)] += 1
        elif protocol in ("tcp", "tls"):
            any_tunnels[address] += 1
            if action in ALLOWED_ACTIONS:
                allowed_tunnels[address] += 1
    problems: list[str] = []
    tunnels_with_bytes: Counter[tuple[str, int]] = Counter()
    tunnels: Counter[tuple[str, int]] = Counter()
    for conn in connections:
        where = f"{conn.host}:{conn.port}"
        if conn.role == "forbidden":
            problems.append(
                f"a connection reached forbidden {where}: {bytes(conn.received[:300])!r}"
            )
        elif conn.role == "tunnel":
            tunnels[(conn.host, conn.port)] += 1
            if conn.received:
                tunnels_with_bytes[(conn.host, conn.port)] += 1
        else:
            for req in conn.requests:
                key = (conn.host, conn.port, req.method, f"http://{req.host}{req.target}")
                if req.hosts != 1:
                    problems.append(f"{where} got {req.hosts} Host headers: {req}")
                if allowed_http[key] > 0:
                    allowed_http[key] -= 1
                else:
                    problems.append(
                        f"{where} got a request no allowed decision accounts for: {req}"
                    )
            if conn.error is not None:
                problems.append(
                    f"{where} got bytes that are not HTTP ({conn.error}): "
                    f"{bytes(conn.received[-300:])!r}"
                )
    for address, n in sorted(tunnels_with_bytes.items()):
        if n > allowed_tunnels[address]:
            problems.append(
                f"{n} tunnels carried bytes to {address}, "
                f"but {allowed_tunnels[address]} were allowed"
            )
    for address, n in sorted(tunnels.items()):
        if n > any_tunnels[address]:
            problems.append(f"{n} connections to {address} but {any_tunnels[address]} decisions")
    return problems
