"""Ways around policy, feeds and the destination guard, and malformed or hostile clients.

Each bypass is tried against the real gateway with curl or hand-crafted bytes;
the feed-listed (127.0.0.66) and evil (127.0.0.32) addresses run echo
upstreams, so a bypass shows as a request reaching them. The guard tests use a
second gateway whose guard.allow covers only 127.0.0.16/28 and 127.0.0.30/31,
with a policy that would allow 127.0.0.99: only the guard can refuse it, and
nothing listens there, so a broken guard shows as 502 instead of 403.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support import (
    CurlResult,
    Dnsmasq,
    Gateway,
    RawConnection,
    RawResponse,
    ScriptedDns,
    TlsFiles,
    Upstream,
    curl,
    decision_of,
    end_of,
    field,
    raw_request,
    write_config,
)
from tests.support.gateway import load_yaml

from .testbed import (
    ALLOWED_IP,
    CONTRACT_DIR,
    EVIL_IP,
    FEED_IP,
    GUARDED_IP,
    HTTP_PORT,
    HTTPS_PORT,
    PAYMENTS,
    STORAGE_IP,
    STORAGE_PORT,
    UNKNOWN,
)

pytestmark = pytest.mark.integration

IDN_FEED = "idn-domains"
IDN_FEED_TEXT = "# IDN names are listed in punycode\nxn--bcher-kva.test\n"
GUARD_ALLOW = ["127.0.0.16/28", "127.0.0.30/31"]
GUARD_POLICY = f"""\
# Allows what only the destination guard may refuse, and storage to unknown sources.
tiers:
  - name: lab
    rules:
      - name: payments-to-guarded
        action: allow
        from: {{namespace: payments}}
        to: {{cidrs: ["{GUARDED_IP}/32"], ports: [{HTTP_PORT}, {HTTPS_PORT}]}}
      - name: unknown-to-storage
        action: allow
        from: {{unknown: true}}
        to: {{cidrs: ["{STORAGE_IP}/32"], ports: [{STORAGE_PORT}]}}
"""
SLOW_CLIENT_WAIT = 3.0
STUCK_BODY = 32_000_000
MAX_CONNECTIONS = 3
SHORT_TIMEOUT = "1s"
LIMIT_WAIT = 5.0
CLOSE_SETTLE = 0.3
PARTIAL_REQUEST = b"GET http://allowed"
CACHED_TTL = 30
MANY_HEADERS = 200


def contract_feeds() -> list[Any]:
    """Return the contract configuration's feed list."""
    feeds: list[Any] = load_yaml(CONTRACT_DIR / "egressgw.yaml")["feeds"]
    return feeds


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    dns: Dnsmasq,
    upstream: Upstream,
    curl_installed: None,
) -> Iterator[Gateway]:
    """The contract gateway with one more feed listing the punycode name xn--bcher-kva.test."""
    feeds = [*contract_feeds(), {"name": IDN_FEED, "url": "feed-idn.txt", "format": "lines"}]
    path = write_config(
        tmp_path_factory.mktemp("gw-bypass"),
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={"feeds": feeds},
        extra_files={"feed-idn.txt": IDN_FEED_TEXT},
    )
    with Gateway(path) as gw:
        yield gw


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory,
    dns: Dnsmasq,
    upstream: Upstream,
    curl_installed: None,
) -> Iterator[Gateway]:
    """A gateway whose guard exempts only 127.0.0.16/28 and 127.0.0.30/31 of loopback."""
    path = write_config(
        tmp_path_factory.mktemp("gw-guard"),
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={
            "guard": {"allow": GUARD_ALLOW},
            "policy": {"files": ["policy.yaml", "guard-policy.yaml"]},
        },
        extra_files={"guard-policy.yaml": GUARD_POLICY},
    )
    with Gateway(path) as gw:
        yield gw


