"""Tests of the resolver against an in-process DNS server, on uvloop like the gateway."""

import asyncio
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

import egressgw.resolver as resolver_mod
from egressgw.resolver import Resolution, ResolveError, Resolver
from tests.support.dnsmasq import Dnsmasq, dnsmasq_path
from tests.support.scripted_dns import ScriptedDns

T = TypeVar("T")

LOOKUP_TIMEOUT = 0.5  # the resolver's timeout in these tests: a dead nameserver costs this much
WAIT = 5.0  # no test waits longer for anything; a hang fails the test instead
POLL = 0.05  # seconds between checks of something that happens in the background
FD_SLACK = 5  # descriptors the loop or the server thread may open meanwhile
DEAD_ZONE = "dead.test"  # the scripted server never answers names under it
CHILD_TIMEOUT = 60.0  # for a child process running lookups
REPO_ROOT = Path(__file__).resolve().parents[2]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test body on uvloop, the gateway's loop (its UDP sockets are the ones that leaked)."""
    return uvloop.run(coro)


def open_fds() -> int:
    """Return how many descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


async def eventually(check: Callable[[], bool]) -> bool:
    """Poll `check` until it holds or WAIT has passed; return whether it held."""
    for _ in range(int(WAIT / POLL)):
        if check():
            return True
        await asyncio.sleep(POLL)
    return check()


async def turns(n: int) -> None:
    """Let the loop run `n` times, so started tasks get to their first real await."""
    for _ in range(n):
        await asyncio.sleep(0)


async def cancel_lookups_midway(count: int) -> dict[str, int]:
    """Start `count` lookups of dead names, cancel their callers, and count descriptors."""
    with ScriptedDns({}, unanswered=[DEAD_ZONE]) as dns:
        resolver = Resolver((dns.nameserver,), timeout=LOOKUP_TIMEOUT)
        loop = asyncio.get_running_loop()
        baseline = open_fds()
        callers = [loop.create_task(resolver.resolve(f"n{i}.{DEAD_ZONE}")) for i in range(count)]
        # Two turns: each query is inside dnspython, creating its UDP endpoint, which is where
        # uvloop loses the socket of a cancelled caller.
        await turns(2)
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        await eventually(lambda: open_fds() >= baseline + count)
        peak = open_fds()
        await asyncio.sleep(LOOKUP_TIMEOUT)  # the lookups' own timeout
        await eventually(lambda: open_fds() <= baseline + FD_SLACK)
        return {"baseline": baseline, "peak": peak, "after": open_fds()}


def test_callers_leaving_mid_lookup_leave_no_socket_open() -> None:
    """300 callers cancelled while their lookups are under way leave no descriptor behind."""
    # In a fresh interpreter: descriptors are counted per process, and sockets uvloop lost can
    # also hang its loop's close(), which must fail this test, not stall the suite.
    child = (
        "import json, uvloop\n"
        "from tests.egressgw.test_resolver import cancel_lookups_midway\n"
        "print(json.dumps(uvloop.run(cancel_lookups_midway(300))), flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", child], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        out, _ = proc.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert out, f"the child printed nothing (exit {proc.returncode})"
    counts = json.loads(out.splitlines()[0])
    # The lookups went on after their callers left, with their sockets open...
    assert counts["peak"] >= counts["baseline"] + 300, counts
    # ...and closed every one of them by their own timeout.
    assert counts["after"] <= counts["baseline"] + FD_SLACK, counts
    assert proc.returncode == 0


def test_second_caller_gets_the_answer_when_the_first_leaves() -> None:
    """The first caller of a name leaving does not strand a second one waiting for the same."""

    async def body() -> None:
        with ScriptedDns({"slow.test": ["192.0.2.7"]}, delays={"slow.test": 0.3}) as dns:
            resolver = Resolver((dns.nameserver,), timeout=WAIT, ipv6=False)
            loop = asyncio.get_running_loop()
            first = loop.create_task(resolver.resolve("slow.test"))
            await asyncio.sleep(0.05)
            second = loop.create_task(resolver.resolve("slow.test"))
            await turns(2)
            first.cancel()
            async with asyncio.timeout(WAIT):
                answer = await second
            assert first.cancelled()
            assert [str(ip) for ip in answer.ips] == ["192.0.2.7"]
            assert dns.count("slow.test") == 1  # one query, shared

    run(body())


def test_lookup_left_by_its_only_caller_still_fills_the_cache() -> None:
    """A lookup whose only caller left runs on; the next caller gets its answer from the cache."""

    async def body() -> None:
        with ScriptedDns(
            {"slow.test": ["192.0.2.7"]}, {"slow.test": 60}, delays={"slow.test": 0.2}
        ) as dns:
            resolver = Resolver((dns.nameserver,), timeout=WAIT, ipv6=False)
            loop = asyncio.get_running_loop()
            caller = loop.create_task(resolver.resolve("slow.test"))
            await asyncio.sleep(0.05)
            caller.cancel()
            assert await eventually(lambda: resolver.cached("slow.test", loop.time()) is not None)
            answer = await resolver.resolve("slow.test")
            assert [str(ip) for ip in answer.ips] == ["192.0.2.7"]
            assert dns.count("slow.test") == 1

    run(body())


def test_no_such_name_is_cached_for_negative_ttl() -> None:
    """NXDOMAIN is an answer: it is cached for NEGATIVE_TTL and not asked again meanwhile."""

    async def body() -> None:
        with ScriptedDns({}) as dns:
            resolver = Resolver((dns.nameserver,), timeout=WAIT)
            loop = asyncio.get_running_loop()
            with pytest.raises(ResolveError) as first:
                await resolver.resolve("gone.test")
            stored = loop.time()
            assert first.value.reason == "no such name"
            with pytest.raises(ResolveError) as again:
                await resolver.resolve("gone.test")
            assert again.value is first.value  # one object per TTL: the outcome cache's key
            assert dns.count("gone.test") == 1
            ttl = resolver_mod.NEGATIVE_TTL
            assert resolver.cached("gone.test", stored + ttl - 0.5) is first.value
            assert resolver.cached("gone.test", stored + ttl + 0.5) is None

    run(body())


def test_timeout_is_cached_for_the_shorter_failure_ttl() -> None:
    """A timeout is transient: cached for FAILURE_TTL (shorter than NEGATIVE_TTL), not longer."""

    async def body() -> None:
        with ScriptedDns({}, unanswered=[DEAD_ZONE]) as dns:
            resolver = Resolver((dns.nameserver,), timeout=LOOKUP_TIMEOUT)
            loop = asyncio.get_running_loop()
            name = f"a.{DEAD_ZONE}"
            with pytest.raises(ResolveError) as first:
                await resolver.resolve(name)
            stored = loop.time()
            assert first.value.reason == "timed out"
            queries = dns.count(name)
            with pytest.raises(ResolveError) as again:
                await resolver.resolve(name)
            assert again.value is first.value
            assert dns.count(name) == queries  # a hammering client does not reach the nameserver
            ttl = resolver_mod.FAILURE_TTL
            assert ttl < resolver_mod.NEGATIVE_TTL
            assert resolver.cached(name, stored + ttl - 0.2) is first.value
            assert resolver.cached(name, stored + ttl + 0.2) is None

    run(body())


def test_too_many_lookups_in_flight_refuses_a_new_name() -> None:
    """Beyond max_inflight distinct names a new name is refused with the reason; joining is not."""

    async def body() -> None:
        with ScriptedDns({}, unanswered=[DEAD_ZONE]) as dns:
            resolver = Resolver((dns.nameserver,), timeout=LOOKUP_TIMEOUT, max_inflight=2)
            loop = asyncio.get_running_loop()
            busy = [loop.create_task(resolver.resolve(f"{n}.{DEAD_ZONE}")) for n in "ab"]
            await turns(2)
            with pytest.raises(ResolveError) as refused:
                await resolver.resolve(f"c.{DEAD_ZONE}")
            assert refused.value.reason == "too many lookups in flight"
            assert str(refused.value) == f"dns: c.{DEAD_ZONE}: too many lookups in flight"
            # A refusal says nothing about the name: it is not cached.
            assert resolver.cached(f"c.{DEAD_ZONE}", loop.time()) is None
            joined = loop.create_task(resolver.resolve(f"a.{DEAD_ZONE}"))
            async with asyncio.timeout(WAIT):
                results = await asyncio.gather(*busy, joined, return_exceptions=True)
            assert [r.reason for r in results if isinstance(r, ResolveError)] == ["timed out"] * 3
            with pytest.raises(ResolveError) as later:  # the slots are free again
                await resolver.resolve(f"c.{DEAD_ZONE}")
            assert later.value.reason == "timed out"

    run(body())


def test_one_source_cannot_take_every_lookup() -> None:
    """Past max_inflight_per_source, a source's new names are refused; other sources go on,
    joining a lookup under way is free, and the source's share comes back when its lookups end.
    """

    async def body() -> None:
        with ScriptedDns({"web.test": ["192.0.2.1"]}, unanswered=[DEAD_ZONE]) as dns:
            resolver = Resolver(
                (dns.nameserver,), timeout=LOOKUP_TIMEOUT, ipv6=False, max_inflight_per_source=2
            )
            loop = asyncio.get_running_loop()
            flood = [
                loop.create_task(resolver.resolve(f"{n}.{DEAD_ZONE}", "10.0.0.66")) for n in "ab"
            ]
            await turns(2)
            with pytest.raises(ResolveError) as refused:
                await resolver.resolve(f"c.{DEAD_ZONE}", "10.0.0.66")
            assert refused.value.reason == "too many lookups in flight from 10.0.0.66"
            joined = loop.create_task(resolver.resolve(f"a.{DEAD_ZONE}", "10.0.0.66"))
            other = await resolver.resolve("web.test", "10.0.0.7")
            assert other.ips == (ipaddress.ip_address("192.0.2.1"),)
            async with asyncio.timeout(WAIT):
                await asyncio.gather(*flood, joined, return_exceptions=True)
            with pytest.raises(ResolveError) as later:
                await resolver.resolve(f"c.{DEAD_ZONE}", "10.0.0.66")
            assert later.value.reason == "timed out"

    run(body())


def test_the_cache_evicts_the_least_recently_used_name() -> None:
    """A name in use survives a run of new names that fills the cache; an unused one goes."""

    async def body() -> None:
        names = {f"n{i}.test": ["192.0.2.1"] for i in range(4)}
        with ScriptedDns(names, {n: 60 for n in names}) as dns:
            resolver = Resolver((dns.nameserver,), timeout=WAIT, ipv6=False, cache_size=2)
            loop = asyncio.get_running_loop()
            await resolver.resolve("n0.test")
            await resolver.resolve("n1.test")
            assert resolver.cached("n0.test", loop.time()) is not None  # used: now the newest
            await resolver.resolve("n2.test")
            assert resolver.cached("n0.test", loop.time()) is not None
            assert resolver.cached("n1.test", loop.time()) is None

    run(body())


def test_aclose_cancels_lookups_and_refuses_new_ones() -> None:
    """After aclose() no lookup runs, its waiters are cancelled, and new names are refused."""

    async def body() -> None:
        with ScriptedDns({}, unanswered=[DEAD_ZONE]) as dns:
            resolver = Resolver((dns.nameserver,), timeout=WAIT)
            loop = asyncio.get_running_loop()
            waiter = loop.create_task(resolver.resolve(f"a.{DEAD_ZONE}"))
            await turns(2)
            async with asyncio.timeout(1.0):  # far less than the lookup's own timeout
                await resolver.aclose()
                await asyncio.gather(waiter, return_exceptions=True)
            assert waiter.cancelled()
            with pytest.raises(ResolveError) as refused:
                await resolver.resolve(f"b.{DEAD_ZONE}")
            assert refused.value.reason == "resolver closed"

    run(body())


def test_answers_are_shared_objects() -> None:
    """Callers of one name within its TTL get the same Resolution object (the outcome cache key)."""

    async def body() -> None:
        with ScriptedDns({"web.test": ["192.0.2.1"]}, {"web.test": 60}) as dns:
            resolver = Resolver((dns.nameserver,), timeout=WAIT, ipv6=False)
            first, second = await asyncio.gather(
                resolver.resolve("web.test"), resolver.resolve("web.test")
            )
            third = await resolver.resolve("web.test")
            assert isinstance(first, Resolution)
            assert first is second is third
            assert dns.count("web.test") == 1

    run(body())


def test_raising_a_cached_failure_keeps_its_traceback_short() -> None:
    """A cached error raised to caller after caller does not pile up their frames."""

    def depth(e: BaseException) -> int:
        tb, n = e.__traceback__, 0
        while tb is not None:
            tb, n = tb.tb_next, n + 1
        return n

    async def body() -> list[int]:
        with ScriptedDns({}) as dns:
            resolver = Resolver((dns.nameserver,), timeout=WAIT)
            depths = []
            for _ in range(5):
                with pytest.raises(ResolveError) as raised:
                    await resolver.resolve("gone.test")
                depths.append(depth(raised.value))
            return depths

    depths = run(body())
    assert depths == [depths[0]] * 5, depths


@pytest.mark.skipif(dnsmasq_path() is None, reason="needs dnsmasq (Debian package dnsmasq)")
def test_a_refusing_nameserver_is_named_in_the_reason() -> None:
    """A real dnsmasq answering REFUSED: the reason names the answer and the server."""
    with Dnsmasq({"known.test": "127.0.0.9"}) as server:
        resolver = Resolver((server.nameserver,), timeout=LOOKUP_TIMEOUT)
        with pytest.raises(ResolveError) as caught:
            run(resolver.resolve("elsewhere.example"))
    assert caught.value.reason == f"REFUSED from {server.host}:{server.port}"


@pytest.mark.skipif(dnsmasq_path() is None, reason="needs dnsmasq (Debian package dnsmasq)")
def test_the_hosts_file_is_not_read() -> None:
    """`localhost`, in every hosts file, resolves only if DNS says so (here: it is refused)."""
    with Dnsmasq({"known.test": "127.0.0.9"}) as server:
        resolver = Resolver((server.nameserver,), timeout=LOOKUP_TIMEOUT)
        with pytest.raises(ResolveError) as caught:
            run(resolver.resolve("localhost"))
        assert run(resolver.resolve("known.test")).ips == (ipaddress.ip_address("127.0.0.9"),)
    assert caught.value.reason.startswith("REFUSED from ")
