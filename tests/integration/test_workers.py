"""`proxy.workers: 2` with the real `egressgw run`: one port served by two processes, one event
stream, one set of metrics; reload together, a killed worker replaced, no event lost or doubled.

Clients are curl and raw sockets from the test bed's source addresses: 127.0.0.5 (payments)
may reach allowed.test:8080, 127.0.0.1 (unknown) is refused by the default deny with a 403
written in the callback that decides it (the case where an event could most easily trail its
answer). New connections are spread over the workers by the kernel (SO_REUSEPORT hashes each
connection's addresses), so a few dozen connections reach both.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    Dnsmasq,
    Gateway,
    RawConnection,
    Upstream,
    curl,
    field,
    free_port,
    write_config,
)
from tests.support.gateway import dump_yaml, load_yaml
from tests.support.kube_apiserver import ThreadedKubeApi

from .testbed import ALLOWED_IP, CONTRACT_DIR, HTTP_PORT, PAYMENTS, UNKNOWN

pytestmark = pytest.mark.integration

WAIT = 20.0  # generous: a loaded 2-core machine starts a worker in well under this
POLL = 0.1
ALLOWED_URL = f"http://allowed.test:{HTTP_PORT}/"
ALLOWED_GET = (
    f"GET {ALLOWED_URL} HTTP/1.1\r\nHost: allowed.test:{HTTP_PORT}\r\nConnection: close\r\n\r\n"
).encode()
DENIED_CONNECT = b"CONNECT allowed.test:8443 HTTP/1.1\r\nHost: allowed.test:8443\r\n\r\n"


def metrics(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The gateway's /metrics as {(sample, labels): value}."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{gw.admin_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def metric(gw: Gateway, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent)."""
    return metrics(gw).get((name, tuple(sorted(labels.items()))), 0.0)


def admin_json(gw: Gateway, path: str) -> Any:
    """GET an admin page's JSON without a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{gw.admin_url}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def flows_total(gw: Gateway) -> float:
    """Flows decided by all workers together."""
    return sum(v for (name, _), v in metrics(gw).items() if name == "egressgw_flows_total")


def wait_until(what: str, condition: object, timeout: float = WAIT) -> None:
    """Poll `condition()` until it is true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(POLL)
    pytest.fail(f"not within {timeout}s: {what}")


def worker_pids(gw: Gateway) -> list[int]:
    """The supervisor's child processes (its workers)."""
    assert gw.pid is not None
    children = Path(f"/proc/{gw.pid}/task/{gw.pid}/children").read_text().split()
    return sorted(int(p) for p in children)