def via(gw: Gateway, url: str, **kwargs: Any) -> CurlResult:
    """Run curl through the gateway as the payments workload."""
    return curl(url, proxy=gw.proxy_url, interface=PAYMENTS, **kwargs)


def raw(gw: Gateway, head: str, *, head_only: bool = False) -> RawResponse:
    """Send one hand-written request head (lines joined with CRLF) as payments; return the reply."""
    data = head.replace("\n", "\r\n").encode("utf-8") + b"\r\n\r\n"
    with RawConnection(gw.proxy_host, gw.proxy_port, source=PAYMENTS) as conn:
        return conn.request(data, head_only=head_only)


def assert_feed_denied(status: int, reason: str, feed: str) -> None:
    """Assert a 403 by security/block-threat-feeds naming `feed`."""
    assert status == 403, (status, reason)
    assert "security/block-threat-feeds" in reason and feed in reason, reason


def test_ip_literal_in_feed_denied(gateway: Gateway, upstream: Upstream) -> None:
    """http://127.0.0.66:8080/ (an IP literal listed in local-ips) is denied by the feed rule."""
    result = via(gateway, f"http://{FEED_IP}:{HTTP_PORT}/")
    assert_feed_denied(result.status, result.reason, "local-ips")
    assert upstream.requests_to(FEED_IP) == []


@pytest.mark.parametrize("name", ["EVIL.TEST.", "Sub.Evil.Test", "evil.test."])
def test_case_and_trailing_dot_do_not_hide_a_feed_name(
    gateway: Gateway, upstream: Upstream, name: str
) -> None:
    """Uppercase and a trailing dot are normalised before the feed lookup: still denied."""
    before = len(upstream.requests_to(EVIL_IP))
    reply = raw(gateway, f"GET http://{name}:{HTTP_PORT}/ HTTP/1.1\nHost: {name}:{HTTP_PORT}")
    assert_feed_denied(reply.status, reply.reason, "local-domains")
    connect = raw(
        gateway, f"CONNECT {name}:{HTTPS_PORT} HTTP/1.1\nHost: {name}:{HTTPS_PORT}", head_only=True
    )
    assert_feed_denied(connect.status, connect.reason, "local-domains")
    assert len(upstream.requests_to(EVIL_IP)) == before


def test_bytes_sent_with_a_refused_connect_go_nowhere(gateway: Gateway, upstream: Upstream) -> None:
    """A refused CONNECT answers 403 and drops the tunnel bytes sent along with it."""
    before = len(upstream.requests_to(EVIL_IP))
    authority = f"evil.test:{HTTP_PORT}"
    with RawConnection(gateway.proxy_host, gateway.proxy_port, source=PAYMENTS) as conn:
        conn.send(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
            "GET /early HTTP/1.1\r\nHost: early\r\n\r\n".encode()
        )
        refused = conn.read_response(head_only=True)
    assert_feed_denied(refused.status, refused.reason, "local-domains")
    assert len(upstream.requests_to(EVIL_IP)) == before


def test_curl_uppercase_trailing_dot_denied(gateway: Gateway) -> None:
    """curl http://EVIL.TEST.:8080/ through the gateway is denied by the feed."""
    result = via(gateway, f"http://EVIL.TEST.:{HTTP_PORT}/")
    assert_feed_denied(result.status, result.reason, "local-domains")


def test_userinfo_does_not_change_the_destination(gateway: Gateway, upstream: Upstream) -> None:
    """GET http://allowed.test:8080@evil.test/ is judged as evil.test (feed deny), not relayed."""
    before = len(upstream.requests_to(ALLOWED_IP)) + len(upstream.requests_to(EVIL_IP))
    reply = raw(
        gateway,
        f"GET http://allowed.test:{HTTP_PORT}@evil.test/ HTTP/1.1\nHost: allowed.test:{HTTP_PORT}",
    )
    assert_feed_denied(reply.status, reply.reason, "local-domains")
    after = len(upstream.requests_to(ALLOWED_IP)) + len(upstream.requests_to(EVIL_IP))
    assert after == before


