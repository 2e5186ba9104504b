"""The egress map through a real gateway: API, live stream, auth, and the page in chromium."""

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from egressgw.app import Gateway
from egressgw.config.model import load_config
from tests.support.scripted_dns import ScriptedDns

TOKEN = "s3cret-admin-token"
# Two workloads by source address; names resolve to loopback, where one echo server listens.
POLICY = """\
default: deny
tiers:
  - name: security
    rules:
      - name: block-threat-feeds
        action: deny
        to: {feeds: ["*"]}
      - name: no-pastebin
        action: deny
        to: {domains: ["paste.test"]}
      - name: audit-billing-stripe
        action: deny
        audit: true
        from: {namespace: billing}
        to: {domains: ["api.stripe.test"]}
  - name: platform
    rules:
      - name: saas
        action: allow
        to: {domains: ["api.stripe.test", "paste.test", "evil.test"]}
"""
NAMES = {"api.stripe.test": ["127.0.0.1"], "paste.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"]}


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, int]]:
    """A gateway with two static workloads, a domain blocklist, admin.auth, and an echo server."""
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = echo.sockets[0].getsockname()[1]
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "names.txt").write_text("evil.test\n")
    (tmp_path / "admin-token").write_text(TOKEN + "\n")
    with ScriptedDns(NAMES) as dns:
        (tmp_path / "gw.yaml").write_text(
            "proxy: {listen: '127.0.0.1:0', drain_timeout: 1s}\n"
            "admin: {listen: '127.0.0.1:0', auth: {token_file: admin-token}}\n"
            "reload: {watch: false}\n"
            f"resolver: {{nameservers: ['127.0.0.1:{dns.port}'], timeout: 2s, ipv6: false}}\n"
            "guard: {allow: ['127.0.0.1/32']}\n"
            "identity:\n"
            "  static:\n"
            "    - {cidr: 127.0.0.2/32, namespace: shop, pod: cart-1, labels: {app: cart}}\n"
            "    - {cidr: 127.0.0.3/32, namespace: billing, pod: inv-1, labels: {app: invoicer}}\n"
            "feeds: [{name: bad-names, url: names.txt, format: lines}]\n"
            "policy: {files: [policy.yaml]}\n"
            "sinks: [{type: file, path: events.jsonl}]\n"
        )
        gw = Gateway(load_config(tmp_path / "gw.yaml"), tmp_path / "gw.yaml")
        await gw.start()
        for _ in range(200):
            if gw.feeds.ready:
                break
            await asyncio.sleep(0.05)
        try:
            yield gw, port
        finally:
            await gw.stop()
            echo.close()
            await echo.wait_closed()


async def through(gw: Gateway, source: str, host: str, port: int, payload: bytes = b"") -> bytes:
    """CONNECT from ``source`` to ``host:port``, send ``payload``, read it back; the answer head."""
    assert gw.proxy_address is not None
    reader, writer = await asyncio.open_connection(*gw.proxy_address, local_addr=(source, 0))
    writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 200") and payload:
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
    writer.close()
    return head


async def traffic(gw: Gateway, port: int) -> None:
    """Allowed, denied by rule, denied by feed, and audited (would-deny) flows."""
    assert (await through(gw, "127.0.0.2", "api.stripe.test", port, b"x" * 1000)).startswith(
        b"HTTP/1.1 200"
    )
    assert (await through(gw, "127.0.0.2", "paste.test", port)).startswith(b"HTTP/1.1 403")
    assert (await through(gw, "127.0.0.2", "evil.test", port)).startswith(b"HTTP/1.1 403")
    assert (await through(gw, "127.0.0.3", "api.stripe.test", port, b"y")).startswith(
        b"HTTP/1.1 200"
    )
    await asyncio.sleep(0.2)  # the end events of the relayed flows


def base(gw: Gateway) -> str:
    """The admin server's URL."""
    assert gw.admin_address is not None
    return "http://{}:{}".format(*gw.admin_address)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def get(url: str, **kw: Any) -> tuple[int, Any]:
    """GET ``url`` with the bearer token; (status, JSON or text)."""
    async with aiohttp.ClientSession() as http, http.get(url, headers=AUTH, **kw) as r:
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, await r.text()


