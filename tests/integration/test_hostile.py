"""Hostile clients and hostile upstreams, byte for byte, against the real gateway.

The upstream here is a raw TCP server (tests.support.RawUpstream) on 127.0.0.40 that records
every byte the gateway forwards and answers whatever a test scripts, including bytes no HTTP
server would send. The gateway's policy allows the payments workload to reach it.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    Dnsmasq,
    Gateway,
    RawConnection,
    RawPeer,
    RawUpstream,
    curl,
    end_of,
    field,
    free_port,
    write_config,
)
from tests.support.rawupstream import Script

from .testbed import BATCH, CONTRACT_DIR, PAYMENTS

pytestmark = pytest.mark.integration

RAW_IP = "127.0.0.40"
RAW_POLICY = f"""\
# The payments workload may reach the raw upstream on any port.
tiers:
  - name: hostile
    rules:
      - name: payments-to-raw
        action: allow
        from: {{namespace: payments}}
        to: {{cidrs: ["{RAW_IP}/32"]}}
"""
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SETTLE = 2.0
PER_SOURCE = 3
CLOSE_SETTLE = 0.3
ABANDONED = 5
ABANDON_AFTER = 0.2  # the request is upstream by then, its answer awaited
SHORT = 1.0
# Each upstream connection runs the script set when it was accepted, and tests read its end: the
# gateway keeps no idle upstream here (tests/egressgw/listeners/test_upstreams.py tests the pool).
NO_POOL = {"max_idle_upstreams": 0}
STRICT_LIMITS = {
    "head_timeout": SHORT,
    "response_timeout": SHORT,
    "max_connections_per_source": PER_SOURCE,
    **NO_POOL,
}
DRIP_INTERVAL = 0.3
DRIP_LIMIT = 6.0  # well past head_timeout and a sweep, far below idle_timeout
PIPELINE_BATCH = 64 * 1024
PIPELINE_BYTES = 60 * 1024 * 1024
PIPELINE_STALL = 3.0
PIPELINE_RSS_LIMIT = 24 * 1024 * 1024
ENDLESS_CHUNKS = 200  # 64 KiB each: 12.5 MiB of one header line


def content_length(head: bytes) -> int:
    """The Content-Length of a request head, 0 without one."""
    found = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    return int(found.group(1)) if found else 0


def serve_requests(heads: list[bytes], response: bytes = OK_RESPONSE) -> Script:
    """A script answering every request (framed by Content-Length) with `response`."""

    def script(peer: RawPeer) -> None:
        while True:
            head = peer.read_head()
            if not head:
                return
            heads.append(head)
            peer.read_exact(content_length(head))
            if not peer.send(response):
                return

    return script


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[RawUpstream]:
    """The raw upstream on a free port of 127.0.0.40 (it answers nothing until a test scripts)."""
    with RawUpstream(RAW_IP, free_port(RAW_IP), lambda peer: None) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, dns: Dnsmasq, raw_upstream: RawUpstream
) -> Iterator[Gateway]:
    """The contract gateway, plus a rule letting payments reach the raw upstream."""
    path = write_config(
        tmp_path_factory.mktemp("gw-hostile"),
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={
            "policy": {"files": ["policy.yaml", "raw-policy.yaml"]},
            "proxy": NO_POOL,
        },
        extra_files={"raw-policy.yaml": RAW_POLICY},
    )
    with Gateway(path) as gw:
        yield gw


@pytest.fixture(scope="module")
def strict(
    tmp_path_factory: pytest.TempPathFactory, dns: Dnsmasq, raw_upstream: RawUpstream
) -> Iterator[Gateway]:
    """Like `gateway`, with 1 s timeouts and at most 3 connections per source."""
    path = write_config(
        tmp_path_factory.mktemp("gw-hostile-strict"),
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={
            "policy": {"files": ["policy.yaml", "raw-policy.yaml"]},
            "proxy": STRICT_LIMITS,
        },
        extra_files={"raw-policy.yaml": RAW_POLICY},
    )
    with Gateway(path) as gw:
        yield gw


@pytest.fixture
def upstream(raw_upstream: RawUpstream) -> RawUpstream:
    """The raw upstream with nothing recorded yet."""
    raw_upstream.clear()
    return raw_upstream


def client(gw: Gateway) -> RawConnection:
    """A raw connection to the gateway from the payments workload."""
    return RawConnection(gw.proxy_host, gw.proxy_port, source=PAYMENTS)


def test_connection_cannot_remove_content_length_to_smuggle_a_request(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """`Connection: Content-Length` does not strip the length the body was framed with."""
    heads: list[bytes] = []
    upstream.set_script(serve_requests(heads))
    hidden = f"GET /malware HTTP/1.1\r\nHost: {upstream.authority}\r\n\r\n".encode()
    body = hidden.ljust(50, b"x")
    request = (
        f"POST http://{upstream.authority}/benign HTTP/1.1\r\nHost: {upstream.authority}\r\n"
        f"Connection: Content-Length\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with client(gateway) as conn:
        conn.send(request)
        reply = conn.read_response()
        port = conn.local_port
    assert reply.status == 200, reply
    assert upstream.wait_finished(0, SETTLE)
    assert len(heads) == 1 and heads[0].startswith(b"POST /benign "), heads
    assert content_length(heads[0]) == len(body)
    assert bytes(upstream.received[0]).endswith(body)
    end = end_of(gateway.flow_events(PAYMENTS, port, ended=True))
    assert field(end, "url.path") in (None, "/benign")


def test_connection_cannot_remove_a_response_content_length(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """A response's `Connection: Content-Length` keeps its length: framed, kept alive."""
    heads: list[bytes] = []
    response = b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello"
    upstream.set_script(serve_requests(heads, response))
    request = f"GET http://{upstream.authority}/a HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with client(gateway) as conn:
        first = conn.request(request)
        second = conn.request(request)
    assert first.headers.get("content-length") == "5" and first.body == b"hello", first
    assert "close" not in first.headers.get("connection", ""), first
    assert second.status == 200 and second.body == b"hello", second
    assert len(heads) == 2, heads