def test_host_header_does_not_change_the_destination(gateway: Gateway, upstream: Upstream) -> None:
    """The absolute-form target wins over a Host header naming a feed-listed host."""
    reply = raw(gateway, f"GET http://allowed.test:{HTTP_PORT}/h HTTP/1.1\nHost: evil.test")
    assert reply.status == 200, reply
    echo = reply.body.decode()
    assert f'"host": "allowed.test:{HTTP_PORT}"' in echo
    assert f'"server_host": "{ALLOWED_IP}"' in echo


def test_host_header_cannot_unlock_a_denied_target(gateway: Gateway, upstream: Upstream) -> None:
    """A feed-listed absolute-form target stays denied whatever the Host header says."""
    before = len(upstream.requests_to(EVIL_IP))
    reply = raw(
        gateway, f"GET http://evil.test:{HTTP_PORT}/ HTTP/1.1\nHost: allowed.test:{HTTP_PORT}"
    )
    assert_feed_denied(reply.status, reply.reason, "local-domains")
    assert len(upstream.requests_to(EVIL_IP)) == before


@pytest.mark.parametrize("literal", ["[::ffff:127.0.0.66]", "[::ffff:7f00:42]"])
def test_ipv4_mapped_feed_ip_denied(gateway: Gateway, upstream: Upstream, literal: str) -> None:
    """CONNECT to the IPv4-mapped IPv6 form of a feed-listed IP is denied by the feed."""
    reply = raw(
        gateway,
        f"CONNECT {literal}:{HTTPS_PORT} HTTP/1.1\nHost: {literal}:{HTTPS_PORT}",
        head_only=True,
    )
    assert_feed_denied(reply.status, reply.reason, "local-ips")
    assert upstream.requests_to(FEED_IP) == []


def test_tls_sni_that_disagrees_with_connect_is_checked(
    gateway: Gateway, upstream: Upstream, pki: TlsFiles
) -> None:
    """CONNECT www.allowed.test with a ClientHello for evil.test is judged by the SNI: closed."""
    before = len(upstream.requests_to(ALLOWED_IP, HTTPS_PORT))
    connect_to = f"evil.test:{HTTPS_PORT}:www.allowed.test:{HTTPS_PORT}"
    result = via(
        gateway,
        f"https://evil.test:{HTTPS_PORT}/sni",
        cacert=pki.ca_cert,
        extra=["--connect-to", connect_to],
    )
    assert result.connect_status == 200 and result.status == 0, result
    assert len(upstream.requests_to(ALLOWED_IP, HTTPS_PORT)) == before
    decision = decision_of(gateway.flow_events(PAYMENTS, result.local_port))
    assert field(decision, "event.action") == "connection_denied"
    assert field(decision, "tls.client.server_name") == "evil.test"
    assert "local-domains" in str(field(decision, "event.reason"))


def test_idn_name_denied_by_punycode_feed_entry(gateway: Gateway, upstream: Upstream) -> None:
    """http://bücher.test:8080/ matches the feed entry xn--bcher-kva.test and is denied."""
    before = len(upstream.requests_to(EVIL_IP))
    result = via(gateway, f"http://bücher.test:{HTTP_PORT}/")
    assert_feed_denied(result.status, result.reason, IDN_FEED)
    decision = decision_of(gateway.flow_events(PAYMENTS, result.local_port))
    assert field(decision, "destination.domain") == "xn--bcher-kva.test"
    assert len(upstream.requests_to(EVIL_IP)) == before


def test_raw_utf8_idn_target_is_refused(gateway: Gateway, upstream: Upstream) -> None:
    """A UTF-8 IDN target sent raw (not punycoded by the client) is refused, never relayed."""
    before = len(upstream.requests_to(EVIL_IP))
    reply = raw(gateway, f"GET http://BÜCHER.test:{HTTP_PORT}/ HTTP/1.1\nHost: bücher.test")
    assert reply.status in (400, 403), reply
    if reply.status == 403:
        assert IDN_FEED in reply.reason, reply.reason
    assert len(upstream.requests_to(EVIL_IP)) == before