async def test_graph_shows_edges_with_decisions_rules_threats_and_bytes(
    gateway: tuple[Gateway, int],
) -> None:
    """/api/v1/graph has one edge per app and destination, coloured, with rule, feed and bytes."""
    gw, port = gateway
    await traffic(gw, port)
    status, graph = await get(base(gw) + "/api/v1/graph?window=5m")
    assert status == 200, graph
    edges = {
        (e["source"]["namespace"], e["source"]["app"], e["destination"]["host"]): e
        for e in graph["edges"]
    }
    ok = edges["shop", "cart", "api.stripe.test"]
    assert (ok["decision"], ok["rule"], ok["bytes_out"], ok["bytes_in"]) == (
        "allowed",
        "platform/saas",
        1000,
        1000,
    )
    paste = edges["shop", "cart", "paste.test"]
    assert (paste["decision"], paste["rule"]) == ("denied", "security/no-pastebin")
    evil = edges["shop", "cart", "evil.test"]
    assert evil["rule"] == "security/block-threat-feeds"
    assert evil["threats"][0]["feed"] == "bad-names"
    audit = edges["billing", "invoicer", "api.stripe.test"]
    assert audit["decision"] == "would_deny" and audit["would_deny"] == 1
    assert graph["namespaces"] == ["billing", "shop"] and graph["windows"] == [300, 3600]
    _, only_billing = await get(base(gw) + "/api/v1/graph?namespace=billing&window=1h")
    assert {e["source"]["namespace"] for e in only_billing["edges"]} == {"billing"}
    status, text = await get(base(gw) + "/api/v1/graph?window=7m")
    assert status == 400 and "window must be one of 5m, 60m" in text


async def test_flows_lists_denied_and_would_deny_with_reasons(gateway: tuple[Gateway, int]) -> None:
    """/api/v1/flows lists refused and audited flows, newest first, filtered by decision."""
    gw, port = gateway
    await traffic(gw, port)
    _, body = await get(base(gw) + "/api/v1/flows")
    got = [(f["destination"]["host"], f["decision"], f["rule"]) for f in body["flows"]]
    assert got == [
        ("api.stripe.test", "would_deny", "platform/saas"),
        ("evil.test", "denied", "security/block-threat-feeds"),
        ("paste.test", "denied", "security/no-pastebin"),
    ]
    assert "would deny by security/audit-billing-stripe" in body["flows"][0]["reason"]
    _, denied = await get(base(gw) + "/api/v1/flows?decision=denied&limit=1")
    assert [f["destination"]["host"] for f in denied["flows"]] == ["evil.test"]
    assert denied["flows"][0]["threats"] == [{"feed": "bad-names", "indicator": "evil.test"}]


async def test_explain_runs_the_gateways_decision(gateway: tuple[Gateway, int]) -> None:
    """/api/v1/explain decides from -> to with the live policy and prints the steps."""
    gw, port = gateway
    _, body = await get(base(gw) + f"/api/v1/explain?from=127.0.0.2&to=paste.test:{port}")
    assert body["allowed"] is False
    assert (
        body["lines"][0]
        == "source:      127.0.0.2 -> namespace shop, pod cart-1, labels {'app': 'cart'}"
    )
    assert "  security/no-pastebin: matches: deny" in body["lines"]
    assert body["lines"][-1].startswith("decision:    DENY (security/no-pastebin)")
    status, text = await get(base(gw) + "/api/v1/explain?from=nope&to=x.test:1")
    assert status == 400 and text.startswith("from:")


async def test_stream_sends_graph_and_new_refused_flows(gateway: tuple[Gateway, int]) -> None:
    """/api/v1/stream sends a graph event, then a flows event for a flow denied later."""
    gw, port = gateway
    async with (
        aiohttp.ClientSession() as http,
        http.get(base(gw) + "/api/v1/stream", headers=AUTH) as r,
    ):
        assert r.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        assert first.startswith(b"event: graph\ndata: {")
        await through(gw, "127.0.0.2", "paste.test", port)
        seen = b""
        while b"event: flows" not in seen:
            seen += await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
        assert b'"rule":"security/no-pastebin"' in seen


