"""In-process tests of the running gateway: reload, metrics, readiness, drain (real sockets)."""

import asyncio
import gc
import ipaddress
import json
import weakref
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from egressgw.app import Gateway, feed_readiness, restart_only
from egressgw.config.model import load_config
from egressgw.flow import Flow
from egressgw.identity.workload import Peer
from feeds.refresh import FeedStatus
from tests.support.scripted_dns import ScriptedDns

ALLOW_ECHO = """\
default: deny
tiers:
  - name: t
    rules:
      - name: echo
        action: allow
        to: {cidrs: ["127.0.0.1/32"]}
"""
DENY_ALL = "default: deny\ntiers: []\n"


async def echo_server() -> tuple[asyncio.Server, int]:
    """A TCP server on loopback that echoes what it reads."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway on free loopback ports with a file sink and a policy allowing 127.0.0.1."""
    (tmp_path / "policy.yaml").write_text(ALLOW_ECHO)
    (tmp_path / "gw.yaml").write_text(
        "proxy: {listen: '127.0.0.1:0', drain_timeout: 2s}\n"
        "admin: {listen: '127.0.0.1:0'}\n"
        "guard: {allow: ['127.0.0.1/32']}\n"
        "policy: {files: [policy.yaml]}\n"
        "sinks: [{type: file, path: events.jsonl}]\n"
    )
    gw = Gateway(load_config(tmp_path / "gw.yaml"), tmp_path / "gw.yaml")
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def tunnel(
    gw: Gateway, port: int
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a CONNECT tunnel to 127.0.0.1:port and return the proxy's answer head."""
    assert gw.proxy_address is not None
    reader, writer = await asyncio.open_connection(*gw.proxy_address)
    writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    return head, reader, writer


async def test_tunnel_relays_and_reload_swaps_policy(gateway: Gateway, tmp_path: Path) -> None:
    """A tunnel relays bytes; after a reload to deny-all the next CONNECT gets 403."""
    server, port = await echo_server()
    async with server:
        head, reader, writer = await tunnel(gateway, port)
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        (tmp_path / "policy.yaml").write_text(DENY_ALL)
        assert await gateway.reload() is True
        head, _, writer = await tunnel(gateway, port)
        assert head.startswith(b"HTTP/1.1 403")
        reason = f"denied by policy default (no rule allows unknown 127.0.0.1 -> 127.0.0.1:{port})"
        assert f"X-Egressgw-Reason: {reason}".encode() in head, head
        writer.close()


async def test_broken_policy_keeps_last_good(gateway: Gateway, tmp_path: Path) -> None:
    """A reload with a broken policy file is refused and the running policy stays."""
    server, port = await echo_server()
    async with server:
        (tmp_path / "policy.yaml").write_text("tiers: [{name: t, rules: [{name: x}]}]\n")
        assert await gateway.reload() is False
        head, _, writer = await tunnel(gateway, port)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()


async def test_admin_endpoints(gateway: Gateway) -> None:
    """/healthz and /readyz answer 200 and /metrics counts decided flows by action and tier."""
    server, port = await echo_server()
    async with server:
        _, _, writer = await tunnel(gateway, port)
        writer.write(b"\x16\x03\x01")  # first bytes: the tunnel is decided as tcp/tls now
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.1)
    assert gateway.admin_address is not None
    base = "http://{}:{}".format(*gateway.admin_address)
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(base + path) as r:
                assert r.status == 200
        async with http.get(base + "/metrics") as r:
            text = await r.text()
    assert 'egressgw_flows_total{action="connection_allowed",tier="t"} 1.0' in text
    assert "egressgw_decision_seconds_bucket" in text


async def test_stop_drains_open_tunnel(tmp_path: Path, gateway: Gateway) -> None:
    """stop() waits for an open tunnel up to drain_timeout, then closes it and records its end."""
    server, port = await echo_server()
    async with server:
        _, reader, writer = await tunnel(gateway, port)
        writer.write(b"abc")
        assert await reader.readexactly(3) == b"abc"
        loop = asyncio.get_running_loop()
        started = loop.time()
        await gateway.stop()
        assert 1.5 < loop.time() - started < 5
        assert await reader.read() == b""
        writer.close()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert any('"connection_ended"' in line for line in lines)