def alive(pid: int) -> bool:
    """The process exists and is no zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def gateway(
    tmp_path: Path, dns: Dnsmasq, upstream: Upstream, curl_installed: None
) -> Iterator[Gateway]:
    """The contract gateway with two workers and its SIGHUP/file-watch reloads."""
    config = write_config(
        tmp_path,
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={"proxy": {"workers": 2}, "reload": {"interval": "1s"}},
    )
    gw = Gateway(config, ready_timeout=WAIT)
    try:
        yield gw.start()
    finally:
        gw.stop()


def test_two_workers_share_the_port_with_one_event_stream_and_summed_metrics(
    gateway: Gateway,
) -> None:
    """Requests through one port land in both workers; flows and events add up exactly."""
    pids = worker_pids(gateway)
    assert len(pids) == 2
    made = 40
    for i in range(made):
        source = PAYMENTS if i % 2 else UNKNOWN
        result = curl(ALLOWED_URL, proxy=gateway.proxy_url, interface=source)
        assert result.status == (200 if source == PAYMENTS else 403), result
    # Both workers decided some: each one's events reached the supervisor.
    per_worker = [metric(gateway, "egressgw_worker_events_total", worker=str(i)) for i in (0, 1)]
    assert all(n > 0 for n in per_worker), per_worker
    assert metric(gateway, "egressgw_workers") == 2
    assert metric(gateway, "egressgw_ready") == 1  # once, the supervisor's: not summed
    assert flows_total(gateway) == made
    decisions = gateway.wait_events(
        lambda e: field(e, "event.action") != "connection_ended", count=made, timeout=WAIT
    )
    assert len({field(e, "flow.id") for e in decisions}) == made
    assert len(decisions) == made
    # explain is a worker's answer.
    explained = admin_json(gateway, f"/api/v1/explain?from={PAYMENTS}&to=allowed.test:{HTTP_PORT}")
    assert explained["allowed"] is True, explained


def test_the_egress_map_counts_every_workers_flows_once(gateway: Gateway) -> None:
    """Tunnels decided by both workers: the graph counts each once, the refused ones are listed
    once with increasing seq, filters and errors answer as one process, a stream starts."""
    made = 40
    for i in range(made):  # a new connection each: the kernel spreads them over the workers
        source = PAYMENTS if i % 2 else UNKNOWN
        result = curl(ALLOWED_URL, proxy=gateway.proxy_url, interface=source, tunnel=True)
        assert result.status == (200 if source == PAYMENTS else 403), result
    per_worker = [metric(gateway, "egressgw_worker_events_total", worker=str(i)) for i in (0, 1)]
    assert all(n > 0 for n in per_worker), per_worker

    def graph(query: str = "") -> dict[str, Any]:
        return dict(admin_json(gateway, f"/api/v1/graph?window=5m{query}"))

    def edges(g: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(e["source"]["namespace"], e["destination"]["host"]): e for e in g["edges"]}

    wait_until(
        "every flow on the graph",
        lambda: sum(e["flows"] for e in graph()["edges"]) >= made,
    )
    g = graph()
    got = edges(g)
    assert sum(e["flows"] for e in g["edges"]) == made, g
    allowed, denied = got["payments", "allowed.test"], got["-", "allowed.test"]
    assert (allowed["flows"], allowed["allowed"], allowed["decision"]) == (20, 20, "allowed")
    assert (denied["flows"], denied["denied"], denied["decision"]) == (20, 20, "denied")
    assert denied["reason"] and g["namespaces"] == ["-", "payments"] and g["windows"] == [300, 3600]
    assert g["tracked_edges"] == 2
    assert list(edges(graph("&decision=denied"))) == [("-", "allowed.test")]
    assert list(edges(graph("&namespace=payments"))) == [("payments", "allowed.test")]
    assert urllib_status(f"{gateway.admin_url}/api/v1/graph?window=7m") == 400
    assert urllib_status(f"{gateway.admin_url}/api/v1/graph?decision=maybe") == 400

    flows = admin_json(gateway, "/api/v1/flows?limit=1000")["flows"]
    assert len(flows) == 20 and {f["decision"] for f in flows} == {"denied"}
    assert len({f["id"] for f in flows}) == 20
    seqs = [f["seq"] for f in flows]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == 20
    assert admin_json(gateway, "/api/v1/flows?limit=1000")["flows"] == flows  # asked again
    assert admin_json(gateway, "/api/v1/flows?decision=would_deny")["flows"] == []
    assert len(admin_json(gateway, "/api/v1/flows?limit=5")["flows"]) == 5

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{gateway.admin_url}/api/v1/stream", timeout=WAIT) as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"
        assert stream.readline() == b"event: graph\n"
        event = json.loads(stream.readline().removeprefix(b"data: "))
        assert sum(e["flows"] for e in event["edges"]) == made
        assert stream.readline() == b"\n"
        assert stream.readline() == b"event: flows\n"
        assert len(json.loads(stream.readline().removeprefix(b"data: "))) == 20


def test_refused_flows_stay_listed_once_across_a_worker_restart(gateway: Gateway) -> None:
    """Flows taken from a worker before it is killed stay listed; its successor's flows, numbered
    from 1 again, are added once each, after them in seq."""

    def refused(n: int) -> None:
        for _ in range(n):
            with RawConnection(
                gateway.proxy_host, gateway.proxy_port, source=UNKNOWN, timeout=10
            ) as conn:
                assert conn.request(DENIED_CONNECT).status == 403

    def listed() -> list[dict[str, Any]]:
        return list(admin_json(gateway, "/api/v1/flows?limit=1000")["flows"])

    refused(20)
    wait_until("20 refused flows listed", lambda: len(listed()) == 20)
    before = listed()
    victim = worker_pids(gateway)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        "the killed worker replaced",
        lambda: metric(gateway, "egressgw_workers") == 2 and victim not in worker_pids(gateway),
    )
    wait_until("ready again", lambda: urllib_status(f"{gateway.admin_url}/readyz") == 200)
    refused(20)
    wait_until("40 refused flows listed", lambda: len(listed()) >= 40)
    after = listed()
    assert len(after) == 40 and len({f["id"] for f in after}) == 40
    assert after[20:] == before  # the first twenty kept their numbers
    seqs = [f["seq"] for f in after]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == 40


def test_the_egress_map_answers_404_only_when_it_is_off(
    tmp_path: Path, dns: Dnsmasq, upstream: Upstream
) -> None:
    """With admin.map.enabled false the map's routes answer 404 saying so, with workers too."""
    config = write_config(
        tmp_path,
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={"proxy": {"workers": 2}, "admin": {"map": {"enabled": False}}},
    )
    with Gateway(config, ready_timeout=WAIT) as gw:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for path in ("/api/v1/graph", "/api/v1/flows", "/api/v1/stream"):
            with pytest.raises(urllib.error.HTTPError) as answer:
                opener.open(f"{gw.admin_url}{path}", timeout=10)
            assert answer.value.code == 404, path
            assert b"admin.map.enabled: false" in answer.value.read(), path