def test_a_response_header_that_never_ends_is_502_and_closed(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """An upstream head growing past the limit without a line end: 502 at once, upstream closed."""
    outcome: dict[str, bool] = {}

    def endless_header(peer: RawPeer) -> None:
        peer.read_head()
        peer.send(b"HTTP/1.1 200 OK\r\nX-Inf: ")
        filler = b"a" * 65536
        for _ in range(ENDLESS_CHUNKS):
            if not peer.send(filler):
                outcome["closed"] = True
                return
        outcome["closed"] = peer.closed_by_gateway(SETTLE)

    upstream.set_script(endless_header)
    with client(gateway) as conn:
        reply = conn.request(
            f"GET http://{upstream.authority}/inf HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        port = conn.local_port
    assert reply.status == 502 and "head larger than" in reply.reason, reply
    assert upstream.wait_finished(0, SETTLE) and outcome.get("closed"), outcome
    end = end_of(gateway.flow_events(PAYMENTS, port, ended=True))
    assert "head larger than" in str(field(end, "event.reason")), end


def test_pipelined_requests_of_a_client_that_reads_nothing_are_not_buffered(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """Megabytes of pipelined requests, no answer read: the gateway stops reading, memory stays."""
    heads: list[bytes] = []
    upstream.set_script(serve_requests(heads))
    one = f"GET http://{upstream.authority}/p HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    batch = one * (PIPELINE_BATCH // len(one))
    rss_before = gateway.rss_bytes()
    sent = 0
    with client(gateway) as conn:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.sock.settimeout(PIPELINE_STALL)
        with contextlib.suppress(TimeoutError):
            while sent < PIPELINE_BYTES:
                conn.sock.sendall(batch)
                sent += len(batch)
        grown = gateway.rss_bytes() - rss_before
    # Backpressure stalls the sender long before everything is in: the kernel's buffers hold
    # some megabytes, the gateway a bounded queue, not tens of megabytes of parsed requests.
    assert sent < PIPELINE_BYTES, sent
    assert grown < PIPELINE_RSS_LIMIT, (grown, sent)


def test_head_timeout_applies_to_every_request_of_a_connection(
    strict: Gateway, upstream: RawUpstream
) -> None:
    """After one whole request, a second head dripped a byte at a time gets 408, closed."""
    upstream.set_script(serve_requests([]))
    request = f"GET http://{upstream.authority}/one HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with client(strict) as conn:
        assert conn.request(request).status == 200
        started = time.monotonic()
        for byte in request:
            readable, _, _ = select.select([conn.sock], [], [], DRIP_INTERVAL)
            if readable or time.monotonic() - started > DRIP_LIMIT:
                break
            conn.send(bytes([byte]))
        reply = conn.read_response()
    assert reply.status == 408, reply
    assert time.monotonic() - started < DRIP_LIMIT


def test_connections_per_source_are_limited_with_a_503(strict: Gateway) -> None:
    """Past proxy.max_connections_per_source one source gets 503; another source is served."""
    with contextlib.ExitStack() as stack:
        for _ in range(PER_SOURCE):
            held = stack.enter_context(client(strict))
            held.send(b"GET http://")
        time.sleep(0.2)
        with client(strict) as over:
            refused = over.request(b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n")
        other = RawConnection(strict.proxy_host, strict.proxy_port, source=BATCH)
        with other:
            other.send(b"GET http://")
            time.sleep(0.2)
            assert not select.select([other.sock], [], [], 0)[0]  # admitted, waiting for more
    assert refused.status == 503 and PAYMENTS in refused.reason, refused
    assert 'egressgw_errors_total{kind="too_many_connections_per_source"}' in metrics_text(strict)


def metrics_text(gw: Gateway) -> str:
    """The gateway's /metrics text."""
    with urllib.request.urlopen(f"{gw.admin_url}/metrics", timeout=SETTLE) as resp:
        text: str = resp.read().decode()
    return text


def test_an_upstream_that_never_answers_is_504_at_response_timeout(
    strict: Gateway, upstream: RawUpstream
) -> None:
    """No response head within proxy.response_timeout: 504 with the reason, upstream closed."""
    outcome: dict[str, bool] = {}

    def silent(peer: RawPeer) -> None:
        peer.read_head()
        outcome["closed"] = peer.closed_by_gateway(DRIP_LIMIT)

    upstream.set_script(silent)
    started = time.monotonic()
    with client(strict) as conn:
        reply = conn.request(
            f"GET http://{upstream.authority}/s HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        port = conn.local_port
    assert reply.status == 504 and "no response head" in reply.reason, reply
    assert time.monotonic() - started < DRIP_LIMIT
    assert upstream.wait_finished(0, SETTLE) and outcome.get("closed"), outcome
    end = end_of(strict.flow_events(PAYMENTS, port, ended=True))
    assert "no response head" in str(field(end, "event.reason")), end
    assert 'egressgw_errors_total{kind="response_timeout"}' in metrics_text(strict)


def answer_once(response: bytes, heads: list[bytes] | None = None) -> Script:
    """A script answering the first request head with `response`, then closing."""

    def script(peer: RawPeer) -> None:
        head = peer.read_head()
        if heads is not None:
            heads.append(head)
        peer.send(response)

    return script


def get(authority: str, path: str = "/") -> bytes:
    """A GET request for the raw upstream in absolute form."""
    return f"GET http://{authority}{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def test_an_unsolicited_second_response_never_reaches_the_client(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """Two responses to one request: the client gets the first; the second is refused."""
    double = (
        b"HTTP/1.1 200 OK\r\nX-First: 1\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 203 Extra\r\nContent-Length: 2\r\n\r\nzz"
    )
    upstream.set_script(serve_requests([], double))
    with client(gateway) as conn:
        first = conn.request(get(upstream.authority))
        conn.sock.settimeout(SHORT)
        later = conn._buf
        with contextlib.suppress(TimeoutError):
            later += conn.sock.recv(65536)
        assert b"203" not in later and b"zz" not in later, later
    assert first.status == 200 and first.body == b"ok", first


def test_an_unasked_101_is_a_clean_502(gateway: Gateway, upstream: RawUpstream) -> None:
    """An upstream 101 is answered 502 and logs no parser traceback."""
    upstream.set_script(
        answer_once(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
        )
    )
    with client(gateway) as conn:
        reply = conn.request(get(upstream.authority))
    assert reply.status == 502 and "101" in reply.reason, reply
    time.sleep(CLOSE_SETTLE)
    assert "HttpParserUpgrade" not in gateway.logs()
    assert "Traceback" not in gateway.logs()


def test_an_abandoned_exchange_leaves_no_unretrieved_future(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """An upstream failing while the body is awaited, then the client gone: nothing unretrieved."""
    upstream.set_script(answer_once(b""))  # reads the head, closes
    request = (
        f"POST http://{upstream.authority}/b HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    for _ in range(ABANDONED):
        with client(gateway) as conn:
            conn.send(request + b"partial")
            time.sleep(ABANDON_AFTER)
    time.sleep(CLOSE_SETTLE)
    assert "never retrieved" not in gateway.logs(), gateway.logs()


def test_request_trailers_are_not_promoted_into_the_head(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """Trailers arriving with the head are dropped, never forwarded as head fields."""
    received: list[bytes] = []
    body = b"3\r\nabc\r\n0\r\n\r\n"  # the chunked body as forwarded, trailers dropped

    def script(peer: RawPeer) -> None:
        # The whole request is read before the answer: an upstream that answers and closes
        # while the body is still on its way makes the gateway's send fail (a 502, not this test).
        received.append(peer.read_head() + peer.read_exact(len(body)))
        peer.send(OK_RESPONSE)

    upstream.set_script(script)
    request = (
        f"POST http://{upstream.authority}/t HTTP/1.1\r\nHost: x\r\n"
        "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: smuggled\r\n\r\n"
    ).encode()
    with client(gateway) as conn:
        reply = conn.request(request)
    assert reply.status == 200, reply
    assert received and received[0].endswith(b"\r\n\r\n" + body), received
    assert b"x-trailer" not in received[0].lower(), received


def test_a_response_whose_final_coding_is_not_chunked_is_close_delimited(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """`Transfer-Encoding: chunked, gzip` runs to the close: relayed as is, not re-chunked."""
    payload = b"\x1f\x8b not really gzip, but to the close"
    upstream.set_script(
        answer_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n" + payload)
    )
    with client(gateway) as conn:
        conn.send(get(upstream.authority))
        raw = conn.read_until_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Connection: close" in head, head
    assert body == payload, raw


def test_absolute_form_port_0_is_400(gateway: Gateway, upstream: RawUpstream) -> None:
    """http://host:0/ is refused with 400, as CONNECT host:0 is, never sent to port 80."""
    with client(gateway) as conn:
        reply = conn.request(b"GET http://127.0.0.40:0/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.status == 400 and "port 0" in reply.reason, reply


def test_a_request_trailer_that_never_ends_is_431_and_closed(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """A trailer line growing past the head limit without a line end: 431 at once, closed."""
    upstream.set_script(lambda peer: peer.hold(DRIP_LIMIT))
    start = (
        f"POST http://{upstream.authority}/t HTTP/1.1\r\nHost: x\r\n"
        "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Inf: "
    ).encode()
    filler = b"a" * 65536
    with client(gateway) as conn:
        conn.send(start)
        for _ in range(ENDLESS_CHUNKS):
            if select.select([conn.sock], [], [], 0)[0]:
                break  # the gateway answered (and stopped reading)
            try:
                conn.send(filler)
            except OSError:
                break
        reply = conn.read_response()
    assert reply.status == 431 and "trailer" in reply.reason, reply


def test_a_response_transfer_coding_before_chunked_is_forwarded(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """`Transfer-Encoding: gzip, chunked` reaches the client re-chunked with gzip still named."""
    payload = b"\x1f\x8b not really gzip"
    upstream.set_script(
        serve_requests(
            [],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload),
        )
    )
    with client(gateway) as conn:
        reply = conn.request(get(upstream.authority))
    assert reply.headers.get("transfer-encoding") == "gzip, chunked", reply
    assert reply.body == payload, reply


def get10(authority: str, extra: str = "") -> bytes:
    """An HTTP/1.0 GET for the raw upstream in absolute form."""
    return f"GET http://{authority}/old HTTP/1.0\r\nHost: x\r\n{extra}\r\n".encode()


def test_an_http10_client_gets_a_chunked_body_de_chunked_and_closed(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """HTTP/1.0: no 1xx, no chunked coding; the body runs to the close, which is announced."""
    upstream.set_script(
        serve_requests(
            [],
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
    )
    with client(gateway) as conn:
        conn.send(get10(upstream.authority, "Connection: keep-alive\r\n"))
        raw = conn.read_until_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), raw
    assert b"transfer-encoding" not in head.lower() and b"Connection: close" in head, head
    assert body == b"hello", raw


def test_an_http10_client_keeps_alive_only_when_asked_and_the_length_is_known(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """HTTP/1.0 with keep-alive and a known length: `Connection: keep-alive`; else close."""
    upstream.set_script(serve_requests([]))
    with client(gateway) as conn:
        first = conn.request(get10(upstream.authority, "Connection: keep-alive\r\n"))
        second = conn.request(get10(upstream.authority))
        rest = conn.read_until_closed()
    assert first.headers.get("connection") == "keep-alive" and first.body == b"ok", first
    assert second.headers.get("connection") == "close" and second.body == b"ok", second
    assert rest == b""


def test_an_http10_client_is_refused_a_transfer_coding_it_cannot_know(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """`Transfer-Encoding: gzip, chunked` cannot be told to an HTTP/1.0 client: 502."""
    upstream.set_script(
        answer_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
    )
    with client(gateway) as conn:
        reply = conn.request(get10(upstream.authority))
    assert reply.status == 502 and "HTTP/1.0" in reply.reason, reply


H2C_OFFER = (  # as curl --http2 sends it
    "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
)


def test_an_h2c_upgrade_offer_is_dropped_and_forwarded_as_http11(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """`Upgrade: h2c` (with and without a body, pipelined): offers dropped, all forwarded."""
    heads: list[bytes] = []

    def script(peer: RawPeer) -> None:
        while head := peer.read_head():
            heads.append(head)
            if b"chunked" in head:
                assert peer.read_exact(len(b"3\r\nabc\r\n0\r\n\r\n")).endswith(b"0\r\n\r\n")
            else:
                peer.read_exact(content_length(head))
            peer.send(OK_RESPONSE)

    upstream.set_script(script)
    a = upstream.authority
    offers = (
        f"GET http://{a}/one HTTP/1.1\r\nHost: x\r\n{H2C_OFFER}\r\n"
        f"POST http://{a}/two HTTP/1.1\r\nHost: x\r\n{H2C_OFFER}Content-Length: 5\r\n\r\nhello"
        f"POST http://{a}/three HTTP/1.1\r\nHost: x\r\n{H2C_OFFER}Transfer-Encoding: chunked\r\n"
        "\r\n3\r\nabc\r\n0\r\n\r\n"
        f"GET http://{a}/four HTTP/1.1\r\nHost: x\r\n\r\n"
    ).encode()
    with client(gateway) as conn:
        conn.send(offers)
        replies = [conn.read_response() for _ in range(4)]
    assert [r.status for r in replies] == [200] * 4, replies
    assert [h.split(b" ")[1] for h in heads] == [b"/one", b"/two", b"/three", b"/four"], heads
    for head in heads:
        assert b"upgrade" not in head.lower() and b"http2-settings" not in head.lower(), head
    received = b"".join(upstream.received)  # one connection per request: no pool here
    assert b"\r\n\r\nhello" in received and b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n" in received


def test_curl_http2_through_the_proxy_gets_http11(gateway: Gateway, upstream: RawUpstream) -> None:
    """`curl --http2 http://...` offers h2c: the gateway drops it and forwards HTTP/1.1."""
    heads: list[bytes] = []
    upstream.set_script(serve_requests(heads))
    got = curl(
        f"http://{upstream.authority}/h2c",
        proxy=f"http://{gateway.proxy_host}:{gateway.proxy_port}",
        interface=PAYMENTS,
        extra=["--http2", "-d", "hello"],
    )
    assert got.status == 200 and got.body == b"ok", got
    assert len(heads) == 1 and b"upgrade" not in heads[0].lower(), heads


def test_a_websocket_upgrade_in_absolute_form_is_501(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """Other upgrade offers (websocket) are refused with 501 and a reason naming CONNECT."""
    heads: list[bytes] = []
    upstream.set_script(serve_requests(heads))
    with client(gateway) as conn:
        reply = conn.request(
            f"GET http://{upstream.authority}/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
    assert reply.status == 501 and "websocket" in reply.reason and "CONNECT" in reply.reason
    assert heads == []


def test_a_client_refused_at_the_connection_limit_reads_its_503_not_a_reset(
    strict: Gateway, upstream: RawUpstream
) -> None:
    """Refused while still sending: its input is read and dropped, the 503 then EOF arrive."""
    first = b"POST http://a.test/ HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
    # The source's connections are held open as established tunnels: a half-sent head would be
    # closed by the strict head_timeout, freeing a place before the test is done with it.
    upstream.set_script(lambda peer: peer.closed_by_gateway(30.0))
    with contextlib.ExitStack() as stack:
        for _ in range(PER_SOURCE):
            held = stack.enter_context(client(strict))
            established = held.request(
                f"CONNECT {upstream.authority} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                head_only=True,
            )
            assert established.status == 200, established
        with client(strict) as over:
            over.send(first + b"b" * 30000)
            time.sleep(CLOSE_SETTLE)  # the gateway answered meanwhile
            over.send(b"b" * 70000)  # a reset would fail this send, or the reads below
            received = b""
            while chunk := over.sock.recv(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 503 "), received


RST_LINGER = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close sends a reset


@pytest.mark.parametrize(
    ("answered", "outcome"), [(True, "success"), (False, "failure")], ids=["after", "before"]
)
def test_a_client_reset_ends_a_tunnel_as_success_only_after_the_exchange(
    gateway: Gateway, upstream: RawUpstream, answered: bool, outcome: str
) -> None:
    """A reset after the destination's bytes were delivered is a normal close; before, a failure."""

    def script(peer: RawPeer) -> None:
        if peer.read_exact(4) and answered:
            peer.send(b"pong")
        peer.closed_by_gateway(SETTLE)

    upstream.set_script(script)
    with client(gateway) as conn:
        established = conn.request(
            f"CONNECT {upstream.authority} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), head_only=True
        )
        assert established.status == 200, established
        conn.send(b"ping")
        if answered:
            conn.sock.settimeout(SETTLE)
            assert conn.sock.recv(4) == b"pong"
        else:
            assert upstream.wait_finished(0, 0.3) is False  # the ping is there, no answer
        port = conn.local_port
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_LINGER)
    end = end_of(gateway.flow_events(PAYMENTS, port, ended=True))
    assert field(end, "event.outcome") == outcome, end


SECRET = "s3cret-proxy-token"


def test_proxy_authorization_is_read_never_forwarded_nor_recorded(
    gateway: Gateway, upstream: RawUpstream
) -> None:
    """Neither an absolute-form request nor a tunnel carries the credential upstream or to logs."""
    heads: list[bytes] = []
    upstream.set_script(serve_requests(heads))
    with client(gateway) as conn:
        reply = conn.request(
            f"GET http://{upstream.authority}/ HTTP/1.1\r\nHost: {upstream.authority}\r\n"
            f"Proxy-Authorization: Bearer {SECRET}\r\n\r\n".encode()
        )
        port = conn.local_port
    assert reply.status == 200, reply
    end_of(gateway.flow_events(PAYMENTS, port, ended=True))
    assert len(heads) == 1 and b"proxy-authorization" not in heads[0].lower(), heads

    def script(peer: RawPeer) -> None:
        if peer.read_exact(4):
            peer.send(b"pong")
        peer.closed_by_gateway(SETTLE)

    upstream.clear()
    upstream.set_script(script)
    with client(gateway) as conn:
        established = conn.request(
            f"CONNECT {upstream.authority} HTTP/1.1\r\nHost: x\r\n"
            f"proxy-authorization: Bearer {SECRET}\r\n\r\n".encode(),
            head_only=True,
        )
        assert established.status == 200, established
        conn.send(b"ping")
        conn.sock.settimeout(SETTLE)
        assert conn.sock.recv(4) == b"pong"
        port = conn.local_port
    end_of(gateway.flow_events(PAYMENTS, port, ended=True))
    assert bytes(upstream.received[0]) == b"ping"
    assert SECRET.encode() not in gateway.events_path.read_bytes()
    assert SECRET not in gateway.logs()


def test_a_pooled_upstream_cannot_answer_the_next_client_with_bytes_it_sent_early(
    tmp_path: Path, dns: Dnsmasq, upstream: RawUpstream
) -> None:
    """With upstreams kept and shared between clients (the default), an upstream that sends a
    second response nobody asked for is not kept: the next client's request gets a connection of
    its own and its own answer, never the planted one."""
    planted = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nplanted"
    connections: list[int] = []

    def script(peer: RawPeer) -> None:
        connections.append(1)
        if not peer.read_head():
            return
        first = len(connections) == 1
        # The first connection answers and then plants a second answer; later ones answer.
        if peer.send(OK_RESPONSE + (planted if first else b"")):
            peer.closed_by_gateway(SETTLE)

    upstream.set_script(script)
    path = write_config(
        tmp_path / "gw",
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={"policy": {"files": ["policy.yaml", "raw-policy.yaml"]}},
        extra_files={"raw-policy.yaml": RAW_POLICY},
    )
    request = f"GET http://{upstream.authority}/ HTTP/1.1\r\nHost: {upstream.authority}\r\n\r\n"
    with Gateway(path) as gw:
        with client(gw) as first_client:
            assert first_client.request(request.encode()).body == b"ok"
        time.sleep(CLOSE_SETTLE)  # the planted bytes are there before the next request
        with client(gw) as second_client:
            reply = second_client.request(request.encode())
    assert reply.status == 200 and reply.body == b"ok", reply
    assert len(connections) == 2  # the planting upstream was not reused