async def test_policy_file_change_reloads(tmp_path: Path) -> None:
    """Editing the policy file is noticed by the watcher and swaps the policy in."""
    (tmp_path / "policy.yaml").write_text(ALLOW_ECHO)
    (tmp_path / "gw.yaml").write_text(
        "proxy: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0'}\n"
        "reload: {interval: 50ms}\n"
        "guard: {allow: ['127.0.0.1/32']}\npolicy: {files: [policy.yaml]}\n"
        "sinks: [{type: file, path: events.jsonl}]\n"
    )
    gw = Gateway(load_config(tmp_path / "gw.yaml"), tmp_path / "gw.yaml")
    await gw.start()
    try:
        before = gw.runtime
        (tmp_path / "policy.yaml").write_text(DENY_ALL)
        for _ in range(100):
            if gw.runtime is not before:
                break
            await asyncio.sleep(0.02)
        assert gw.runtime is not before
        assert gw.runtime.policy.tiers == ()
    finally:
        await gw.stop()


async def test_finished_connections_are_freed_without_the_cycle_collector(
    gateway: Gateway,
) -> None:
    """A finished tunnel leaves no cycle behind: its objects go by reference counting alone.

    Cycles (stream <-> protocol, parser <-> connection) would leave every connection's objects
    to the cyclic collector, which then costs more than the rest of a short tunnel's Python.
    """
    server, port = await echo_server()
    async with server:
        gc.collect()
        gc.disable()
        try:
            refs = []
            for _ in range(5):
                head, reader, writer = await tunnel(gateway, port)
                assert head.startswith(b"HTTP/1.1 200")
                refs.extend(weakref.ref(c) for c in gateway.connections)
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                writer.close()
                assert await reader.read() == b""
            for _ in range(100):
                if not gateway.connections:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert refs and [r for r in refs if r() is not None] == []
        finally:
            gc.enable()


async def test_every_consumer_hears_of_each_flow(gateway: Gateway) -> None:
    """A consumer added to the gateway's list is told of a tunnel's decision and of its end."""
    heard: list[tuple[str, str]] = []

    class Recorder:
        def flow_decided(self, flow: Flow) -> None:
            heard.append(("decided", flow.verdict.action if flow.verdict else "undecided"))

        def flow_ended(self, flow: Flow) -> None:
            heard.append(("ended", str(flow.bytes_out)))

    gateway.consumers.append(Recorder())
    server, port = await echo_server()
    async with server:
        head, reader, writer = await tunnel(gateway, port)
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await writer.wait_closed()
        for _ in range(100):
            if len(heard) == 2:
                break
            await asyncio.sleep(0.01)
    assert heard == [("decided", "connection_allowed"), ("ended", "4")]


FEED_THEN_ECHO = """\
default: deny
tiers:
  - name: security
    rules:
      - name: block-feeds
        action: deny
        to: {feeds: ["*"]}
  - name: t
    rules:
      - name: echo
        action: allow
        to: {cidrs: ["127.0.0.1/32"]}
"""


def feed_config(tmp_path: Path, resolver_timeout: str = "5s", identity: str = "") -> str:
    """A gateway config with a local feed file and a policy refusing what feeds list."""
    return (
        "proxy: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0'}\n"
        "reload: {watch: false}\n"
        f"resolver: {{timeout: {resolver_timeout}}}\n"
        "guard: {allow: ['127.0.0.1/32']}\npolicy: {files: [policy.yaml]}\n"
        "feeds: [{name: local-ips, url: ips.txt, format: lines}]\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"{identity}"
        "sinks: [{type: file, path: events.jsonl}]\n"
    )


