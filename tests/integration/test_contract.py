"""The contract configuration end to end: real curl through `egressgw run` to echo upstreams.

Covers allow, deny, default deny, audit (would_deny), pass, threat-feed denies
(by name, by resolved IP, through a CNAME), HTTP forwarding details and the ECS
events of each flow. One gateway serves the whole module.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    BlackHole,
    CurlResult,
    Dnsmasq,
    Gateway,
    RawConnection,
    TlsFiles,
    Upstream,
    curl,
    decision_of,
    end_of,
    field,
    header_names,
    header_value,
    write_config,
)

from .testbed import (
    ALLOWED_IP,
    BATCH,
    CONTRACT_DIR,
    EVIL_IP,
    FEED_IP,
    HTTP_PORT,
    HTTPS_PORT,
    PARTNER_IP,
    PAYMENTS,
    STORAGE_IP,
    STORAGE_PORT,
    UNKNOWN,
)

pytestmark = pytest.mark.integration

SHUTDOWN_TIMEOUT = 8.0
DRAIN_TIMEOUT = "2s"
STOP_ACCEPTING_WITHIN = 0.5
CONNECT_TIMEOUT = "1s"
CONCURRENT_CLIENTS = 16
EXPECT_WAIT = 5.0
EVENT_FLUSH_LIMIT = 1.0


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    dns: Dnsmasq,
    upstream: Upstream,
    curl_installed: None,
) -> Iterator[Gateway]:
    """The gateway on the contract config (test ports and DNS, a file sink, 1 s connect timeout)."""
    path = write_config(
        tmp_path_factory.mktemp("gw-contract"),
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={"proxy": {"connect_timeout": CONNECT_TIMEOUT}},
    )
    with Gateway(path) as gw:
        yield gw


def via(gw: Gateway, source: str, url: str, **kwargs: Any) -> CurlResult:
    """Run curl through the gateway from `source`."""
    return curl(url, proxy=gw.proxy_url, interface=source, **kwargs)


def flow(gw: Gateway, result: CurlResult, *, ended: bool = False) -> list[dict[str, Any]]:
    """Return the events of the flow curl made (found by its source address and port)."""
    return gw.flow_events(result.local_ip, result.local_port, ended=ended)


def assert_denied(result: CurlResult, *needles: str) -> None:
    """Assert a 403 from the gateway whose reason names every needle."""
    assert result.status == 403, (result.status, result.error, result.heads)
    for needle in needles:
        assert needle in result.reason, (needle, result.reason)


def test_payments_http_allowed_by_platform_rule(gateway: Gateway, upstream: Upstream) -> None:
    """payments -> http://allowed.test:8080 is allowed by platform/payments-to-psp and relayed."""
    result = via(gateway, PAYMENTS, f"http://allowed.test:{HTTP_PORT}/pay?x=1")
    assert result.status == 200, (result.reason, result.error)
    echo = result.json()
    assert (echo["server_host"], echo["method"], echo["target"]) == (ALLOWED_IP, "GET", "/pay?x=1")
    assert echo["host"] == f"allowed.test:{HTTP_PORT}"
    assert header_value(echo, "via") is not None
    assert "proxy-connection" not in header_names(echo)


def test_allowed_http_flow_events(gateway: Gateway) -> None:
    """An allowed HTTP flow writes a decision and an end event with the same flow.id."""
    result = via(gateway, PAYMENTS, f"http://allowed.test:{HTTP_PORT}/events")
    assert result.status == 200
    events = flow(gateway, result, ended=True)
    decision, end = decision_of(events), end_of(events)
    expected = {
        "event.kind": "event",
        "event.category": ["network"],
        "event.action": "connection_allowed",
        "event.outcome": "success",
        "source.ip": PAYMENTS,
        "source.port": result.local_port,
        "kubernetes.namespace": "payments",
        "kubernetes.pod.name": "api-5d8f7c-x2k4q",
        "kubernetes.labels.app": "api",
        "kubernetes.labels.team": "payments",
        "destination.domain": "allowed.test",
        "destination.ip": ALLOWED_IP,
        "destination.port": HTTP_PORT,
        "network.protocol": "http",
        "rule.name": "payments-to-psp",
        "rule.ruleset": "platform",
        "http.request.method": "GET",
    }
    assert {k: field(decision, k) for k in expected} == expected
    assert f"allowed.test:{HTTP_PORT}/events" in str(field(decision, "url.full"))
    assert field(decision, "flow.id") == field(end, "flow.id")
    assert field(end, "source.bytes") > 0 and field(end, "destination.bytes") > 0
    assert field(end, "event.duration") >= 0


