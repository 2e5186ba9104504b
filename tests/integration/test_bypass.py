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
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    CurlResult,
    Dnsmasq,
    Gateway,
    RawConnection,
    RawResponse,
    Upstream,
    curl,
    decision_of,
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
)

pytestmark = pytest.mark.integration

IDN_FEED = "idn-domains"
IDN_FEED_TEXT = "# IDN names are listed in punycode\nxn--bcher-kva.test\n"
GUARD_ALLOW = ["127.0.0.16/28", "127.0.0.30/31"]
GUARD_POLICY = f"""\
# Allows what only the destination guard may refuse.
tiers:
  - name: lab
    rules:
      - name: payments-to-guarded
        action: allow
        from: {{namespace: payments}}
        to: {{cidrs: ["{GUARDED_IP}/32"], ports: [{HTTP_PORT}, {HTTPS_PORT}]}}
"""
SLOW_CLIENT_WAIT = 3.0
MAX_CONNECTIONS = 3
HEAD_TIMEOUT = "1s"
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


def test_curl_uppercase_trailing_dot_denied(gateway: Gateway) -> None:
    """curl http://EVIL.TEST.:8080/ through the gateway is denied by the feed."""
    result = via(gateway, f"http://EVIL.TEST.:{HTTP_PORT}/")
    assert_feed_denied(result.status, result.reason, "local-domains")


def test_userinfo_does_not_change_the_destination(gateway: Gateway, upstream: Upstream) -> None:
    """GET http://allowed.test:8080@evil.test/ goes to (and is judged as) evil.test, or is 400."""
    before = len(upstream.requests_to(ALLOWED_IP)) + len(upstream.requests_to(EVIL_IP))
    reply = raw(
        gateway,
        f"GET http://allowed.test:{HTTP_PORT}@evil.test/ HTTP/1.1\nHost: allowed.test:{HTTP_PORT}",
    )
    assert reply.status in (400, 403), reply
    if reply.status == 403:
        assert "local-domains" in reply.reason, reply.reason
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
    ],
    ids=["name", "literal", "connect", "ipv4-mapped"],
)
def test_guard_refuses_loopback_outside_allow(guarded: Gateway, url: str, tunnel: bool) -> None:
    """A name resolving to, or a literal of, 127.0.0.99 (outside guard.allow) is refused: guard."""
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


def test_method_other_than_http_verbs_is_refused(gateway: Gateway) -> None:
    """An unknown method token is refused with 400 or 405, never relayed."""
    reply = raw(gateway, f"BREW http://allowed.test:{HTTP_PORT}/ HTTP/1.1\nHost: a")
    assert reply.status in (400, 405), reply


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


def test_connection_limit_and_head_timeout(
    tmp_path: Path, dns: Dnsmasq, upstream: Upstream, curl_installed: None
) -> None:
    """Past proxy.max_connections a client gets 503; an idle one gets 408 at proxy.head_timeout."""
    path = write_config(
        tmp_path,
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={"proxy": {"max_connections": MAX_CONNECTIONS, "head_timeout": HEAD_TIMEOUT}},
    )
    with Gateway(path) as gw, contextlib.ExitStack() as stack:
        idle = [
            stack.enter_context(RawConnection(gw.proxy_host, gw.proxy_port, timeout=5.0))
            for _ in range(MAX_CONNECTIONS)
        ]
        time.sleep(0.2)
        over, _ = raw_request(gw.proxy_host, gw.proxy_port, b"")
        assert over.status == 503, over
        started = time.monotonic()
        timed_out = idle[0].read_response()
        assert timed_out.status == 408, timed_out
        assert time.monotonic() - started < 5.0