@pytest.fixture
async def feed_gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """A started gateway whose feed 'local-ips' lists 192.0.2.1 only, with its data loaded."""
    (tmp_path / "policy.yaml").write_text(FEED_THEN_ECHO)
    (tmp_path / "ips.txt").write_text("192.0.2.1\n")
    (tmp_path / "gw.yaml").write_text(feed_config(tmp_path))
    gw = Gateway(load_config(tmp_path / "gw.yaml"), tmp_path / "gw.yaml")
    await gw.start()
    try:
        for _ in range(200):
            if gw.feeds.ready:
                break
            await asyncio.sleep(0.01)
        assert gw.feeds.ready
        yield gw
    finally:
        await gw.stop()


async def test_feed_update_refuses_the_next_connect_to_a_cached_address(
    feed_gateway: Gateway, tmp_path: Path
) -> None:
    """A feed update listing an address whose tunnel outcome is cached refuses the next CONNECT."""
    server, port = await echo_server()
    async with server:
        for _ in range(2):  # decided, then replayed from the outcome cache
            head, _, writer = await tunnel(feed_gateway, port)
            assert head.startswith(b"HTTP/1.1 200"), head
            writer.close()
        (tmp_path / "ips.txt").write_text("192.0.2.1\n127.0.0.1\n")
        [report] = await feed_gateway.feeds.update_now(["local-ips"])
        assert report.status == "updated", report
        head, _, writer = await tunnel(feed_gateway, port)
        writer.close()
    assert head.startswith(b"HTTP/1.1 403"), head
    assert b"127.0.0.1 listed by feed local-ips" in head, head


async def test_reload_keeps_the_services_and_renews_only_what_changed(
    feed_gateway: Gateway, tmp_path: Path
) -> None:
    """A reload keeps resolver, inventory and feeds; new resolver settings bring a new resolver."""
    before = feed_gateway.runtime
    assert await feed_gateway.reload() is True
    after = feed_gateway.runtime
    assert after is not before
    assert (after.resolver, after.inventory, after.threats) == (
        before.resolver,
        before.inventory,
        before.threats,
    )
    identity = "identity: {static: [{cidr: 127.0.0.1/32, namespace: local}]}\n"
    (tmp_path / "gw.yaml").write_text(feed_config(tmp_path, "3s", identity))
    generation = feed_gateway.inventory.generation
    assert await feed_gateway.reload() is True
    renewed = feed_gateway.runtime
    assert renewed.resolver is not before.resolver and renewed.inventory is before.inventory
    assert feed_gateway.inventory.generation == generation + 1
    local = renewed.inventory.lookup(Peer(ipaddress.ip_address("127.0.0.1")))
    assert local.namespace == "local"


async def _reloads_done(gw: Gateway) -> None:
    """Wait until the gateway's reloader has run every request."""
    if gw.reload_queue.task is not None:
        await gw.reload_queue.task