def test_payments_https_through_connect_allowed(
    gateway: Gateway, upstream: Upstream, pki: TlsFiles
) -> None:
    """payments -> https://www.allowed.test:8443 tunnels through CONNECT; a tls flow is logged."""
    result = via(gateway, PAYMENTS, f"https://www.allowed.test:{HTTPS_PORT}/", cacert=pki.ca_cert)
    assert (result.connect_status, result.status) == (200, 200), (result.error, result.heads)
    echo = result.json()
    assert echo["tls"] is True and echo["server_host"] == ALLOWED_IP
    assert echo["host"] == f"www.allowed.test:{HTTPS_PORT}"
    decision = decision_of(flow(gateway, result))
    assert field(decision, "event.action") == "connection_allowed"
    assert field(decision, "network.protocol") == "tls"
    assert field(decision, "destination.domain") == "www.allowed.test"
    assert field(decision, "tls.client.server_name") == "www.allowed.test"
    assert (field(decision, "rule.ruleset"), field(decision, "rule.name")) == (
        "platform",
        "payments-to-psp",
    )


def test_plain_http_inside_a_tunnel_is_a_tcp_flow(gateway: Gateway) -> None:
    """CONNECT then plain HTTP (no ClientHello) is relayed and logged as network.protocol tcp."""
    result = via(gateway, PAYMENTS, f"http://allowed.test:{HTTP_PORT}/inside", tunnel=True)
    assert (result.connect_status, result.status) == (200, 200), result
    assert result.json()["path"] == "/inside"
    decision = decision_of(flow(gateway, result))
    assert field(decision, "network.protocol") == "tcp"
    assert field(decision, "event.action") == "connection_allowed"


def test_bytes_sent_with_the_connect_reach_the_destination(gateway: Gateway) -> None:
    """Tunnel bytes sent together with CONNECT (before its 200) are relayed, not lost."""
    authority = f"allowed.test:{HTTP_PORT}"
    with RawConnection(gateway.proxy_host, gateway.proxy_port, source=PAYMENTS) as conn:
        conn.send(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
            "GET /early HTTP/1.1\r\nHost: early\r\n\r\n".encode()
        )
        established = conn.read_response(head_only=True)
        inner = conn.read_response()
    assert (established.status, inner.status) == (200, 200)
    assert b'"/early"' in inner.body


@pytest.mark.parametrize("tunnel", [False, True], ids=["http", "connect"])
def test_payments_other_port_denied_by_default(gateway: Gateway, tunnel: bool) -> None:
    """payments -> allowed.test:9999 matches no rule and is denied by the default."""
    result = via(gateway, PAYMENTS, "http://allowed.test:9999/", tunnel=tunnel)
    assert_denied(result, "default")
    decision = decision_of(flow(gateway, result))
    assert field(decision, "event.action") == "connection_denied"
    assert field(decision, "event.outcome") == "failure"


def test_decision_event_reaches_the_file_within_a_second(gateway: Gateway) -> None:
    """The decision event of a flow is in the events file well within a second of the answer."""
    result = via(gateway, PAYMENTS, "http://allowed.test:9998/")
    answered = time.monotonic()
    assert result.status == 403
    gateway.flow_events(PAYMENTS, result.local_port, timeout=EVENT_FLUSH_LIMIT)
    assert time.monotonic() - answered < EVENT_FLUSH_LIMIT


