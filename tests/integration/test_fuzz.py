"""The whole gateway under mutated traffic from both sides, then checked for what it left behind.

One real gateway process gets a fixed, seeded set of mutated client cases
(pipelined absolute-form requests with hostile framing and odd headers,
CONNECT tunnels with TLS or plain payload, byte flips, splits at random byte
boundaries, half-closes, closes and resets) while a scripted upstream answers
each request by the tag in its path with a mutated response (bad, huge or
unterminated heads, wrong lengths, extra responses, 1xx, 101, unknown transfer
codings, early close, reset, silence). The run happens once per module; each
test then checks one thing it must not have broken. A failure names the case
ids, and `mutation.client_case(random.Random(SEED)...)` regenerates them.
"""

from __future__ import annotations

import random
import re
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support import Gateway, ScriptedDns, raw_request, write_config
from tests.support.mutation import Targets, client_case, response_kind
from tests.support.playback import CaseResult, play_cases, response_problems, unexplained_traffic
from tests.support.procfs import (
    labelled_metric,
    metric,
    open_fds,
    rss_bytes,
    settle,
    socket_peers,
)
from tests.support.scripted_upstream import Role, ScriptedUpstream, UpstreamConnection

from .testbed import CONTRACT_DIR, PAYMENTS

pytestmark = pytest.mark.integration

SEED = 20261204
CASES = 360
CONCURRENCY = 24
FUZZ_IP = "127.0.0.71"  # policy allows it, on one port for requests and one for tunnels
FORBIDDEN_IP = "127.0.0.72"  # policy refuses it: nothing may ever reach it
LIMITS = {
    "head_timeout": "2s",
    "idle_timeout": "2s",
    "connect_timeout": "2s",
    "response_timeout": "2s",
}
# Every state of a connection is bounded by 2 s above: what is still open after the sweep, event
# flushing and a loaded machine's slack is left on the books for good.
SETTLE_TIMEOUT = 15.0
MAX_RSS = 150 * 1024 * 1024
RSS_SAMPLE_INTERVAL = 0.1
NORMAL_REQUESTS = 5
NORMAL_MEDIAN = 0.1
NORMAL_TIMEOUT = 2.0
SHOWN_PROBLEMS = 8
CASE_TEXT = 1500
FATAL_STDERR = ("Traceback", "exception was never retrieved")
ERROR_LOG = re.compile(r'"level": ?"(error|critical)"')


@dataclass
class FuzzRun:
    """The gateway, the upstream and everything measured around the run."""

    gateway: Gateway
    upstream: ScriptedUpstream
    targets: Targets
    results: list[CaseResult]
    fds_before: dict[int, str]
    peak_rss: int
    seconds: float


def fuzz_policy(targets: Targets) -> str:
    """Return a policy tier allowing payments to the fuzz upstream: requests on one port,
    tunnels on the other (so every upstream connection has exactly one explanation)."""
    return f"""\
tiers:
  - name: fuzz
    rules:
      - name: fuzz-requests
        action: allow
        from: {{namespace: payments}}
        to: {{cidrs: ["{FUZZ_IP}/32"], ports: [{targets.http_port}], protocols: [http]}}
      - name: fuzz-tunnels
        action: allow
        from: {{namespace: payments}}
        to: {{cidrs: ["{FUZZ_IP}/32"], ports: [{targets.tunnel_port}], protocols: [tcp, tls]}}
"""


def free_port_pair() -> tuple[int, int]:
    """Return two ports free on both the fuzz and the forbidden address."""
    ports: list[int] = []
    while len(ports) < 2:
        with socket.socket() as a, socket.socket() as b:
            a.bind((FUZZ_IP, 0))
            port = a.getsockname()[1]
            try:
                b.bind((FORBIDDEN_IP, port))
            except OSError:
                continue
            ports.append(port)
    return ports[0], ports[1]


def normal_request(gw: Gateway, port: int) -> tuple[int, float]:
    """Return the status and seconds of one plain GET through the gateway on a new connection."""
    started = time.monotonic()
    reply, _ = raw_request(
        gw.proxy_host,
        gw.proxy_port,
        f"GET http://fuzz.test:{port}/ok HTTP/1.1\r\nHost: fuzz.test:{port}\r\n\r\n".encode(),
        source=PAYMENTS,
        timeout=NORMAL_TIMEOUT,
    )
    return reply.status, time.monotonic() - started


def active_connections(gw: Gateway) -> float:
    """Return the gateway's egressgw_active_connections gauge."""
    return metric(gw.admin_url, "egressgw_active_connections")


