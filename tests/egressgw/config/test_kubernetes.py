"""Policy resources watched on the stand-in API server by the in-process gateway (real client
library, real sockets): live effect, namespace scoping, refusals, status written once, feeds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from egressgw.app import Gateway
from egressgw.config.model import load_config
from tests.egressgw.identity.test_podindex import pod
from tests.egressgw.test_app import echo_server, tunnel
from tests.support.kube_apiserver import KubeApiServer

# The files' tiers objects join: nothing decides in security, apps allows nothing.
FILES = """\
default: deny
tiers:
  - name: security
  - name: apps
"""
GROUP = "egressgw.io/v1alpha1"
# How long a change may take to show: the watch event, the settle time, the swap.
LIVE = 10.0


async def eventually(check: Callable[[], Any], within: float = LIVE) -> None:
    """Wait until ``check()`` (a coroutine function or not) holds, or fail after ``within`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def allow_echo(namespace: str, name: str = "echo", **spec: Any) -> dict[str, Any]:
    """An EgressPolicy allowing 127.0.0.1 for its namespace's workloads."""
    return {
        "apiVersion": GROUP,
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "rules": [{"name": "echo", "action": "allow", "to": {"cidrs": ["127.0.0.1/32"]}}],
            **spec,
        },
    }


def deny_echo(name: str = "block-echo", tier: str = "security", **to: Any) -> dict[str, Any]:
    """A GlobalEgressPolicy denying 127.0.0.1 (or what ``to`` says) in ``tier``."""
    return {
        "apiVersion": GROUP,
        "kind": "GlobalEgressPolicy",
        "metadata": {"name": name},
        "spec": {
            "tier": tier,
            "order": 10,
            "rules": [
                {"name": "no-echo", "action": "deny", "to": to or {"cidrs": ["127.0.0.1/32"]}}
            ],
        },
    }


def accepted(server: KubeApiServer, kind: str, name: str, namespace: str = "") -> Any:
    """The object's Accepted condition, or None."""
    obj = server.get(kind, name, namespace)
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == "Accepted":
            return c
    return None


def patches_of(server: KubeApiServer, name: str) -> int:
    """Status PATCHes the stand-in received for objects named ``name``."""
    return sum(1 for path, _ in server.patches if path.endswith(f"/{name}/status"))


class Running:
    """The stand-in API server, an echo server and a started gateway watching policy resources."""

    server: KubeApiServer
    gateway: Gateway
    port: int


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    """A gateway whose source address 127.0.0.1 is pod api-1 of namespace payments."""
    r = Running()
    async with KubeApiServer(tmp_path / "api", bookmark_interval=0.2) as server:
        r.server = server
        server.create(pod("api-1", "127.0.0.1"))
        (tmp_path / "policy.yaml").write_text(FILES)
        (tmp_path / "gw.yaml").write_text(
            "proxy: {listen: '127.0.0.1:0', drain_timeout: 1s, shutdown_delay: 0}\n"
            "admin: {listen: '127.0.0.1:0'}\n"
            "reload: {watch: false}\n"
            "guard: {allow: ['127.0.0.1/32']}\n"
            f"identity: {{kubernetes: {{kubeconfig: {server.kubeconfig}}}}}\n"
            "policy: {files: [policy.yaml], kubernetes: true}\n"
            f"state_dir: {tmp_path / 'state'}\n"
            "sinks: [{type: file, path: events.jsonl}]\n"
        )
        r.gateway = Gateway(load_config(tmp_path / "gw.yaml"), tmp_path / "gw.yaml")
        echo, r.port = await echo_server()
        async with echo:
            await r.gateway.start()
            try:
                await eventually(lambda: r.gateway.readiness() is None)
                yield r
            finally:
                await r.gateway.stop()


async def connect(r: Running) -> bytes:
    """The gateway's answer head to CONNECT 127.0.0.1:<echo port>."""
    head, _, writer = await tunnel(r.gateway, r.port)
    writer.close()
    return head


def answers(r: Running, status: bytes) -> Callable[[], Any]:
    """A check: the next CONNECT is answered with ``status``."""

    async def check() -> bool:
        return (await connect(r)).startswith(b"HTTP/1.1 " + status)

    return check


async def test_a_global_policy_takes_effect_live_and_keeps_open_tunnels(running: Running) -> None:
    """An EgressPolicy allows, a GlobalEgressPolicy then denies the next CONNECT within seconds
    (its reason naming the rule) while the tunnel opened before keeps relaying; deleted, the
    next CONNECT is allowed again."""
    r = running
    assert (await connect(r)).startswith(b"HTTP/1.1 403")
    r.server.create(allow_echo("payments"))
    await eventually(answers(r, b"200"))
    head, reader, writer = await tunnel(r.gateway, r.port)
    assert head.startswith(b"HTTP/1.1 200")
    r.server.create(deny_echo())
    await eventually(answers(r, b"403"))
    head = await connect(r)
    assert b"X-Egressgw-Reason: denied by security/no-echo" in head, head
    writer.write(b"still")
    assert await reader.readexactly(5) == b"still"
    writer.close()
    r.server.delete("GlobalEgressPolicy", "block-echo")
    await eventually(answers(r, b"200"))


async def test_an_egress_policy_allows_only_its_own_namespace(running: Running) -> None:
    """An EgressPolicy of namespace shop, even one whose ``from`` names payments, allows nothing
    for payments' pod; payments' own does."""
    r = running
    r.server.create(allow_echo("shop"))
    sneaky = allow_echo("shop", "sneaky")
    sneaky["spec"]["rules"][0]["from"] = {"namespace": "payments"}
    r.server.create(sneaky)
    await eventually(lambda: accepted(r.server, "EgressPolicy", "sneaky", "shop") is not None)
    assert accepted(r.server, "EgressPolicy", "sneaky", "shop")["status"] == "True"
    assert (await connect(r)).startswith(b"HTTP/1.1 403")
    r.server.create(allow_echo("payments"))
    await eventually(answers(r, b"200"))
    steps = r.gateway.runtime.policy.tiers[1].rules
    assert [rule.origin for rule in steps] == [
        "EgressPolicy payments/echo",
        "EgressPolicy shop/echo",
        "EgressPolicy shop/sneaky",
    ]


async def test_a_refused_object_changes_nothing_and_says_why(running: Running) -> None:
    """A new object naming an unknown tier is refused in its status; a broken edit of an
    accepted one is refused too and its accepted generation keeps denying."""
    r = running
    r.server.create(allow_echo("payments"))
    r.server.create(deny_echo())
    await eventually(answers(r, b"403"))
    r.server.create(deny_echo("elsewhere", tier="platform"))
    await eventually(lambda: accepted(r.server, "GlobalEgressPolicy", "elsewhere") is not None)
    c = accepted(r.server, "GlobalEgressPolicy", "elsewhere")
    assert (c["status"], c["reason"], c["observedGeneration"]) == ("False", "UnknownTier", 1)
    assert c["message"] == (
        "spec.tier: no tier named 'platform' in the policy files (tiers: security, apps)"
    )
    broken = r.server.get("GlobalEgressPolicy", "block-echo")
    broken["spec"]["rules"][0]["action"] = "block"
    r.server.update(broken)

    def refused() -> bool:
        c = accepted(r.server, "GlobalEgressPolicy", "block-echo")
        return c is not None and c["status"] == "False"

    await eventually(refused)
    c = accepted(r.server, "GlobalEgressPolicy", "block-echo")
    assert (c["reason"], c["observedGeneration"]) == ("InvalidSpec", 2)
    assert c["message"].startswith("spec.rules[0].action: Input should be")
    assert c["message"].endswith("; generation 1 stays in force")
    assert r.server.get("GlobalEgressPolicy", "block-echo")["status"]["observedGeneration"] == 2
    assert (await connect(r)).startswith(b"HTTP/1.1 403")


async def test_status_is_written_once_and_not_again_while_unchanged(running: Running) -> None:
    """Each judged object gets one status PATCH; its own write coming back as a watch event,
    a reload and time passing write nothing more; a new generation writes once more."""
    r = running
    r.server.create(allow_echo("payments"))
    await eventually(lambda: accepted(r.server, "EgressPolicy", "echo", "payments") is not None)
    c = accepted(r.server, "EgressPolicy", "echo", "payments")
    assert (c["status"], c["reason"], c["observedGeneration"]) == ("True", "Accepted", 1)
    assert c["message"] == "1 rule in tier 'apps', order 0"
    assert await r.gateway.reload() is True
    await asyncio.sleep(1.0)  # settle, bookmarks, the reload's second look
    assert patches_of(r.server, "echo") == 1
    assert (await connect(r)).startswith(b"HTTP/1.1 200")
    changed = r.server.get("EgressPolicy", "echo", "payments")
    changed["spec"]["order"] = 5
    r.server.update(changed)
    await eventually(lambda: patches_of(r.server, "echo") == 2)
    await asyncio.sleep(0.5)
    assert patches_of(r.server, "echo") == 2
    assert accepted(r.server, "EgressPolicy", "echo", "payments")["observedGeneration"] == 2


async def test_two_replicas_judging_alike_write_once(running: Running, tmp_path: Path) -> None:
    """A second gateway with the same configuration finds the status written and writes none."""
    r = running
    r.server.create(allow_echo("payments"))
    await eventually(lambda: patches_of(r.server, "echo") == 1)
    second = Gateway(load_config(tmp_path / "gw.yaml"), tmp_path / "gw.yaml")
    await second.start()
    try:
        await eventually(lambda: second.readiness() is None)
        await asyncio.sleep(0.5)
    finally:
        await second.stop()
    assert patches_of(r.server, "echo") == 1


async def test_a_threat_feed_resource_blocks_what_it_lists(running: Running) -> None:
    """A ThreatFeed is fetched and served as a feed, a GlobalEgressPolicy denies what it lists;
    deleted, its feed goes and the policy naming it is refused."""
    r = running
    served = web.Application()

    async def ips(request: web.Request) -> web.Response:
        return web.Response(text="127.0.0.1\n")

    served.router.add_get("/ips", ips)
    runner = web.AppRunner(served)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        r.server.create(allow_echo("payments"))
        await eventually(answers(r, b"200"))
        feed = {
            "apiVersion": GROUP,
            "kind": "ThreatFeed",
            "metadata": {"name": "local-bad"},
            "spec": {
                "url": f"http://127.0.0.1:{port}/ips",
                "format": "lines",
                "special_ranges": "keep",
            },
        }
        r.server.create(feed)
        r.server.create(deny_echo("block-feeds", feeds=["local-bad"]))
        await eventually(answers(r, b"403"))
        head = await connect(r)
        assert b"127.0.0.1 listed by feed local-bad" in head, head
        c = accepted(r.server, "ThreatFeed", "local-bad")
        assert (c["status"], c["message"]) == ("True", "served as feed 'local-bad'")
        r.server.delete("ThreatFeed", "local-bad")
        await eventually(answers(r, b"200"))
        await eventually(
            lambda: (
                accepted(r.server, "GlobalEgressPolicy", "block-feeds")["reason"] == "UnknownFeed"
            )
        )
        assert "local-bad" not in r.gateway.feeds.status()
    finally:
        await runner.cleanup()


async def test_a_required_threat_feed_resource_holds_readiness_until_it_has_data(
    running: Running,
) -> None:
    """``required: true`` on a ThreatFeed counts as on a configured feed: never ready without it."""
    r = running
    listing: list[str] = []  # empty: the feed server fails

    async def ips(request: web.Request) -> web.Response:
        if not listing:
            return web.Response(status=503)
        return web.Response(text="".join(f"{x}\n" for x in listing))

    served = web.Application()
    served.router.add_get("/ips", ips)
    runner = web.AppRunner(served)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        url = f"http://127.0.0.1:{port}/ips"
        spec = {"url": url, "format": "lines", "required": True, "period": "1s", "retries": 0}
        feed = {
            "apiVersion": GROUP,
            "kind": "ThreatFeed",
            "metadata": {"name": "must-have"},
            "spec": spec,
        }
        r.server.create(feed)
        await eventually(lambda: "must-have" in r.gateway.feeds.status())
        await eventually(
            lambda: "required feeds without data: must-have" in (r.gateway.readiness() or "")
        )
        listing.append("bad.test")
        await eventually(lambda: r.gateway.readiness() is None)
    finally:
        await runner.cleanup()
