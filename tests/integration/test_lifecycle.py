"""The gateway in a cluster's life cycle, with the real process: readiness without feed data,
feed state seeded from a snapshot, and a SIGTERM that refuses no client during the delay.

A feed "without internet" is an http:// URL on a loopback port where nothing listens: every
fetch fails at once with a refused connection.
"""

from __future__ import annotations

import http.server
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import Dnsmasq, Gateway, RawConnection, Upstream, write_config
from tests.support.gateway import egressgw_executable, load_yaml
from tests.support.net import free_port

from .testbed import CONTRACT_DIR, HTTP_PORT, PAYMENTS

FEEDS_TIMEOUT = 2.0
SHUTDOWN_DELAY = 3.0
# Connections made this close to the end of the delay may meet the closing listener.
DELAY_MARGIN = 0.5
CONNECT_INTERVAL = 0.02
# How a client meets a closed listener (a reset: queued in its backlog as it closed).
# Once the delay is over: refused by the closed listener, reset from its accept queue, or (a
# connection completed as the listener closed, on a loaded machine) closed without an answer.
CLOSED_LISTENER = {"ConnectionRefusedError", "ConnectionResetError", "ConnectionError"}
ALLOWED_REQUEST = (
    f"GET http://allowed.test:{HTTP_PORT}/ HTTP/1.1\r\n"
    f"Host: allowed.test:{HTTP_PORT}\r\nConnection: close\r\n\r\n"
).encode()
LISTED_REQUEST = (
    f"GET http://www.allowed.test:{HTTP_PORT}/ HTTP/1.1\r\n"
    f"Host: www.allowed.test:{HTTP_PORT}\r\nConnection: close\r\n\r\n"
).encode()


@contextmanager
def launched(path: Path) -> Iterator[Gateway]:
    """A gateway started without waiting for readiness, stopped at the end."""
    gw = Gateway(path)
    try:
        yield gw.launch()
    finally:
        gw.stop()


def admin_get(gw: Gateway, path: str) -> tuple[int, str]:
    """GET an admin page directly (never proxied); return status and body."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{gw.admin_url}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def contract_feeds() -> list[dict[str, Any]]:
    """The contract configuration's feed entries."""
    feeds: list[dict[str, Any]] = load_yaml(CONTRACT_DIR / "egressgw.yaml")["feeds"]
    return feeds


def remote_feed(url: str, **keys: Any) -> dict[str, Any]:
    """A remote `lines` feed named `remote`."""
    return {"name": "remote", "url": url, "format": "lines", **keys}


def unreachable_url() -> str:
    """An http:// URL where nothing listens: the fetch is refused, as without internet."""
    return f"http://127.0.0.1:{free_port()}/blocklist.txt"


def test_unreachable_feed_ready_after_timeout_with_reason(tmp_path: Path, dns: Dnsmasq) -> None:
    """A new gateway whose feed cannot be fetched is 503 naming the feed, then ready after
    readiness.feeds_timeout with the feed named in /readyz and the metric."""
    path = write_config(
        tmp_path,
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={
            "feeds": [*contract_feeds(), remote_feed(unreachable_url(), retries=0)],
            "readiness": {"feeds_timeout": f"{FEEDS_TIMEOUT}s"},
        },
    )
    with launched(path) as gw:
        began = time.monotonic()
        # The local feeds load at once; the remote one's first fetch fails, and says why.
        while "feeds without data: remote (" not in (body := admin_get(gw, "/readyz")[1]):
            assert time.monotonic() - began < FEEDS_TIMEOUT, body
            time.sleep(0.05)
        assert admin_get(gw, "/readyz")[0] == 503
        assert "ready without them in" in body, body
        while (status := admin_get(gw, "/readyz")[0]) != 200:
            assert time.monotonic() - began < FEEDS_TIMEOUT + 5, gw.logs()
            time.sleep(0.05)
        assert time.monotonic() - began >= FEEDS_TIMEOUT - 0.5
        status, body = admin_get(gw, "/readyz")
        assert status == 200
        assert body.startswith("ready: serving without data of feeds remote ("), body
        assert body.endswith(f"), none after {FEEDS_TIMEOUT:g}s\n"), body
        metrics = admin_get(gw, "/metrics")[1]
        assert 'egressgw_ready_without_feed_data{feed="remote"} 1.0' in metrics
        assert "egressgw_ready 1.0" in metrics
        assert "feeds_ready 0.0" in metrics


def test_required_feed_keeps_gateway_unready(tmp_path: Path, dns: Dnsmasq) -> None:
    """A `required` feed that cannot be fetched keeps /readyz 503 past the timeout, naming it."""
    path = write_config(
        tmp_path,
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={
            "feeds": [*contract_feeds(), remote_feed(unreachable_url(), required=True)],
            "readiness": {"feeds_timeout": "1s"},
        },
    )
    with launched(path) as gw:
        time.sleep(1.5)
        status, body = admin_get(gw, "/readyz")
        assert status == 503, body
        assert body.startswith("not ready: required feeds without data: remote"), body
        assert "egressgw_ready 0.0" in admin_get(gw, "/metrics")[1]


