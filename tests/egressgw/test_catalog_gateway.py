"""The catalog's public feeds, served locally, block what they list, with ECS threat fields.

The policy here allows nothing, so a flow the feeds miss is refused by the default rule and no
connection ever leaves the machine; the tests tell the two refusals apart by their reason.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from egressgw.app import Gateway
from egressgw.config.model import load_config
from tests.feeds.test_catalog import EXCERPT_FIXES, SERVED

SAMPLES = Path(__file__).resolve().parents[1] / "feeds" / "samples"
POLICY = """\
default: deny
tiers:
  - name: security
    rules:
      - name: block-threat-feeds
        action: deny
        to: {feeds: ["*"]}
"""


def _serve(body: bytes) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body)

    return handler


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway with every catalog feed pointed at a local server holding its sample."""
    app = web.Application()
    for name, (sample, _, _) in SERVED.items():
        body = (SAMPLES / sample).read_bytes()
        old, new = EXCERPT_FIXES.get(sample, (b"", b""))
        if old:
            body = body.replace(old, new)
        app.router.add_get(f"/{name}", _serve(body))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    feeds = "".join(f"  - {{catalog: {n}, url: 'http://127.0.0.1:{port}/{n}'}}\n" for n in SERVED)
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "gw.yaml").write_text(
        "proxy: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0'}\n"
        # Nothing listens on port 1: names fail to resolve at once, and nothing leaves loopback.
        "resolver: {nameservers: ['127.0.0.1:1'], timeout: 1s}\n"
        f"feeds:\n{feeds}"
        "policy: {files: [policy.yaml]}\n"
        "sinks: [{type: file, path: events.jsonl}]\n"
    )
    gw = Gateway(load_config(tmp_path / "gw.yaml"), tmp_path / "gw.yaml")
    await gw.start()
    for _ in range(200):
        if gw.feeds.ready:
            break
        await asyncio.sleep(0.05)
    assert gw.feeds.ready, gw.feeds.status()
    try:
        yield gw
    finally:
        await gw.stop()
        await runner.cleanup()


async def ask(gw: Gateway, request: bytes) -> bytes:
    """Send one request head to the proxy and return its answer head."""
    assert gw.proxy_address is not None
    reader, writer = await asyncio.open_connection(*gw.proxy_address)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return head


def request_for(value: str) -> bytes:
    """CONNECT for an address or name, an absolute-form GET for a URL."""
    if value.startswith("http://"):
        return f"GET {value} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    target = f"[{value}]:443" if ":" in value else f"{value}:443"
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


@pytest.mark.parametrize("feed", sorted(SERVED))
async def test_catalog_feed_blocks_what_it_lists(
    gateway: Gateway, tmp_path: Path, feed: str
) -> None:
    """A value the feed lists gets 403 naming the feed; one it does not list is not its match."""
    _, listed, unlisted = SERVED[feed]
    head = await ask(gateway, request_for(listed))
    assert head.startswith(b"HTTP/1.1 403"), head
    assert f"listed by feed {feed}".encode() in head or feed.encode() in head, head
    head = await ask(gateway, request_for(unlisted))
    assert f"feed {feed}".encode() not in head, head
    await gateway.exporter.flush()
    await asyncio.sleep(0.2)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    alerts = [e for e in events if e["event"]["kind"] == "alert"]
    assert alerts, "no alert event"
    threat = alerts[0]["threat"]
    assert any(x["feed"]["name"] == feed for x in threat["enrichments"])
    assert threat["enrichments"][0]["matched"]["atomic"]
    assert alerts[0]["rule"] == {"name": "block-threat-feeds", "ruleset": "security"}