@pytest.mark.parametrize("name", ["v6.allowed.test", "dual.allowed.test"])
def test_guard_checks_aaaa_answers(gateway: Gateway, upstream: Upstream, name: str) -> None:
    """A name with an AAAA record of ::1 (alone or beside an allowed A) is refused by the guard."""
    before = len(upstream.requests_to(ALLOWED_IP))
    result = via(gateway, f"http://{name}:{HTTP_PORT}/")
    assert result.status == 403, (result.status, result.reason)
    assert result.reason.startswith("guard:") and "::1" in result.reason, result.reason
    assert len(upstream.requests_to(ALLOWED_IP)) == before


def test_policy_can_match_unknown_sources(guarded: Gateway) -> None:
    """A rule `from: {unknown: true}` matches a source with no workload, and only such sources."""
    url = f"http://{STORAGE_IP}:{STORAGE_PORT}/unknown"
    unknown = curl(url, proxy=guarded.proxy_url, interface=UNKNOWN)
    assert unknown.status == 200, unknown.reason
    decision = decision_of(guarded.flow_events(UNKNOWN, unknown.local_port))
    assert field(decision, "rule.name") == "unknown-to-storage"
    known = via(guarded, url)
    assert known.status == 403 and "default" in known.reason, known.reason


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "[::ffff:0.0.0.0]"])
def test_guard_refuses_unspecified_addresses(gateway: Gateway, host: str) -> None:
    """0.0.0.0 and :: (which reach the local host on Linux) are refused by the guard."""
    reply = raw(gateway, f"GET http://{host}:{HTTP_PORT}/ HTTP/1.1\nHost: {host}")
    assert reply.status == 403 and reply.reason.startswith("guard:"), reply
    assert "unspecified" in reply.reason


def test_guard_allows_listed_ranges(guarded: Gateway) -> None:
    """With a narrow guard.allow, a destination inside it (127.0.0.30) is still relayed."""
    result = via(guarded, f"http://allowed.test:{HTTP_PORT}/")
    assert result.status == 200, result.reason


@pytest.mark.parametrize(
    ("url", "tunnel"),
    [
        (f"http://internal.allowed.test:{HTTP_PORT}/", False),
        (f"http://{GUARDED_IP}:{HTTP_PORT}/", False),
        (f"http://{GUARDED_IP}:{HTTPS_PORT}/", True),
        (f"http://[::ffff:{GUARDED_IP}]:{HTTP_PORT}/", False),
        (f"http://[::1]:{HTTP_PORT}/", False),
    ],
    ids=["name", "literal", "connect", "ipv4-mapped", "ipv6-loopback"],
)
def test_guard_refuses_loopback_outside_allow(guarded: Gateway, url: str, tunnel: bool) -> None:
    """127.0.0.99 (name, literal, CONNECT, v4-mapped) and ::1 are outside guard.allow: refused."""
    result = via(guarded, url, tunnel=tunnel)
    assert result.status == 403, (result.status, result.reason, result.error)
    assert result.reason.startswith("guard:"), result.reason
    decision = decision_of(guarded.flow_events(PAYMENTS, result.local_port))
    assert field(decision, "event.action") == "connection_denied"
    assert str(field(decision, "event.reason")).startswith("guard:")


def test_garbage_is_400_and_the_proxy_still_serves(gateway: Gateway) -> None:
    """Bytes that are not HTTP get a 400, and the next client is served normally."""
    reply, _ = raw_request(
        gateway.proxy_host, gateway.proxy_port, b"\x16\x03\x01\x00\xff\x00garbage\r\n\r\n"
    )
    assert reply.status == 400
    reply, _ = raw_request(gateway.proxy_host, gateway.proxy_port, b"HELLO WORLD\r\n\r\n")
    assert reply.status == 400
    assert via(gateway, f"http://allowed.test:{HTTP_PORT}/").status == 200