async def test_sighup_and_the_watcher_reload_one_broken_edit_once(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken edit seen by both SIGHUP and the file watcher is one failed reload, logged."""
    (tmp_path / "policy.yaml").write_text("tiers: [{name: t, rules: [{name: x}]}]\n")
    gateway.request_reload("SIGHUP")
    await gateway.reload_queue.check()  # the watcher's poll, in the same instant
    await _reloads_done(gateway)
    await gateway.reload_queue.check()  # and its next poll, after the reload read the edit
    await _reloads_done(gateway)
    assert gateway.metrics.reloads == {"failed": 1}
    out = capsys.readouterr().out
    assert "reload requested" in out and "SIGHUP" in out


async def test_a_reload_asked_for_during_a_reload_runs_once_after_it(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests arriving while a reload runs make exactly one more, after it: never two at once."""
    started, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    real_load = Gateway._load
    loads = 0

    def slow_load(*args: object) -> object:
        nonlocal loads
        loads += 1
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=10)
        return real_load(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(gateway, "_load", slow_load)
    gateway.request_reload("SIGHUP")
    await asyncio.wait_for(started.wait(), 5)
    (tmp_path / "policy.yaml").write_text(DENY_ALL)
    gateway.request_reload("SIGHUP")
    gateway.request_reload("SIGHUP")
    await gateway.reload_queue.check()
    assert loads == 1
    release.set()
    await asyncio.wait_for(_reloads_done(gateway), 10)
    assert loads == 2 and gateway.metrics.reloads == {"ok": 2}
    assert gateway.runtime.policy.default == "deny" and not gateway.runtime.policy.tiers


def _status(name: str, has_data: bool, error: str | None = None) -> FeedStatus:
    return FeedStatus(name, True, 0, None, None, 0, 0, error, None, has_data)


def test_feed_readiness_waits_then_serves_without_unrequired_feeds() -> None:
    """Feeds without data hold readiness up until the timeout, naming them and their error;
    after it they are served without, and a required one holds it up still."""
    statuses = {"a": _status("a", True), "b": _status("b", False, "connect refused")}
    assert feed_readiness({"a": statuses["a"]}, set(), 0.0, 60.0) == (None, [])
    assert feed_readiness(statuses, set(), 10.0, 60.0) == (
        "feeds without data: b (connect refused); ready without them in 50s",
        [],
    )
    assert feed_readiness(statuses, set(), 60.0, 60.0) == (None, [statuses["b"]])
    assert feed_readiness(statuses, {"b"}, 3600.0, 60.0) == (
        "required feeds without data: b (all without data: b (connect refused))",
        [],
    )
    disabled = replace(statuses["b"], enabled=False)
    assert feed_readiness({"b": disabled}, {"b"}, 0.0, 60.0) == (None, [])


async def test_shutdown_turns_unready_keeps_accepting_until_hurried(
    gateway: Gateway,
) -> None:
    """shutdown(): /readyz 503 "shutting down" while new tunnels are still accepted; a second
    signal (hurry) ends the delay and the listener closes."""
    assert gateway.readiness() is None and gateway.limits.shutdown_delay == 5.0
    server, port = await echo_server()
    async with server:
        stopping = asyncio.ensure_future(gateway.shutdown())
        await asyncio.sleep(0.2)
        assert gateway.readiness() == "shutting down"
        head, _, writer = await tunnel(gateway, port)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        assert not stopping.done()
        gateway.hurry()
        async with asyncio.timeout(3):
            await stopping
        assert gateway.proxy_address is not None
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*gateway.proxy_address)


ALLOW_SLOW_NAME = """\
default: deny
tiers:
  - name: t
    rules:
      - name: slow
        action: allow
        to: {domains: ["slow.test"]}
"""