class PeakRss:
    """Samples a process's RSS in a thread while the context is open; `peak` is the largest."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzRun]:
    """Start DNS, upstream and gateway, play every case once, and keep the measurements."""
    http_port, tunnel_port = free_port_pair()
    targets = Targets(
        http_port=http_port,
        tunnel_port=tunnel_port,
        allowed_names=["fuzz.test", FUZZ_IP, "FUZZ.test.", f"[::ffff:{FUZZ_IP}]"],
        refused_names=["evil.test", "denied.test", FORBIDDEN_IP, "nx.test", "0x7f000048"],
    )
    roles = [
        Role(FUZZ_IP, http_port, "http"),
        Role(FUZZ_IP, tunnel_port, "tunnel"),
        Role(FORBIDDEN_IP, http_port, "forbidden"),
        Role(FORBIDDEN_IP, tunnel_port, "forbidden"),
    ]
    # evil.test is feed-listed but points at the allowed address: only the feed can refuse it.
    answers = {"fuzz.test": [FUZZ_IP], "evil.test": [FUZZ_IP], "denied.test": [FORBIDDEN_IP]}
    rng = random.Random(SEED)
    cases = [client_case(rng, i, targets) for i in range(CASES)]
    with ScriptedDns(answers) as dns, ScriptedUpstream(roles) as upstream:
        path = write_config(
            tmp_path_factory.mktemp("gw-fuzz"),
            CONTRACT_DIR,
            nameserver=dns.nameserver,
            overrides={
                "proxy": LIMITS,
                "policy": {"files": ["policy.yaml", "fuzz-policy.yaml"]},
            },
            extra_files={"fuzz-policy.yaml": fuzz_policy(targets)},
        )
        with Gateway(path) as gw:
            assert gw.pid is not None
            # Warm up every path once, so lazily opened descriptors count in the baseline.
            assert normal_request(gw, http_port)[0] == 200
            tunnel = f"{FUZZ_IP}:{tunnel_port}"
            reply, _ = raw_request(
                gw.proxy_host,
                gw.proxy_port,
                f"CONNECT {tunnel} HTTP/1.1\r\nHost: {tunnel}\r\n\r\n".encode(),
                source=PAYMENTS,
            )
            assert reply.status == 200
            settle(lambda: active_connections(gw), lambda n: n == 0, SETTLE_TIMEOUT)
            fds_before = open_fds(gw.pid)
            upstream.clear()
            started = time.monotonic()
            with PeakRss(gw.pid) as rss:
                results = play_cases(cases, gw.proxy_host, gw.proxy_port, PAYMENTS, CONCURRENCY)
            seconds = time.monotonic() - started
            yield FuzzRun(gw, upstream, targets, results, fds_before, rss.peak, seconds)


def show(results: list[CaseResult], problems: dict[int, list[str]]) -> str:
    """Return the first problems with the cases that caused them."""
    by_id = {r.case.case_id: r for r in results}
    out = []
    for case_id, found in list(problems.items())[:SHOWN_PROBLEMS]:
        result = by_id[case_id]
        answers = [response_kind(tag) for tag in result.case.tags]
        out.append(
            f"{found}\n  upstream answers {answers}; "
            f"ended {result.ending} after {result.seconds:.2f}s; received "
            f"{result.received[:400]!r}\n  {result.case.describe()[:CASE_TEXT]}"
        )
    return f"{len(problems)} cases:\n" + "\n".join(out)


def test_clients_get_well_formed_responses_to_their_own_requests(run: FuzzRun) -> None:
    """Every client gets HTTP/1.1 responses (no 101, no junk), and upstream answers only to
    requests it sent itself, each once: no extra, stale or foreign response is relayed."""
    problems = {r.case.case_id: p for r in run.results if (p := response_problems(r))}
    assert not problems, show(run.results, problems)


def test_no_connections_left_on_the_books(run: FuzzRun) -> None:
    """Once every client has gone, the connections and tunnels gauges are back to zero."""
    gw = run.gateway
    open_now = settle(lambda: active_connections(gw), lambda n: n == 0, SETTLE_TIMEOUT)
    tunnels = metric(gw.admin_url, "egressgw_active_tunnels")
    assert (open_now, tunnels) == (0, 0)


def test_no_descriptors_leaked(run: FuzzRun) -> None:
    """Once every client has gone, the gateway holds no more descriptors than before the run."""
    pid = run.gateway.pid
    assert pid is not None
    after = settle(lambda: open_fds(pid), lambda fds: len(fds) <= len(run.fds_before), 8.0)
    peers = socket_peers(pid)
    extra = {
        fd: peers.get(target, f"{target}: in no tcp/udp table (never bound or connected)")
        for fd, target in after.items()
        if run.fds_before.get(fd) != target
    }
    assert len(after) <= len(run.fds_before), (
        f"{len(run.fds_before)} descriptors before, {len(after)} after; new: {extra}"
    )


def test_memory_stays_bounded(run: FuzzRun) -> None:
    """The gateway's resident memory stayed under 150 MB throughout the run."""
    assert run.peak_rss < MAX_RSS, f"peak RSS {run.peak_rss / 2**20:.0f} MiB"


def test_no_tracebacks_or_unretrieved_exceptions(run: FuzzRun) -> None:
    """The gateway logged no traceback, no unretrieved task/future exception, no error record."""
    stderr = run.gateway.stderr()
    fatal = [s for s in FATAL_STDERR if s in stderr]
    errors = [line for line in stderr.splitlines() if ERROR_LOG.search(line)]
    internal = labelled_metric(run.gateway.admin_url, "egressgw_errors_total", 'kind="internal"')
    assert not fatal and not errors and internal == 0, (
        f"{fatal} internal={internal}\n" + "\n".join(errors[:10]) + "\n" + stderr[-6000:]
    )


def test_still_serves_normal_requests_at_once(run: FuzzRun) -> None:
    """After the run a plain request is answered 200, in milliseconds."""
    outcomes = [normal_request(run.gateway, run.targets.http_port) for _ in range(NORMAL_REQUESTS)]
    assert all(status == 200 for status, _ in outcomes), outcomes
    assert statistics.median(s for _, s in outcomes) < NORMAL_MEDIAN, outcomes


def test_nothing_reaches_an_upstream_undecided(run: FuzzRun) -> None:
    """Every request and tunnel that reached an upstream matches an allowed decision event."""
    gw = run.gateway

    def problems() -> list[str]:
        connections: list[UpstreamConnection] = run.upstream.snapshot()
        return unexplained_traffic(connections, gw.events())

    found = settle(problems, lambda p: not p, SETTLE_TIMEOUT)
    assert not found, f"{len(found)} unexplained:\n" + "\n".join(found[:20])