def test_unknown_source_denied_by_default(gateway: Gateway, upstream: Upstream) -> None:
    """A source that is no known workload (127.0.0.1) gets the default deny."""
    before = len(upstream.requests_to(ALLOWED_IP, HTTP_PORT))
    result = via(gateway, UNKNOWN, f"http://allowed.test:{HTTP_PORT}/")
    assert_denied(result, "default")
    assert len(upstream.requests_to(ALLOWED_IP, HTTP_PORT)) == before
    decision = decision_of(flow(gateway, result))
    assert field(decision, "event.action") == "connection_denied"
    assert field(decision, "kubernetes.namespace") in (None, "", "unknown")


def test_batch_partner_allowed_with_audit_would_deny(gateway: Gateway, pki: TlsFiles) -> None:
    """batch -> api.partner.test is allowed (partner-for-all) and logged would_deny by the audit."""
    result = via(gateway, BATCH, f"https://api.partner.test:{HTTPS_PORT}/", cacert=pki.ca_cert)
    assert result.status == 200, (result.error, result.heads)
    assert result.json()["server_host"] == PARTNER_IP
    decision = decision_of(flow(gateway, result))
    assert field(decision, "event.action") == "would_deny"
    assert field(decision, "event.outcome") == "success"
    assert "security/batch-audit-partner" in str(field(decision, "event.reason"))
    assert "partner-for-all" in f"{field(decision, 'rule.name')} {field(decision, 'event.reason')}"


def test_batch_storage_allowed_after_pass(gateway: Gateway) -> None:
    """batch -> 127.0.0.20:9000 passes the platform tier and is allowed by apps/batch-to-storage."""
    result = via(gateway, BATCH, f"http://{STORAGE_IP}:{STORAGE_PORT}/report")
    assert result.status == 200, result.reason
    assert result.json()["server_host"] == STORAGE_IP
    decision = decision_of(flow(gateway, result))
    assert (field(decision, "rule.ruleset"), field(decision, "rule.name")) == (
        "apps",
        "batch-to-storage",
    )


def test_batch_denied_by_default_after_pass(gateway: Gateway) -> None:
    """batch -> allowed.test passes the platform tier, matches nothing in apps: default deny."""
    result = via(gateway, BATCH, f"http://allowed.test:{HTTP_PORT}/")
    assert_denied(result, "default")


@pytest.mark.parametrize("name", ["evil.test", "sub.evil.test"])
@pytest.mark.parametrize("tunnel", [False, True], ids=["http", "connect"])
def test_feed_domain_denied(gateway: Gateway, upstream: Upstream, name: str, tunnel: bool) -> None:
    """A name (or subdomain) in the local-domains feed is denied by security/block-threat-feeds."""
    before = len(upstream.requests_to(EVIL_IP))
    result = via(gateway, PAYMENTS, f"http://{name}:{HTTP_PORT}/", tunnel=tunnel)
    assert_denied(result, "security/block-threat-feeds", "local-domains")
    if tunnel:
        assert result.connect_status == 403
    assert len(upstream.requests_to(EVIL_IP)) == before
    decision = decision_of(flow(gateway, result))
    assert field(decision, "event.action") == "connection_denied"
    assert (field(decision, "rule.ruleset"), field(decision, "rule.name")) == (
        "security",
        "block-threat-feeds",
    )
    # A threat-feed deny is an ECS alert (a detection fired), not a plain event.
    assert field(decision, "event.kind") == "alert"
    assert isinstance(field(decision, "threat"), dict) and field(decision, "threat")
    assert "local-domains" in str(field(decision, "threat"))


def test_name_resolving_to_feed_ip_denied(gateway: Gateway, upstream: Upstream) -> None:
    """badip.allowed.test resolves to 127.0.0.66 from the local-ips feed: denied, not relayed."""
    result = via(gateway, PAYMENTS, f"http://badip.allowed.test:{HTTP_PORT}/")
    assert_denied(result, "security/block-threat-feeds", "local-ips")
    assert upstream.requests_to(FEED_IP) == []