class _ListHandler(http.server.BaseHTTPRequestHandler):
    """Serves a one-line blocklist naming www.allowed.test."""

    def do_GET(self) -> None:
        """Answer the blocklist."""
        body = b"www.allowed.test\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def list_server() -> Iterator[http.server.ThreadingHTTPServer]:
    """A local HTTP server of a blocklist, stopped by the test (or at its end)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ListHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_seeded_feed_ready_at_once_and_enforced(
    tmp_path: Path,
    dns: Dnsmasq,
    upstream: Upstream,
    list_server: http.server.ThreadingHTTPServer,
) -> None:
    """State made by `egressgw feeds update` elsewhere and given as state_seed_dir makes a new
    gateway ready at once while its feed is unreachable, and the seeded feed denies."""
    url = f"http://127.0.0.1:{list_server.server_address[1]}/blocklist.txt"
    # Where the snapshot is made: a machine that can reach the feed.
    maker = write_config(
        tmp_path / "maker",
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={"feeds": [*contract_feeds(), remote_feed(url)]},
    )
    update = subprocess.run(
        [str(egressgw_executable()), "feeds", "update", "remote", "--config", str(maker)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert update.returncode == 0, update.stdout + update.stderr
    seed = tmp_path / "seed"
    shutil.copytree(tmp_path / "maker" / "state" / "feeds", seed / "feeds")
    list_server.shutdown()
    list_server.server_close()  # the feed is unreachable from now on
    path = write_config(
        tmp_path / "pod",
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={
            "feeds": [*contract_feeds(), remote_feed(url)],
            "readiness": {"feeds_timeout": "1h"},
            "state_seed_dir": str(seed),
        },
    )
    with Gateway(path) as gw:
        assert admin_get(gw, "/readyz") == (200, "ready\n")
        with RawConnection(gw.proxy_host, gw.proxy_port, source=PAYMENTS) as conn:
            reply = conn.request(LISTED_REQUEST)
        assert reply.status == 403
        assert "listed by feed remote" in reply.reason, reply.reason
    assert (tmp_path / "pod" / "state" / "feeds" / "remote.body").read_bytes() == (
        seed / "feeds" / "remote.body"
    ).read_bytes()


@dataclass(frozen=True)
class Attempt:
    """One client connection during the shutdown: when it started and how it ended."""

    started: float
    outcome: str  # "200", another status, or the exception's class name


def connect_continuously(gw: Gateway, stop: threading.Event, attempts: list[Attempt]) -> None:
    """Make one proxied request after another on fresh connections until `stop` is set."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            with RawConnection(gw.proxy_host, gw.proxy_port, source=PAYMENTS, timeout=5) as conn:
                outcome = str(conn.request(ALLOWED_REQUEST).status)
        except OSError as e:
            outcome = type(e).__name__
        attempts.append(Attempt(started, outcome))
        time.sleep(CONNECT_INTERVAL)


def test_sigterm_refuses_no_connection_during_shutdown_delay(
    tmp_path: Path, dns: Dnsmasq, upstream: Upstream
) -> None:
    """After SIGTERM /readyz is 503 at once while every connection made in the shutdown delay
    is served; after it the listener closes and the process exits 0."""
    path = write_config(
        tmp_path,
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={"proxy": {"shutdown_delay": f"{SHUTDOWN_DELAY}s", "drain_timeout": "2s"}},
    )
    attempts: list[Attempt] = []
    stop = threading.Event()
    with Gateway(path) as gw:
        client = threading.Thread(target=connect_continuously, args=(gw, stop, attempts))
        client.start()
        try:
            time.sleep(0.3)
            sigterm = time.monotonic()
            gw.signal(signal.SIGTERM)
            time.sleep(0.2)
            status, body = admin_get(gw, "/readyz")
            assert (status, body) == (503, "not ready: shutting down\n")
            code = gw.wait(SHUTDOWN_DELAY + 10)
            exited = time.monotonic()
            time.sleep(0.2)  # a few attempts after the exit, refused
        finally:
            stop.set()
            client.join()
    assert code == 0, gw.logs()
    assert exited - sigterm >= SHUTDOWN_DELAY
    during = [a for a in attempts if sigterm <= a.started < sigterm + SHUTDOWN_DELAY - DELAY_MARGIN]
    assert len(during) >= 20, attempts
    assert {a.outcome for a in during} == {"200"}, [a for a in during if a.outcome != "200"]
    failed = [a for a in attempts if a.started >= sigterm and a.outcome != "200"]
    # The listener did close: the test sees refusals, only once the delay is over.
    assert failed and {a.outcome for a in failed} <= CLOSED_LISTENER, failed
    assert failed[0].started >= sigterm + SHUTDOWN_DELAY - DELAY_MARGIN, failed[0]