async def test_a_lookup_that_spans_a_reload_is_decided_by_the_new_policy(tmp_path: Path) -> None:
    """A CONNECT whose name is still being resolved when a deny-all reload lands is refused."""
    (tmp_path / "policy.yaml").write_text(ALLOW_SLOW_NAME)
    server, port = await echo_server()
    with ScriptedDns({"slow.test": ["127.0.0.1"]}, delays={"slow.test": 1.0}) as dns:
        (tmp_path / "gw.yaml").write_text(
            "proxy: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0'}\n"
            "reload: {watch: false}\n"
            f"resolver: {{nameservers: ['127.0.0.1:{dns.port}'], timeout: 5s, ipv6: false}}\n"
            "guard: {allow: ['127.0.0.1/32']}\npolicy: {files: [policy.yaml]}\n"
            "sinks: [{type: file, path: events.jsonl}]\n"
        )
        gw = Gateway(load_config(tmp_path / "gw.yaml"), tmp_path / "gw.yaml")
        await gw.start()
        try:
            assert gw.proxy_address is not None
            async with server:
                reader, writer = await asyncio.open_connection(*gw.proxy_address)
                writer.write(f"CONNECT slow.test:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                for _ in range(200):  # the lookup is in flight
                    if dns.queries:
                        break
                    await asyncio.sleep(0.01)
                assert dns.queries
                (tmp_path / "policy.yaml").write_text(DENY_ALL)
                assert await gw.reload() is True
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                writer.close()
                # The refusal reads the client until its EOF: let it close before the stop.
                for _ in range(200):
                    if not gw.reactor.readers:
                        break
                    await asyncio.sleep(0.01)
        finally:
            await gw.stop()
    assert head.startswith(b"HTTP/1.1 403"), head
    assert b"no rule allows unknown 127.0.0.1 -> slow.test:" in head, head


async def test_a_tunnel_cut_at_the_drain_timeout_says_so_in_its_end_event(tmp_path: Path) -> None:
    """A tunnel still open when proxy.drain_timeout passes ends with the shutdown as its reason."""
    (tmp_path / "policy.yaml").write_text(ALLOW_ECHO)
    (tmp_path / "gw.yaml").write_text(
        "proxy: {listen: '127.0.0.1:0', drain_timeout: 0.2s}\nadmin: {listen: '127.0.0.1:0'}\n"
        "reload: {watch: false}\nguard: {allow: ['127.0.0.1/32']}\n"
        "policy: {files: [policy.yaml]}\nsinks: [{type: file, path: events.jsonl}]\n"
    )
    gw = Gateway(load_config(tmp_path / "gw.yaml"), tmp_path / "gw.yaml")
    await gw.start()
    server, port = await echo_server()
    async with server:
        try:
            _, reader, writer = await tunnel(gw, port)
            writer.write(b"abc")
            assert await reader.readexactly(3) == b"abc"
        finally:
            await gw.stop()
        assert await reader.read() == b""
        writer.close()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    [end] = [e for e in events if e["event"]["action"] == "connection_ended"]
    assert end["event"]["reason"] == "gateway shutdown: proxy.drain_timeout passed", end


async def test_a_reload_gives_the_dns_proxy_its_new_settings(tmp_path: Path) -> None:
    """Upstreams and the blocked answer apply from the reload on (the listen address waits)."""
    base = (
        "proxy: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0'}\n"
        "sinks: [{type: file, path: events.jsonl}]\nreload: {watch: false}\n"
    )
    path = tmp_path / "gw.yaml"
    path.write_text(base + "dns: {listen: '127.0.0.1:0', upstreams: ['127.0.0.1:5301']}\n")
    gw = Gateway(load_config(path), path)
    await gw.start()
    try:
        assert gw.dns is not None and gw.dns.sinkhole is None
        path.write_text(
            base + "dns: {listen: '127.0.0.2:0', upstreams: ['127.0.0.1:5302'],"
            " blocked_answer: sinkhole, sinkhole: 192.0.2.1}\n"
        )
        assert await gw.reload() is True
        assert gw.dns.upstreams == [("127.0.0.1", 5302)]
        assert gw.dns.sinkhole == ipaddress.ip_address("192.0.2.1")
    finally:
        await gw.stop()


def test_restart_only_settings_are_named_with_both_values(tmp_path: Path) -> None:
    """What a reload cannot apply is listed by key, with the running and the loaded value."""
    path = tmp_path / "gw.yaml"
    path.write_text("dns: {listen: '127.0.0.1:53', upstreams: ['127.0.0.1:5353']}\n")
    running = load_config(path)
    path.write_text(
        "dns: {listen: '127.0.0.1:5300', upstreams: ['127.0.0.1:5353']}\n"
        "transparent: {listen: '127.0.0.1:15001'}\n"
    )
    changed = restart_only(running, load_config(path))
    assert changed == [
        ("transparent.listen", "None", "127.0.0.1:15001"),
        ("dns.listen", "127.0.0.1:53", "127.0.0.1:5300"),
    ]


async def test_the_upstream_pool_is_sized_by_the_configuration_and_by_a_reload(
    gateway: Gateway, tmp_path: Path
) -> None:
    """proxy.max_idle_upstreams, its per-destination bound and upstream_idle_timeout size the
    pool of idle upstreams; a reload applies new values to the same pool.
    """
    pool = gateway.upstreams
    assert (pool.max_idle, pool.max_idle_per_key, pool.idle_timeout) == (512, 64, 30.0)
    config = tmp_path / "gw.yaml"
    config.write_text(
        config.read_text().replace(
            "drain_timeout: 2s",
            "drain_timeout: 2s, max_idle_upstreams: 3, max_idle_upstreams_per_destination: 2,"
            " upstream_idle_timeout: 5s",
        )
    )
    assert await gateway.reload() is True
    assert gateway.upstreams is pool
    assert (pool.max_idle, pool.max_idle_per_key, pool.idle_timeout) == (3, 2, 5.0)