def test_a_policy_change_reloads_every_worker_and_counts_once(gateway: Gateway) -> None:
    """After the policy file changes, every request is refused, whichever worker takes it."""
    assert curl(ALLOWED_URL, proxy=gateway.proxy_url, interface=PAYMENTS).status == 200
    policy = gateway.directory / "policy.yaml"
    data = load_yaml(policy)
    data["tiers"].insert(
        0,
        {
            "name": "lockdown",
            "rules": [{"name": "no-psp", "action": "deny", "to": {"domains": ["allowed.test"]}}],
        },
    )
    # Written aside and renamed: the watcher never reads half a file.
    dump_yaml(data, policy.with_suffix(".new"))
    os.replace(policy.with_suffix(".new"), policy)
    wait_until(
        "one reload counted",
        lambda: metric(gateway, "egressgw_reloads_total", result="ok") == 1,
    )
    for _ in range(20):
        result = curl(ALLOWED_URL, proxy=gateway.proxy_url, interface=PAYMENTS)
        assert result.status == 403, result
        assert "lockdown/no-psp" in result.reason
    assert metric(gateway, "egressgw_reloads_total", result="ok") == 1


def test_a_feed_update_is_fetched_once_and_served_by_every_worker(
    tmp_path: Path, dns: Dnsmasq, upstream: Upstream, curl_installed: None
) -> None:
    """A name added to a feed file is refused by both workers; the supervisor read it once."""
    config = write_config(
        tmp_path,
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={
            "proxy": {"workers": 2},
            "feeds": [
                {"name": "local-domains", "url": "feed-domains.txt", "format": "lines", "period": 1}
            ],
        },
    )
    with Gateway(config, ready_timeout=WAIT) as gw:
        assert curl(ALLOWED_URL, proxy=gw.proxy_url, interface=PAYMENTS).status == 200
        updated_before = metric(gw, "feeds_updates_total", feed="local-domains", result="updated")
        feed = gw.directory / "feed-domains.txt"
        feed.with_suffix(".new").write_text(feed.read_text() + "allowed.test\n")
        os.replace(feed.with_suffix(".new"), feed)  # never read half written
        wait_until(
            "the supervisor read the new feed",
            lambda: (
                metric(gw, "feeds_updates_total", feed="local-domains", result="updated")
                > updated_before
            ),
        )

        def refused_by_all() -> bool:
            results = [curl(ALLOWED_URL, proxy=gw.proxy_url, interface=PAYMENTS) for _ in range(12)]
            return all(r.status == 403 and "local-domains" in r.reason for r in results)

        wait_until("every worker refuses the listed name", refused_by_all)
        # One fetch per update, by the supervisor: the workers export no feed metrics of theirs.
        assert metric(gw, "feeds_entries", feed="local-domains") == 3


def test_a_killed_worker_is_replaced_and_counted(gateway: Gateway) -> None:
    """SIGKILL one worker: a new process takes its slot, the restart is counted, all serve."""
    before = worker_pids(gateway)
    os.kill(before[0], signal.SIGKILL)
    wait_until(
        "a new worker and one restart",
        lambda: (
            sum(metric(gateway, "egressgw_worker_restarts_total", worker=str(i)) for i in (0, 1))
            == 1
            and metric(gateway, "egressgw_workers") == 2
        ),
    )
    after = worker_pids(gateway)
    assert len(after) == 2 and before[0] not in after and before[1] in after
    wait_until("ready again", lambda: urllib_status(f"{gateway.admin_url}/readyz") == 200)
    for _ in range(10):
        assert curl(ALLOWED_URL, proxy=gateway.proxy_url, interface=PAYMENTS).status == 200