def test_too_many_header_lines_is_431(gateway: Gateway) -> None:
    """A request with 200 header lines is answered 431."""
    headers = "".join(f"X-Filler-{i}: {i}\n" for i in range(MANY_HEADERS))
    reply = raw(gateway, f"GET http://allowed.test:{HTTP_PORT}/ HTTP/1.1\n{headers}Host: a")
    assert reply.status == 431


def test_oversized_header_is_431(gateway: Gateway) -> None:
    """A request whose head is larger than the header byte limit is answered 431."""
    big = "b" * (64 * 1024)
    reply = raw(gateway, f"GET http://allowed.test:{HTTP_PORT}/ HTTP/1.1\nX-Big: {big}\nHost: a")
    assert reply.status == 431


@pytest.mark.parametrize("method", ["PROPFIND", "MKCOL", "SEARCH"])
def test_extension_methods_are_forwarded(gateway: Gateway, upstream: Upstream, method: str) -> None:
    """A well-formed extension method (WebDAV and the like) is judged and relayed like GET."""
    reply = raw(gateway, f"{method} http://allowed.test:{HTTP_PORT}/dav HTTP/1.1\nHost: a")
    assert reply.status == 200, reply
    assert f'"method": "{method}"' in reply.body.decode()


def test_trace_is_405(gateway: Gateway, upstream: Upstream) -> None:
    """TRACE (which echoes credentials back) is answered 405 with the reason, never relayed."""
    before = len(upstream.requests_to(ALLOWED_IP))
    reply = raw(gateway, f"TRACE http://allowed.test:{HTTP_PORT}/ HTTP/1.1\nHost: a")
    assert reply.status == 405 and "TRACE" in reply.reason, reply
    assert len(upstream.requests_to(ALLOWED_IP)) == before


def test_invalid_method_token_is_400(gateway: Gateway) -> None:
    """A method token the HTTP parser does not know is a malformed request: 400."""
    reply = raw(gateway, f"BREW http://allowed.test:{HTTP_PORT}/ HTTP/1.1\nHost: a")
    assert reply.status == 400, reply


def test_slow_client_does_not_stall_others(gateway: Gateway) -> None:
    """A client that sends half a request line and stalls does not delay other clients."""
    with socket.create_connection((gateway.proxy_host, gateway.proxy_port)) as slow:
        slow.sendall(b"GET http://allowed.te")
        result = via(gateway, f"http://allowed.test:{HTTP_PORT}/", timeout=SLOW_CLIENT_WAIT)
        assert result.status == 200, result.error
        result = via(gateway, f"http://allowed.test:{HTTP_PORT}/", timeout=SLOW_CLIENT_WAIT)
        assert result.status == 200, result.error


@pytest.mark.parametrize("host", ["2130706498", "0x7f000042", "0177.0.0.0102", "127.0.66"])
def test_numeric_ip_spellings_do_not_reach_a_feed_ip(
    gateway: Gateway, upstream: Upstream, host: str
) -> None:
    """Integer, hex, octal and short spellings of 127.0.0.66 are refused, never relayed there."""
    reply = raw(gateway, f"GET http://{host}:{HTTP_PORT}/ HTTP/1.1\nHost: {host}:{HTTP_PORT}")
    assert reply.status in (400, 403, 502), reply
    assert upstream.requests_to(FEED_IP) == []


@pytest.mark.parametrize("target", ["HTTP://EVIL.test:8080/", "http://evil%2etest:8080/"])
def test_scheme_case_and_percent_encoding_do_not_hide_a_feed_name(
    gateway: Gateway, upstream: Upstream, target: str
) -> None:
    """An uppercase scheme or a percent-encoded dot in the host does not get past the feed."""
    before = len(upstream.requests_to(EVIL_IP))
    reply = raw(gateway, f"GET {target} HTTP/1.1\nHost: evil.test")
    assert reply.status in (400, 403), reply
    if reply.status == 403:
        assert "local-domains" in reply.reason, reply.reason
    assert len(upstream.requests_to(EVIL_IP)) == before