def test_cname_to_feed_domain_denied(gateway: Gateway, upstream: Upstream) -> None:
    """cname.allowed.test is a CNAME to evil.test (feed-listed): the chain is checked, denied."""
    before = len(upstream.requests_to(EVIL_IP))
    result = via(gateway, PAYMENTS, f"http://cname.allowed.test:{HTTP_PORT}/")
    assert_denied(result, "security/block-threat-feeds", "local-domains")
    assert len(upstream.requests_to(EVIL_IP)) == before


def test_hop_by_hop_headers_removed(gateway: Gateway) -> None:
    """Connection, the headers it names, Keep-Alive and Proxy-* are not forwarded; Via is added."""
    result = via(
        gateway,
        PAYMENTS,
        f"http://allowed.test:{HTTP_PORT}/hop",
        headers={
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-End-To-End": "kept",
        },
    )
    assert result.status == 200
    echo = result.json()
    names = header_names(echo)
    assert not names & {"x-hop", "keep-alive", "proxy-authorization", "proxy-connection"}
    assert header_value(echo, "x-end-to-end") == "kept"
    assert "egressgw" in str(header_value(echo, "via"))


def test_chunked_request_body_forwarded(gateway: Gateway) -> None:
    """A chunked POST body reaches the upstream whole."""
    body = b"0123456789" * 5000
    result = via(
        gateway,
        PAYMENTS,
        f"http://allowed.test:{HTTP_PORT}/upload",
        method="POST",
        headers={"Transfer-Encoding": "chunked"},
        data=body,
    )
    assert result.status == 200
    assert result.json()["body_length"] == len(body)


def test_expect_100_continue_forwarded(gateway: Gateway) -> None:
    """Expect: 100-continue gets its 100 at once (curl would wait 5 s) and the body arrives."""
    body = b"y" * 200_000
    started = time.monotonic()
    result = via(
        gateway,
        PAYMENTS,
        f"http://allowed.test:{HTTP_PORT}/expect",
        method="POST",
        headers={"Expect": "100-continue"},
        data=body,
        extra=["--expect100-timeout", str(EXPECT_WAIT)],
    )
    assert result.status == 200
    assert result.json()["body_length"] == len(body)
    assert time.monotonic() - started < EXPECT_WAIT / 2


def test_expect_100_continue_to_a_denied_host_gets_403_at_once(gateway: Gateway) -> None:
    """A denied POST with Expect: 100-continue is answered 403 without waiting for the body."""
    started = time.monotonic()
    result = via(
        gateway,
        PAYMENTS,
        f"http://evil.test:{HTTP_PORT}/expect",
        method="POST",
        headers={"Expect": "100-continue"},
        data=b"z" * 200_000,
        extra=["--expect100-timeout", str(EXPECT_WAIT)],
    )
    assert_denied(result, "local-domains")
    assert time.monotonic() - started < EXPECT_WAIT / 2