def test_a_worker_that_stops_answering_is_killed_and_replaced(
    tmp_path: Path, dns: Dnsmasq, upstream: Upstream, curl_installed: None
) -> None:
    """A worker alive but frozen (SIGSTOP: its loop never turns) is killed after
    proxy.worker_liveness_timeout, started again and counted; the gateway serves again."""
    config = write_config(
        tmp_path,
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={"proxy": {"workers": 2, "worker_liveness_timeout": "2s"}},
    )
    gw = Gateway(config, ready_timeout=WAIT).start()
    try:
        before = worker_pids(gw)
        os.kill(before[0], signal.SIGSTOP)
        wait_until(
            "the frozen worker killed and replaced",
            lambda: (
                metric(gw, "egressgw_worker_unresponsive_total", worker="0")
                + metric(gw, "egressgw_worker_unresponsive_total", worker="1")
                == 1
                and metric(gw, "egressgw_workers") == 2
                and before[0] not in worker_pids(gw)
            ),
        )
        assert not alive(before[0])
        assert before[1] in worker_pids(gw)  # the answering one was left alone
        wait_until("ready again", lambda: urllib_status(f"{gw.admin_url}/readyz") == 200)
        for _ in range(10):
            assert curl(ALLOWED_URL, proxy=gw.proxy_url, interface=PAYMENTS).status == 200
    finally:
        gw.stop()


def urllib_status(url: str) -> int:
    """The status of a GET, without a proxy (0 when it fails)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def test_no_event_is_lost_or_doubled_under_load_and_a_killed_worker(gateway: Gateway) -> None:
    """Clients keep connecting while a worker is SIGKILLed: each answered request has its
    decision event, once; requests the kill cut off have at most one."""
    host, port = gateway.proxy_host, gateway.proxy_port
    answered: list[int] = []  # source ports of the requests that got their response
    attempted: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            source, request = (PAYMENTS, ALLOWED_GET) if i % 2 else (UNKNOWN, DENIED_CONNECT)
            try:
                with RawConnection(host, port, source=source, timeout=10) as conn:
                    with lock:
                        attempted.append(conn.local_port)
                    resp = conn.request(request)
                    if resp.status in (200, 403):
                        with lock:
                            answered.append(conn.local_port)
            except (OSError, ConnectionError):
                continue  # a connection the kill (or its accept queue) took

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until("100 answered requests", lambda: len(answered) >= 100, timeout=60)
        victim = worker_pids(gateway)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            "the killed worker replaced",
            lambda: metric(gateway, "egressgw_workers") == 2 and victim not in worker_pids(gateway),
        )
        mark = len(answered)
        wait_until("100 more answered requests", lambda: len(answered) >= mark + 100, timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert (
        metric(gateway, "egressgw_worker_restarts_total", worker="0")
        + metric(gateway, "egressgw_worker_restarts_total", worker="1")
        == 1
    )
    assert gateway.stop() == 0  # the exporter is flushed before the supervisor exits
    decisions = [e for e in gateway.events() if field(e, "event.action") != "connection_ended"]
    ids = [field(e, "event.id") for e in decisions]
    assert len(ids) == len(set(ids)), "an event was written twice"
    flows = {field(e, "flow.id") for e in decisions}
    assert len(flows) == len(decisions), "a flow was decided twice"
    ports = {field(e, "source.port") for e in decisions}
    missing = [p for p in answered if p not in ports]
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no event"
    assert len(answered) <= len(decisions) <= len(attempted)


def test_an_address_in_use_is_reported_once_naming_its_key(tmp_path: Path, dns: Dnsmasq) -> None:
    """The supervisor binds first: a taken proxy port fails the start once, with its key."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path,
            CONTRACT_DIR,
            nameserver=dns.nameserver,
            proxy_port=port,
            overrides={"proxy": {"workers": 2}},
        )
        gw = Gateway(config, ready_timeout=WAIT)
        with pytest.raises(Exception, match="exited with 1") as failed:
            gw.start()
    message = f"proxy.listen 127.0.0.1:{port}: Address already in use"
    assert str(failed.value).count(message) == 1, str(failed.value)


def test_sigterm_stops_every_worker_and_the_supervisor(gateway: Gateway) -> None:
    """SIGTERM: the workers drain and exit, then the supervisor, with status 0."""
    pids = worker_pids(gateway)
    assert curl(ALLOWED_URL, proxy=gateway.proxy_url, interface=PAYMENTS).status == 200
    assert gateway.stop() == 0
    assert not any(alive(p) for p in pids)
    assert gateway.wait_events(lambda e: field(e, "event.action") == "connection_ended")


