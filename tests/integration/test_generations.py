"""The running gateway never replays a verdict its inputs no longer give, and a reload keeps its
DNS cache: a feed refresh under a cached tunnel outcome, and query counts across reloads."""

from __future__ import annotations

import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import CurlResult, Gateway, ScriptedDns, Upstream, curl, write_config
from tests.support.gateway import dump_yaml, load_yaml

from .testbed import ALLOWED_IP, BATCH, CONTRACT_DIR, HTTP_PORT, PAYMENTS, STORAGE_IP, STORAGE_PORT

pytestmark = pytest.mark.integration

FEED_PERIOD = "1s"
UPDATE_TIMEOUT = 15.0
RELOAD_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
CACHED_NAME = "cached.allowed.test"
CACHED_TTL = 300


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """The value of one sample of the gateway's /metrics (0 when it is not there yet)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{gw.admin_url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if m and m[1] == name and ",".join(sorted(m[2].split(","))) == wanted:
            return float(m[3])
    return 0.0


def wait_metric_above(gw: Gateway, value: float, name: str, **labels: str) -> float:
    """Poll a metric until it exceeds `value`; fail with the gateway's logs otherwise."""
    deadline = time.monotonic() + UPDATE_TIMEOUT
    while (now := metric(gw, name, **labels)) <= value:
        assert time.monotonic() < deadline, f"{name}{labels} stayed at {now}\n{gw.logs()}"
        time.sleep(POLL_INTERVAL)
    return now


def tunnel_to_storage(gw: Gateway) -> CurlResult:
    """batch -> CONNECT 127.0.0.20:9000 (allowed by apps/batch-to-storage) and a request through."""
    url = f"http://{STORAGE_IP}:{STORAGE_PORT}/"
    return curl(url, proxy=gw.proxy_url, interface=BATCH, tunnel=True)


@pytest.fixture
def scripted_dns() -> Iterator[ScriptedDns]:
    """A DNS server answering cached.allowed.test with the allowed upstream, TTL 300 s."""
    with ScriptedDns({CACHED_NAME: [ALLOWED_IP]}, ttls={CACHED_NAME: CACHED_TTL}) as server:
        yield server


@pytest.fixture
def config(tmp_path: Path, scripted_dns: ScriptedDns) -> Path:
    """The contract configuration with local-ips refreshed every second and reloads by SIGHUP."""
    data = load_yaml(CONTRACT_DIR / "egressgw.yaml")
    feeds = [dict(f, period=FEED_PERIOD) if f["name"] == "local-ips" else f for f in data["feeds"]]
    return write_config(
        tmp_path / "gw",
        CONTRACT_DIR,
        nameserver=scripted_dns.nameserver,
        overrides={"feeds": feeds, "reload": {"watch": False}},
    )


def test_feed_refresh_refuses_the_next_connect_to_a_cached_address(
    config: Path, upstream: Upstream, curl_installed: None
) -> None:
    """An address a refreshed feed file starts listing is refused at the next CONNECT.

    The tunnel's outcome is cached (same source, target, port and protocol) before the feed
    changes; the next CONNECT after the refresh must not replay it.
    """
    feed = config.parent / "feed-ips.txt"
    with Gateway(config) as gw:
        for _ in range(2):  # decided, then replayed from the outcome cache
            allowed = tunnel_to_storage(gw)
            assert allowed.status == 200, (allowed.status, allowed.reason, allowed.error)
        labels = {"feed": "local-ips", "result": "updated"}
        updates = metric(gw, "feeds_updates_total", **labels)
        feed.write_text(feed.read_text() + f"{STORAGE_IP}\n")
        wait_metric_above(gw, updates, "feeds_updates_total", **labels)
        refused = tunnel_to_storage(gw)
    assert refused.status == 403, (refused.status, refused.reason, refused.error)
    assert refused.reason == (
        f"denied by security/block-threat-feeds: {STORAGE_IP} listed by feed local-ips"
        f" (batch/report -> {STORAGE_IP}:{STORAGE_PORT})"
    )


def test_reload_keeps_the_dns_cache_unless_resolver_settings_change(
    config: Path, scripted_dns: ScriptedDns, upstream: Upstream, curl_installed: None
) -> None:
    """A name resolved before a reload is not asked again after it; new resolver settings do ask."""
    url = f"http://{CACHED_NAME}:{HTTP_PORT}/"
    with Gateway(config) as gw:

        def fetch() -> None:
            result = curl(url, proxy=gw.proxy_url, interface=PAYMENTS)
            assert result.status == 200, (result.status, result.reason, result.error)

        def reload() -> None:
            done = metric(gw, "egressgw_reloads_total", result="ok")
            gw.signal(signal.SIGHUP)
            wait_metric_above(gw, done, "egressgw_reloads_total", result="ok")

        fetch()
        assert scripted_dns.count(CACHED_NAME) == 1
        reload()
        fetch()
        assert scripted_dns.count(CACHED_NAME) == 1, "the reload dropped the DNS cache"
        data = load_yaml(config)
        data["resolver"]["timeout"] = "4s"
        dump_yaml(data, config)
        reload()
        fetch()
        assert scripted_dns.count(CACHED_NAME) == 2, "new resolver settings kept the old cache"