def test_content_length_with_chunked_cannot_smuggle_a_request(
    gateway: Gateway, upstream: Upstream
) -> None:
    """Content-Length plus Transfer-Encoding cannot hide a second request to a denied host."""
    before = len(upstream.requests_to(EVIL_IP))
    smuggled = f"GET http://evil.test:{HTTP_PORT}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"
    body = f"0\r\n\r\n{smuggled}".encode()
    head = (
        f"POST http://allowed.test:{HTTP_PORT}/smuggle HTTP/1.1\r\nHost: allowed.test\r\n"
        f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with RawConnection(gateway.proxy_host, gateway.proxy_port, source=PAYMENTS) as conn:
        conn.send(head + body)
        replies = [conn.read_response()]
        with contextlib.suppress(ConnectionError, TimeoutError):
            replies.append(conn.read_response())
    assert len(upstream.requests_to(EVIL_IP)) == before
    assert replies[0].status in (200, 400), replies[0]
    assert all(r.status in (400, 403) for r in replies[1:]), replies


def test_conflicting_content_lengths_are_400(gateway: Gateway, upstream: Upstream) -> None:
    """Two different Content-Length values are a 400, not forwarded."""
    before = len(upstream.requests_to(ALLOWED_IP))
    reply = raw(
        gateway,
        f"POST http://allowed.test:{HTTP_PORT}/cl HTTP/1.1\nHost: allowed.test\n"
        "Content-Length: 3\nContent-Length: 5",
    )
    assert reply.status == 400, reply
    assert len(upstream.requests_to(ALLOWED_IP)) == before


def test_client_that_stops_reading_does_not_stall_others(gateway: Gateway) -> None:
    """A client that asks for 32 MB and reads nothing neither delays others nor fills memory."""
    big = f"GET http://allowed.test:{HTTP_PORT}/big?size={STUCK_BODY} HTTP/1.1\r\nHost: a\r\n\r\n"
    rss_before = gateway.rss_bytes()
    with RawConnection(gateway.proxy_host, gateway.proxy_port, source=PAYMENTS) as stuck:
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.send(big.encode())
        time.sleep(1.0)
        result = via(gateway, f"http://allowed.test:{HTTP_PORT}/", timeout=SLOW_CLIENT_WAIT)
        assert result.status == 200, result.error
        # Backpressure: the gateway stops reading the upstream instead of buffering the body.
        assert gateway.rss_bytes() - rss_before < STUCK_BODY // 2


def test_slow_upstream_does_not_stall_others(gateway: Gateway) -> None:
    """While one request waits 2 s for its upstream, other clients are answered at once."""
    slow_url = f"http://allowed.test:{HTTP_PORT}/slow?delay=2"
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(via, gateway, slow_url)
        time.sleep(0.2)
        started = time.monotonic()
        fast = via(gateway, f"http://allowed.test:{HTTP_PORT}/fast")
        fast_time = time.monotonic() - started
        assert slow.result().status == 200
    assert fast.status == 200 and fast_time < 1.0


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory,
    dns: Dnsmasq,
    upstream: Upstream,
    curl_installed: None,
) -> Iterator[Gateway]:
    """A gateway with tiny limits: 3 client connections, 1 s head and idle timeouts."""
    limits = {
        "max_connections": MAX_CONNECTIONS,
        "head_timeout": SHORT_TIMEOUT,
        "idle_timeout": SHORT_TIMEOUT,
    }
    path = write_config(
        tmp_path_factory.mktemp("gw-limits"),
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={"proxy": limits},
    )
    with Gateway(path) as gw:
        yield gw