def listening(port: int) -> int:
    """How many sockets listen on 127.0.0.1:`port` (the kernel's table of this namespace)."""
    wanted = f"0100007F:{port:04X}"
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[1] == wanted and row.split()[3] == "0A")


def test_each_worker_listens_on_the_proxy_and_the_transparent_port(
    tmp_path: Path, dns: Dnsmasq
) -> None:
    """Two listening sockets per port, the workers'; the supervisor's reservations never listen."""
    transparent = free_port()
    config = write_config(
        tmp_path,
        CONTRACT_DIR,
        nameserver=dns.nameserver,
        overrides={
            "proxy": {"workers": 2},
            "transparent": {"listen": f"127.0.0.1:{transparent}"},
        },
    )
    with Gateway(config, ready_timeout=WAIT) as gw:
        assert listening(gw.proxy_port) == 2
        assert listening(transparent) == 2
        assert metric(gw, "egressgw_workers") == 2


class _FeedServer(http.server.BaseHTTPRequestHandler):
    """Serves one feed of IPs and counts the fetches."""

    fetches = 0
    body = b""

    def do_GET(self) -> None:
        type(self).fetches += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_threatfeed_resource_is_fetched_by_the_supervisor_and_served_by_every_worker(
    tmp_path: Path, dns: Dnsmasq, upstream: Upstream, curl_installed: None
) -> None:
    """Workers watching a ThreatFeed name it to the supervisor, which fetches it; both workers
    then refuse what it lists. Deleted, it is served by none."""
    handler = type("Feed", (_FeedServer,), {"body": f"{ALLOWED_IP}\n".encode(), "fetches": 0})
    feed_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=feed_server.serve_forever, daemon=True).start()
    threaded = ThreadedKubeApi(tmp_path / "api")
    try:
        with threaded as api:
            (tmp_path / "policy.yaml").write_text("default: allow\ntiers: [{name: security}]\n")
            config = tmp_path / "egressgw.yaml"
            dump_yaml(
                {
                    "proxy": {"listen": f"127.0.0.1:{free_port()}", "workers": 2},
                    "admin": {"listen": f"127.0.0.1:{free_port()}"},
                    "resolver": {"nameservers": [dns.nameserver]},
                    "guard": {"allow": ["127.0.0.0/8"]},
                    "identity": {"kubernetes": {"kubeconfig": str(api.kubeconfig)}},
                    "policy": {"files": ["policy.yaml"], "kubernetes": True},
                    "sinks": [{"type": "file", "path": "events.jsonl"}],
                },
                config,
            )
            threaded.call(
                api.create,
                {
                    "apiVersion": "egressgw.io/v1alpha1",
                    "kind": "ThreatFeed",
                    "metadata": {"name": "local-bad"},
                    "spec": {
                        "url": f"http://127.0.0.1:{feed_server.server_port}/ips",
                        "format": "lines",
                        "special_ranges": "keep",
                    },
                },
            )
            threaded.call(
                api.create,
                {
                    "apiVersion": "egressgw.io/v1alpha1",
                    "kind": "GlobalEgressPolicy",
                    "metadata": {"name": "block-feed"},
                    "spec": {
                        "tier": "security",
                        "rules": [
                            {"name": "bad", "action": "deny", "to": {"feeds": ["local-bad"]}}
                        ],
                    },
                },
            )
            with Gateway(config, ready_timeout=WAIT) as gw:

                def all_refused() -> bool:
                    results = [curl(ALLOWED_URL, proxy=gw.proxy_url) for _ in range(12)]
                    return all(r.status == 403 and "local-bad" in r.reason for r in results)

                wait_until("both workers refuse what the ThreatFeed lists", all_refused)
                assert handler.fetches >= 1
                assert metric(gw, "feeds_entries", feed="local-bad") == 1
                threaded.call(api.delete, "ThreatFeed", "local-bad")

                def all_allowed() -> bool:
                    results = [curl(ALLOWED_URL, proxy=gw.proxy_url) for _ in range(12)]
                    return all(r.status == 200 for r in results)

                wait_until("no worker serves the deleted feed", all_allowed)
                wait_until(
                    "the supervisor dropped it",
                    lambda: ("feeds_entries", (("feed", "local-bad"),)) not in metrics(gw),
                )
    finally:
        feed_server.shutdown()
        feed_server.server_close()