async def test_admin_auth_guards_the_map_but_not_the_probes(gateway: tuple[Gateway, int]) -> None:
    """Without the token the page and API answer 401; /?token= sets a cookie that works."""
    gw, _ = gateway
    # unsafe: the client keeps cookies of IP-address hosts (a browser does).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        for path in ("/", "/api/v1/graph", "/static/map.js"):
            async with http.get(base(gw) + path) as r:
                assert r.status == 401, path
        async with http.get(
            base(gw) + "/api/v1/graph", headers={"Authorization": "Bearer no"}
        ) as r:
            assert r.status == 401
        async with http.get(base(gw) + "/healthz") as r:
            assert r.status == 200
        async with http.get(base(gw) + f"/?token={TOKEN}") as r:
            assert r.status == 200 and "<title>egressgw: egress map</title>" in await r.text()
            assert r.url.query_string == ""  # redirected: the token leaves the address bar
        async with http.get(base(gw) + "/api/v1/graph") as r:  # the cookie now
            assert r.status == 200


def chromium() -> str:
    """The chromium binary, or skip naming the Debian package."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("needs Debian's chromium package (apt-get install chromium)")


async def test_page_in_headless_chromium_shows_namespaces_destinations_and_denied_flows(
    gateway: tuple[Gateway, int], tmp_path: Path
) -> None:
    """Chromium renders the graph's namespaces and destinations and the denied flow's rule."""
    browser = chromium()
    gw, port = gateway
    await traffic(gw, port)
    # #paused: no live stream, whose never-ending request would hold chromium's virtual time.
    url = base(gw) + f"/?token={TOKEN}#paused"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000"]
    common.append(f"--user-data-dir={tmp_path / 'profile'}")
    dump = await asyncio.to_thread(
        subprocess.run, [*common, "--dump-dom", url], capture_output=True, text=True, timeout=90
    )
    dom = dump.stdout
    assert "namespace shop" in dom and "namespace billing" in dom, dump.stderr[-2000:]
    assert ">cart<" in dom and ">invoicer<" in dom
    assert "api.stripe.test:" in dom and "⚠ evil.test:" in dom and "(bad-names)" in dom
    assert 'class="edge denied"' in dom and 'class="edge would_deny"' in dom
    assert "paused (remove #paused" in dom  # the redirect kept the fragment; no stream opened
    assert "<td>security/no-pastebin</td>" in dom and "denied by security/no-pastebin" in dom
    shot = tmp_path / "egress-map.png"
    await asyncio.to_thread(
        subprocess.run,
        [*common, f"--screenshot={shot}", "--window-size=1280,900", url],
        capture_output=True,
        timeout=90,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_metrics_listen_moves_metrics_to_a_listener_of_its_own(tmp_path: Path) -> None:
    """With admin.metrics_listen, /metrics answers there and no longer on admin.listen."""
    (tmp_path / "gw.yaml").write_text(
        "proxy: {listen: '127.0.0.1:0'}\n"
        "admin: {listen: '127.0.0.1:0', metrics_listen: '127.0.0.1:0'}\n"
        "reload: {watch: false}\nsinks: [{type: file, path: events.jsonl}]\n"
    )
    gw = Gateway(load_config(tmp_path / "gw.yaml"), tmp_path / "gw.yaml")
    await gw.start()
    try:
        assert gw.admin.metrics_address is not None
        metrics = "http://{}:{}/metrics".format(*gw.admin.metrics_address)
        async with aiohttp.ClientSession() as http:
            async with http.get(metrics) as r:
                assert r.status == 200 and "egressgw_flows_total" in await r.text()
            async with http.get(base(gw) + "/metrics") as r:
                assert r.status == 404
            async with http.get(base(gw) + "/api/v1/graph") as r:  # no admin.auth: open
                assert r.status == 200
    finally:
        await gw.stop()