def test_keep_alive_serves_two_requests(gateway: Gateway) -> None:
    """Two requests on one client connection are both answered, each logged as its own flow."""
    with RawConnection(gateway.proxy_host, gateway.proxy_port, source=PAYMENTS) as conn:
        target = f"http://allowed.test:{HTTP_PORT}"
        host = f"allowed.test:{HTTP_PORT}"
        first = conn.request(f"GET {target}/one HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        second = conn.request(f"GET {target}/two HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        port = conn.local_port
    assert (first.status, second.status) == (200, 200)
    assert b'"/one"' in first.body and b'"/two"' in second.body
    # Each request is a flow of its own: two decisions, two ends, two flow ids.
    events = gateway.wait_events(lambda e: field(e, "source.port") == port, count=4)
    flows: dict[str, list[str]] = {field(e, "flow.id"): [] for e in events}
    for e in events:
        flows[field(e, "flow.id")].append(field(e, "event.action"))
    assert sorted(flows.values()) == [["connection_allowed", "connection_ended"]] * 2


def test_response_hop_by_hop_headers_removed(gateway: Gateway) -> None:
    """Hop-by-hop headers of the upstream's response (and those Connection names) are dropped."""
    result = via(gateway, PAYMENTS, f"http://allowed.test:{HTTP_PORT}/r?hop=1")
    assert result.status == 200
    assert "x-upstream-hop" not in result.headers and "keep-alive" not in result.headers
    assert result.headers.get("x-upstream-end") == "kept"


def test_large_chunked_response_relayed(gateway: Gateway) -> None:
    """A 3 MB chunked upstream response reaches the client whole."""
    size = 3_000_000
    result = via(gateway, PAYMENTS, f"http://allowed.test:{HTTP_PORT}/big?chunked=1&size={size}")
    assert result.status == 200
    assert len(result.json()["padding"]) == size


def test_large_response_through_tunnel_counts_bytes(gateway: Gateway, pki: TlsFiles) -> None:
    """A 4 MB body through a CONNECT tunnel arrives whole; the end event counts the bytes."""
    size = 4_000_000
    url = f"https://www.allowed.test:{HTTPS_PORT}/big?size={size}"
    result = via(gateway, PAYMENTS, url, cacert=pki.ca_cert)
    assert result.status == 200
    assert len(result.json()["padding"]) == size
    end = end_of(flow(gateway, result, ended=True))
    assert field(end, "destination.bytes") > size
    assert field(end, "source.bytes") > 0


def test_concurrent_clients_all_served(gateway: Gateway, pki: TlsFiles) -> None:
    """Sixteen clients at once, HTTP and CONNECT mixed, are all served."""
    urls = [
        f"http://allowed.test:{HTTP_PORT}/c{i}"
        if i % 2
        else f"https://www.allowed.test:{HTTPS_PORT}/c{i}"
        for i in range(CONCURRENT_CLIENTS)
    ]
    with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
        results = list(pool.map(lambda u: via(gateway, PAYMENTS, u, cacert=pki.ca_cert), urls))
    assert [r.status for r in results] == [200] * CONCURRENT_CLIENTS
    assert [r.json()["path"] for r in results] == [f"/c{i}" for i in range(CONCURRENT_CLIENTS)]


def test_events_have_unique_ids_and_ecs_basics(gateway: Gateway) -> None:
    """Every event in the sink has a unique event.id, @timestamp, ECS version and observer."""
    result = via(gateway, PAYMENTS, f"http://allowed.test:{HTTP_PORT}/ids")
    assert result.status == 200
    flow(gateway, result, ended=True)
    events = gateway.events()
    ids = [field(e, "event.id") for e in events]
    assert None not in ids and len(set(ids)) == len(ids)
    for event in events:
        assert field(event, "@timestamp") and field(event, "ecs.version")
        assert field(event, "observer") and field(event, "network.transport") == "tcp"


def test_pipelined_requests_answered_in_order(gateway: Gateway) -> None:
    """Two requests sent back to back before any answer get their responses in order."""
    target = f"http://allowed.test:{HTTP_PORT}"
    with RawConnection(gateway.proxy_host, gateway.proxy_port, source=PAYMENTS) as conn:
        conn.send(
            f"GET {target}/one HTTP/1.1\r\nHost: a\r\n\r\n"
            f"GET {target}/two HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        )
        first, second = conn.read_response(), conn.read_response()
    assert (first.status, second.status) == (200, 200)
    assert b'"/one"' in first.body and b'"/two"' in second.body


@pytest.mark.parametrize("method_or_status", ["HEAD", "204", "304", "500"])
def test_bodyless_and_error_responses_keep_the_connection_usable(
    gateway: Gateway, method_or_status: str
) -> None:
    """After a HEAD, 204, 304 or 500 the next request on the same connection is served."""
    target = f"http://allowed.test:{HTTP_PORT}"
    head = method_or_status == "HEAD"
    first_line = f"HEAD {target}/h" if head else f"GET {target}/s?status={method_or_status}"
    with RawConnection(gateway.proxy_host, gateway.proxy_port, source=PAYMENTS) as conn:
        first = conn.request(f"{first_line} HTTP/1.1\r\nHost: a\r\n\r\n".encode(), head_only=head)
        second = conn.request(f"GET {target}/next HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    assert first.status == (200 if head else int(method_or_status))
    assert second.status == 200 and b'"/next"' in second.body


def test_upstream_unreachable_is_502(gateway: Gateway) -> None:
    """An allowed destination where nothing listens (127.0.0.99:8080) answers 502."""
    result = via(gateway, PAYMENTS, f"http://internal.allowed.test:{HTTP_PORT}/")
    assert result.status == 502, (result.reason, result.heads)


@pytest.mark.parametrize("tunnel", [False, True], ids=["http", "connect"])
def test_upstream_connect_timeout_is_504(
    gateway: Gateway, blackhole: BlackHole, pki: TlsFiles, tunnel: bool
) -> None:
    """An allowed destination that never accepts answers 504 after proxy.connect_timeout."""
    result = via(gateway, BATCH, f"http://slow.partner.test:{HTTPS_PORT}/", tunnel=tunnel)
    assert result.status == 504, (result.status, result.error, result.heads)


def test_admin_health_endpoints(gateway: Gateway) -> None:
    """/healthz and /readyz answer 200 on the admin listener."""
    for path in ("/healthz", "/readyz"):
        assert curl(f"{gateway.admin_url}{path}").status == 200


def test_sigterm_exits_zero_and_flushes_every_event(
    tmp_path: Path, dns: Dnsmasq, upstream: Upstream, pki: TlsFiles, curl_installed: None
) -> None:
    """SIGTERM: stop accepting, drain the open tunnel, exit 0; every flow's events are written."""
    path = write_config(
        tmp_path,
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={"proxy": {"drain_timeout": DRAIN_TIMEOUT}},
    )
    with Gateway(path) as gw:
        allowed = via(gw, PAYMENTS, f"http://allowed.test:{HTTP_PORT}/")
        denied = via(gw, PAYMENTS, f"http://evil.test:{HTTP_PORT}/")
        assert (allowed.status, denied.status) == (200, 403)
        with RawConnection(gw.proxy_host, gw.proxy_port, source=PAYMENTS) as tunnel:
            connect = f"CONNECT www.allowed.test:{HTTPS_PORT} HTTP/1.1\r\n"
            reply = tunnel.request(
                f"{connect}Host: www.allowed.test:{HTTPS_PORT}\r\n\r\n".encode(), head_only=True
            )
            assert reply.status == 200
            tunnel_port = tunnel.local_port
            started = time.monotonic()
            gw.signal(signal.SIGTERM)
            time.sleep(STOP_ACCEPTING_WITHIN)
            # Draining: the open tunnel keeps the process alive, but new clients are refused.
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((gw.proxy_host, gw.proxy_port), timeout=1).close()
            code = gw.wait(SHUTDOWN_TIMEOUT)
            elapsed = time.monotonic() - started
        assert code == 0, gw.logs()
        assert STOP_ACCEPTING_WITHIN < elapsed < SHUTDOWN_TIMEOUT
        by_port = {
            port: [e for e in gw.events() if field(e, "source.port") == port]
            for port in (allowed.local_port, denied.local_port, tunnel_port)
        }
        flows = {port: {field(e, "flow.id") for e in events} for port, events in by_port.items()}
        assert all(len(ids) == 1 for ids in flows.values()), flows
        ended = {
            port
            for port, ids in flows.items()
            for e in gw.events()
            if field(e, "flow.id") in ids and field(e, "event.action") == "connection_ended"
        }
        assert ended == {allowed.local_port, tunnel_port}