def test_connection_limit_is_503(limited: Gateway) -> None:
    """Past proxy.max_connections a new client gets 503 at once."""
    with contextlib.ExitStack() as stack:
        for _ in range(MAX_CONNECTIONS):
            # A first byte, so the gateway holds each as a client with a request under way.
            conn = stack.enter_context(RawConnection(limited.proxy_host, limited.proxy_port))
            conn.send(PARTIAL_REQUEST)
        time.sleep(0.2)
        over, _ = raw_request(limited.proxy_host, limited.proxy_port, PARTIAL_REQUEST)
    # The gateway may accept a new client before it has read the EOFs of these: give it a moment.
    time.sleep(CLOSE_SETTLE)
    assert over.status == 503, over


def test_head_timeout_is_408(limited: Gateway) -> None:
    """A client that sends no whole request head within proxy.head_timeout gets 408, closed."""
    started = time.monotonic()
    with RawConnection(limited.proxy_host, limited.proxy_port, timeout=LIMIT_WAIT) as idle:
        idle.send(PARTIAL_REQUEST)
        reply = idle.read_response()
        rest = idle.read_until_closed()
    assert reply.status == 408, reply
    assert rest == b"" and time.monotonic() - started < LIMIT_WAIT


def test_idle_tunnel_closed_at_idle_timeout(limited: Gateway) -> None:
    """A CONNECT tunnel with no traffic is closed at proxy.idle_timeout; its end event says so."""
    authority = f"www.allowed.test:{HTTPS_PORT}"
    with RawConnection(
        limited.proxy_host, limited.proxy_port, source=PAYMENTS, timeout=LIMIT_WAIT
    ) as tunnel:
        reply = tunnel.request(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode(),
            head_only=True,
        )
        assert reply.status == 200, reply
        started = time.monotonic()
        assert tunnel.read_until_closed() == b""
        assert tunnel.closed_by_peer and time.monotonic() - started < LIMIT_WAIT
        port = tunnel.local_port
    end = end_of(limited.flow_events(PAYMENTS, port, ended=True))
    assert "idle" in str(field(end, "event.reason")), end


@pytest.fixture(scope="module")
def scripted_gateway(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream, curl_installed: None
) -> Iterator[tuple[Gateway, ScriptedDns]]:
    """The narrow-guard gateway resolving through a DNS server whose answers change per query."""
    answers = {
        "rebind.allowed.test": [ALLOWED_IP, GUARDED_IP],
        "cached.allowed.test": [ALLOWED_IP, GUARDED_IP],
    }
    with ScriptedDns(answers, ttls={"cached.allowed.test": CACHED_TTL}) as server:
        path = write_config(
            tmp_path_factory.mktemp("gw-scripted-dns"),
            CONTRACT_DIR,
            nameserver=server.nameserver,
            overrides={"guard": {"allow": GUARD_ALLOW}},
        )
        with Gateway(path) as gw:
            yield gw, server


def test_dns_rebinding_is_checked_on_every_resolution(
    scripted_gateway: tuple[Gateway, ScriptedDns], upstream: Upstream
) -> None:
    """A TTL-0 name that first answers 127.0.0.30, then 127.0.0.99, is refused the second time."""
    gw, server = scripted_gateway
    url = f"http://rebind.allowed.test:{HTTP_PORT}/"
    first = via(gw, url)
    assert first.status == 200 and first.json()["server_host"] == ALLOWED_IP
    second = via(gw, url)
    assert second.status == 403 and second.reason.startswith("guard:"), second.reason
    assert server.count("rebind.allowed.test") >= 2


def test_resolver_cache_keeps_an_answer_for_its_ttl(
    scripted_gateway: tuple[Gateway, ScriptedDns],
) -> None:
    """A name with TTL 30 is resolved once: later flows reuse the checked answer."""
    gw, server = scripted_gateway
    url = f"http://cached.allowed.test:{HTTP_PORT}/"
    statuses = [via(gw, url).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert server.count("cached.allowed.test") == 1
