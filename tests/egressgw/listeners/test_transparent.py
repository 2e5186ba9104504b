"""Tests of the transparent listener. In network namespaces the test makes (a pod namespace
whose TCP the node rules redirect to the gateway, a remote namespace with HTTP and HTTPS
upstreams, real curl with no proxy settings): allowed by Host and by SNI, denied by an address
rule, a spoofed SNI refused, a flow by address allowed by the name the pod resolved through the
gateway's DNS proxy; each flow has its decision event. Over IPv4 and IPv6, two namespaces'
flows reach a remote upstream from their own ``egress_ips`` addresses. In process: a connection
nothing redirected is reset.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from egressgw.app import Gateway
from egressgw.config.model import load_config
from tests.support import field
from tests.support.dnsmasq import dnsmasq_args, dnsmasq_path
from tests.support.netns import NetNs, netns_unavailable
from tests.support.nodegw import run_node_gateway, stop_process

CURL = ["curl", "--noproxy", "*", "-s", "-S", "--max-time", "5"]

# Answers each request with the address it was received on: which upstream the flow reached.
UPSTREAM = """
import http.server, ssl, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: later requests may share the connection
    def do_GET(self):
        if self.path == "/echo":  # grants the upgrade, then echoes bytes until EOF
            self.send_response(101)
            self.send_header("Upgrade", "echo")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while chunk := self.connection.recv(4096):
                self.connection.sendall(chunk)
            self.close_connection = True
            return
        body = ("hello from " + self.connection.getsockname()[0]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
plain = http.server.ThreadingHTTPServer(("0.0.0.0", 80), H)
tls = http.server.ThreadingHTTPServer(("0.0.0.0", 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
threading.Thread(target=tls.serve_forever, daemon=True).start()
print("ready", flush=True)
plain.serve_forever()
"""

POLICY = """
default: deny
tiers:
  - name: platform
    rules:
      - name: good-by-name
        action: allow
        to: {domains: ["good.test"], ports: [80, 443]}
      - name: no-eleven
        action: deny
        to: {cidrs: ["203.0.113.11/32"]}
"""


def sh(*args: str) -> None:
    """Run a command in the test's own namespace; fail the test if it fails."""
    subprocess.run(args, check=True, capture_output=True, timeout=10)


def link(a: NetNs, a_ip: str, b: NetNs, b_ip: str, name: str) -> None:
    """A veth pair between two namespaces with an address (CIDR) on each end, both up."""
    sh("ip", "link", "add", f"{name}a", "netns", a.name, "type", "veth", "peer", f"{name}b",
       "netns", b.name)  # fmt: skip
    for ns, dev, ip in ((a, f"{name}a", a_ip), (b, f"{name}b", b_ip)):
        assert ns.run(["ip", "addr", "add", ip, "dev", dev]).returncode == 0
        assert ns.run(["ip", "link", "set", dev, "up"]).returncode == 0


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[NetNs, Path]]:
    """Pod -> node (gateway, dnsmasq, node rules) -> remote (upstreams on .10 and .11)."""
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    exe = dnsmasq_path()
    if exe is None:
        pytest.skip("dnsmasq is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
       "-nodes", "-subj", "/CN=good.test", "-days", "1",
       "-keyout", str(key), "-out", str(cert))  # fmt: skip
    with ExitStack() as stack:
        gw, pod, remote = (stack.enter_context(NetNs()) for _ in range(3))
        tag = os.getpid() % 10000
        link(pod, "10.99.0.2/24", gw, "10.99.0.1/24", f"tp{tag}")
        link(remote, "203.0.113.10/24", gw, "203.0.113.1/24", f"tr{tag}")
        assert (
            remote.run(["ip", "addr", "add", "203.0.113.11/24", "dev", f"tr{tag}a"]).returncode == 0
        )
        assert pod.run(["ip", "route", "add", "default", "via", "10.99.0.1"]).returncode == 0
        assert remote.run(["ip", "route", "add", "default", "via", "203.0.113.1"]).returncode == 0
        upstream = subprocess.Popen(
            remote.command([sys.executable, "-c", UPSTREAM, str(cert), str(key)]),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        stack.callback(stop_process, upstream)
        assert upstream.stdout is not None
        stack.callback(upstream.stdout.close)
        assert upstream.stdout.readline().strip() == "ready"
        # The gateway's resolver: good.test is 203.0.113.10 (and only that).
        names = dnsmasq_args(exe, 5353, {"good.test": "203.0.113.10"}, {}, extra=["--user=root"])
        dns_proc = subprocess.Popen(gw.command(names), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
        stack.callback(stop_process, dns_proc)
        (tmp_path / "policy.yaml").write_text(POLICY)
        config: dict[str, Any] = {
            "proxy": {"listen": "127.0.0.1:3128"},
            "admin": {"listen": "127.0.0.1:9090"},
            "transparent": {"listen": "0.0.0.0:15001"},
            "dns": {"listen": "0.0.0.0:5300", "upstreams": ["127.0.0.1:5353"]},
            "resolver": {"nameservers": ["127.0.0.1:5353"], "ipv6": False},
            "node": {"pod_cidrs": ["10.99.0.0/24"]},
            "identity": {"static": [{"cidr": "10.99.0.2/32", "namespace": "payments"}]},
            "policy": {"files": ["policy.yaml"]},
            "sinks": [{"type": "file", "path": "events.jsonl"}],
            "reload": {"watch": False},
        }
        run_node_gateway(stack, gw, config, tmp_path)
        yield pod, tmp_path


def decisions(tmp_path: Path, count: int) -> list[dict[str, Any]]:
    """The flow decision events once ``count`` of them are written (fails after 15 s)."""
    file = tmp_path / "events.jsonl"
    deadline = time.monotonic() + 15
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        text = file.read_text() if file.exists() else ""
        events = [json.loads(x) for x in text.splitlines()]
        found = [
            e
            for e in events
            if field(e, "event.action") in ("connection_allowed", "connection_denied")
        ]
        if len(found) >= count:
            return found
        time.sleep(0.1)
    pytest.fail(f"{len(found)} decision events, expected {count}: {found}")


@pytest.mark.netns
@pytest.mark.integration
def test_transparent_flows_are_bound_decided_and_recorded(node: tuple[NetNs, Path]) -> None:
    """Host and SNI allow by name; an address rule denies; a spoofed SNI is refused; all logged."""
    pod, tmp_path = node
    http = pod.run([*CURL, "--resolve", "good.test:80:203.0.113.10", "http://good.test/"])
    assert http.stdout == "hello from 203.0.113.10", http.stderr
    tls = pod.run([*CURL, "-k", "--resolve", "good.test:443:203.0.113.10", "https://good.test/"])
    assert tls.stdout == "hello from 203.0.113.10", tls.stderr
    by_ip = pod.run([*CURL, "http://203.0.113.11/"])
    # Plain HTTP is refused in HTTP, with the reason.
    assert by_ip.stdout == (
        "egressgw: 403 Forbidden: denied by platform/no-eleven (payments -> 203.0.113.11:80)\n"
    ), by_ip.stderr
    spoofed = pod.run(
        [*CURL, "-k", "--resolve", "good.test:443:203.0.113.11", "https://good.test/"]
    )
    assert spoofed.returncode != 0 and spoofed.stdout == ""

    events = decisions(tmp_path, 4)
    assert all(field(e, "source.ip") == "10.99.0.2" for e in events)
    assert all(field(e, "kubernetes.namespace") == "payments" for e in events)
    http_e, tls_e, ip_e, spoof_e = events[:4]
    assert field(http_e, "event.action") == "connection_allowed"
    assert field(http_e, "destination.ip") == "203.0.113.10"
    assert field(http_e, "destination.port") == 80
    assert field(http_e, "destination.domain") == "good.test"
    assert field(http_e, "rule.name") == "good-by-name"
    assert field(tls_e, "event.action") == "connection_allowed"
    assert field(tls_e, "tls.client.server_name") == "good.test"
    assert field(tls_e, "rule.name") == "good-by-name"
    assert field(ip_e, "event.action") == "connection_denied"
    assert field(ip_e, "destination.ip") == "203.0.113.11"
    assert field(ip_e, "rule.name") == "no-eleven"
    assert field(spoof_e, "event.action") == "connection_denied"
    assert field(spoof_e, "destination.ip") == "203.0.113.11"
    assert field(spoof_e, "event.reason").startswith(
        "name good.test is not bound to 203.0.113.11: it resolves to 203.0.113.10"
    )


@pytest.mark.netns
@pytest.mark.integration
def test_a_flow_by_address_is_judged_by_the_name_the_pod_resolved(node: tuple[NetNs, Path]) -> None:
    """No name in the bytes: denied by address, then allowed once the DNS proxy gave it a name."""
    pod, tmp_path = node
    before = pod.run([*CURL, "http://203.0.113.10/"])
    assert before.stdout.startswith("egressgw: 403 Forbidden: denied by policy default"), (
        before.stdout
    )
    # Any DNS server the pod asks: the node rules send port 53 to the gateway's DNS proxy.
    answer = pod.run(["dig", "@192.0.2.53", "+short", "+tries=1", "+time=3", "good.test"])
    assert answer.stdout.strip() == "203.0.113.10", answer.stdout + answer.stderr
    after = pod.run([*CURL, "http://203.0.113.10/"])
    assert after.stdout == "hello from 203.0.113.10", after.stderr

    denied, allowed = decisions(tmp_path, 2)[:2]
    assert field(denied, "event.action") == "connection_denied"
    assert field(denied, "destination.domain") is None
    assert "default" in field(denied, "event.reason")
    assert field(allowed, "event.action") == "connection_allowed"
    assert field(allowed, "destination.domain") == "good.test"
    assert field(allowed, "rule.name") == "good-by-name"


# Requests on one kept-alive connection, each naming the Host given; each one's outcome.
KEEP_ALIVE_CLIENT = """
import http.client, sys
c = http.client.HTTPConnection("203.0.113.10", 80, timeout=5)
out = []
for host in sys.argv[1:]:
    try:
        c.request("GET", "/", headers={"Host": host})
        r = c.getresponse()
        out.append(f"{r.status} {r.read().decode()}")
    except (OSError, http.client.HTTPException) as e:
        out.append(type(e).__name__)
        break
print("|".join(out))
"""

PIPELINED_CLIENT = """
import socket
s = socket.create_connection(("203.0.113.10", 80), timeout=5)
first = b"GET / HTTP/1.1\\r\\nHost: good.test\\r\\n\\r\\n"
s.sendall(first + first.replace(b"good.test", b"other.test"))
got = b""
try:
    while chunk := s.recv(4096):
        got += chunk
except ConnectionResetError:
    got += b"|reset"
print(got.decode(errors="replace"))
"""


@pytest.mark.netns
@pytest.mark.integration
def test_a_later_request_may_not_name_another_host(node: tuple[NetNs, Path]) -> None:
    """Keep-alive goes on under one name; another Host on the same connection is cut before it
    reaches the destination, whether it comes after a response or pipelined behind the first.
    """
    pod, tmp_path = node
    out = pod.run([sys.executable, "-c", KEEP_ALIVE_CLIENT, "good.test", "good.test", "other.test"])
    served = "200 hello from 203.0.113.10"
    outcomes = out.stdout.strip().split("|")
    assert outcomes[:2] == [served, served], out.stdout + out.stderr
    assert len(outcomes) == 3 and not outcomes[2].startswith("200"), out.stdout
    piped = pod.run([sys.executable, "-c", PIPELINED_CLIENT])
    assert "hello from" not in piped.stdout, piped.stdout  # not even the first went out

    allowed, cut, held = decisions(tmp_path, 3)[:3]
    assert field(allowed, "event.action") == "connection_allowed"
    assert field(allowed, "destination.domain") == "good.test"
    for denied in (cut, held):
        assert field(denied, "event.action") == "connection_denied"
        assert field(denied, "destination.domain") == "other.test"
        assert field(denied, "destination.ip") == "203.0.113.10"
        assert field(denied, "kubernetes.namespace") == "payments"
        assert field(denied, "event.reason") == (
            "HTTP Host other.test on a connection bound to good.test: "
            "a new name needs a new connection"
        )


# An Upgrade request to `path`, its answer read, then an HTTP request naming other.test; each
# read printed (or "reset").
UPGRADE_CLIENT = """
import socket, sys, time
s = socket.create_connection(("203.0.113.10", 80), timeout=5)
s.sendall(("GET " + sys.argv[1] + " HTTP/1.1\\r\\nHost: good.test\\r\\n"
           "Connection: Upgrade\\r\\nUpgrade: echo\\r\\n\\r\\n").encode())
time.sleep(0.5)
first = s.recv(4096)
s.sendall(b"GET / HTTP/1.1\\r\\nHost: other.test\\r\\n\\r\\n")
time.sleep(0.5)
try:
    second = s.recv(4096) or b"eof"
except ConnectionResetError:
    second = b"reset"
print(first.split(b"\\r\\n")[0].decode(), "|", second.decode(errors="replace"))
"""


@pytest.mark.netns
@pytest.mark.integration
def test_an_upgrade_the_destination_refuses_carries_no_other_host(
    node: tuple[NetNs, Path],
) -> None:
    """After an Upgrade the destination answers 200 (it still reads HTTP), a request naming
    another host is cut as any later one; after a 101 the bytes are opaque and go through."""
    pod, tmp_path = node
    refused = pod.run([sys.executable, "-c", UPGRADE_CLIENT, "/"])
    first, _, second = refused.stdout.partition(" | ")
    assert first == "HTTP/1.1 200 OK", refused.stdout + refused.stderr
    assert second.strip() in ("reset", "eof"), refused.stdout  # not other.test's answer
    granted = pod.run([sys.executable, "-c", UPGRADE_CLIENT, "/echo"])
    first, _, second = granted.stdout.partition(" | ")
    assert first.startswith("HTTP/1.1 101"), granted.stdout + granted.stderr
    assert second.startswith("GET / HTTP/1.1"), granted.stdout  # echoed, unread by the gateway

    allowed, cut, switched = decisions(tmp_path, 3)[:3]
    assert field(allowed, "event.action") == "connection_allowed"
    assert field(cut, "event.action") == "connection_denied"
    assert field(cut, "destination.domain") == "other.test"
    assert field(switched, "event.action") == "connection_allowed"


SILENT_CLIENT = """
import socket, time
s = socket.create_connection(("203.0.113.10", 80), timeout=5)
start = time.monotonic()
try:
    got = s.recv(100)
except ConnectionResetError:
    got = b"reset"
print(got.decode(), round(time.monotonic() - start))
"""


@pytest.mark.netns
@pytest.mark.integration
def test_a_client_that_sends_nothing_is_decided_by_address_after_the_peek(
    node: tuple[NetNs, Path],
) -> None:
    """A server-first client is decided by address once the peek times out (here: reset)."""
    pod, tmp_path = node
    out = pod.run([sys.executable, "-c", SILENT_CLIENT])
    assert out.stdout.split() == ["reset", "1"], out.stdout + out.stderr
    (denied,) = decisions(tmp_path, 1)
    assert field(denied, "event.action") == "connection_denied"
    assert field(denied, "network.protocol") == "tcp"
    assert field(denied, "destination.ip") == "203.0.113.10"


async def test_a_connection_nothing_redirected_is_reset_and_counted(tmp_path: Path) -> None:
    """Connecting to the port itself has no original destination: reset, counted, forgotten."""
    (tmp_path / "gw.yaml").write_text(
        "proxy: {listen: '127.0.0.1:0'}\n"
        "admin: {listen: '127.0.0.1:0'}\n"
        "transparent: {listen: '127.0.0.1:0'}\n"
        "sinks: [{type: file, path: events.jsonl}]\n"
    )
    gw = Gateway(load_config(tmp_path / "gw.yaml"), tmp_path / "gw.yaml")
    await gw.start()
    try:
        address = gw.transparent_address
        assert address is not None

        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection(*address)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: good.test\r\n\r\n")
                return await reader.read(100)
            finally:
                writer.close()

        # The reset may come before the client saw its connect complete, or after.
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(exchange(), 5)
        assert gw.metrics.errors.get("not_redirected") == 1
        assert not gw.connections
    finally:
        await gw.stop()


# ---- egress source addresses across namespaces ----------------------------------------------

# Answers each request with the address the connection came from: the source the upstream sees.
PEER_UPSTREAM = """
import http.server, socket
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("peer " + self.client_address[0].removeprefix("::ffff:")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
server = S(("::", 80), H)
print("ready", flush=True)
server.serve_forever()
"""

# Per family: the pod's sources (payments, batch, a source no identity names), the pod and node
# ends of their link, the remote upstream and the node's end of that link, the namespaces'
# egress addresses (on the node's remote-facing link), and how an address is written in a URL.
TOPOLOGIES: dict[str, dict[str, Any]] = {
    "ipv4": {
        "pods": ("10.99.0.2", "10.99.0.3", "10.99.0.4"),
        "pod_net": ("10.99.0.{}/24", "10.99.0.1/24", "10.99.0.0/24"),
        "remote": ("203.0.113.10/24", "203.0.113.1/24"),
        "egress": ("203.0.113.101", "203.0.113.102"),
        "listen": "0.0.0.0:15001",
        "url": "http://203.0.113.10/",
        "node_ip": "203.0.113.1",
        "route": ["ip", "route", "add", "default", "via"],
    },
    "ipv6": {
        "pods": ("fd00:99::2", "fd00:99::3", "fd00:99::4"),
        "pod_net": ("fd00:99::{}/64", "fd00:99::1/64", "fd00:99::/64"),
        "remote": ("2001:db8::10/64", "2001:db8::1/64"),
        "egress": ("2001:db8::101", "2001:db8::102"),
        "listen": "[::]:15001",
        "url": "http://[2001:db8::10]/",
        "node_ip": "2001:db8::1",
        "route": ["ip", "-6", "route", "add", "default", "via"],
    },
}


def add_address(ns: NetNs, cidr: str, dev: str, chosen: bool = True) -> None:
    """Add an address to a device, usable at once (no IPv6 duplicate address detection).
    An IPv6 address not ``chosen`` is deprecated: bound to explicitly, never the kernel's pick
    of a source (the way an IPv4 secondary address is not)."""
    extra = ["nodad"] if ":" in cidr else []
    if ":" in cidr and not chosen:
        extra += ["preferred_lft", "0"]
    done = ns.run(["ip", "addr", "add", cidr, "dev", dev, *extra])
    assert done.returncode == 0, done.stderr


@pytest.fixture(params=sorted(TOPOLOGIES))
def egress_node(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[NetNs, Path, dict[str, Any]]]:
    """Pod (three sources) -> node (redirect rules, gateway with egress_ips) -> remote upstream
    that answers with the peer address it sees; IPv4 and IPv6."""
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    topo = TOPOLOGIES[request.param]
    six = request.param == "ipv6"
    with ExitStack() as stack:
        gw, pod, remote = (stack.enter_context(NetNs()) for _ in range(3))
        tag = f"{os.getpid() % 10000}{'s' if six else 'f'}"
        for ns, a, b in ((pod, pod, gw), (remote, remote, gw)):
            name = f"e{'p' if ns is pod else 'r'}{tag}"
            sh("ip", "link", "add", f"{name}a", "netns", a.name, "type", "veth", "peer",
               f"{name}b", "netns", b.name)  # fmt: skip
            for side in (a, b):
                dev = f"{name}a" if side is a else f"{name}b"
                assert side.run(["ip", "link", "set", dev, "up"]).returncode == 0
        pod_dev, gw_pod_dev = f"ep{tag}a", f"ep{tag}b"
        remote_dev, gw_remote_dev = f"er{tag}a", f"er{tag}b"
        host_fmt, gw_pod_cidr, pod_cidr = topo["pod_net"]
        for index in (2, 3, 4):
            add_address(pod, host_fmt.format(index), pod_dev)
        add_address(gw, gw_pod_cidr, gw_pod_dev)
        remote_cidr, gw_remote_cidr = topo["remote"]
        add_address(remote, remote_cidr, remote_dev)
        add_address(gw, gw_remote_cidr, gw_remote_dev)
        prefix = remote_cidr.partition("/")[2]
        for address in topo["egress"]:
            add_address(gw, f"{address}/{prefix}", gw_remote_dev, chosen=False)
        gw_pod_ip, node_ip = gw_pod_cidr.partition("/")[0], topo["node_ip"]
        assert pod.run([*topo["route"], gw_pod_ip]).returncode == 0
        assert remote.run([*topo["route"], node_ip]).returncode == 0
        upstream = subprocess.Popen(
            remote.command([sys.executable, "-c", PEER_UPSTREAM]),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        stack.callback(stop_process, upstream)
        assert upstream.stdout is not None
        stack.callback(upstream.stdout.close)
        assert upstream.stdout.readline().strip() == "ready"
        remote_ip = remote_cidr.partition("/")[0]
        remote_net = str(ipaddress.ip_network(remote_cidr, strict=False))
        (tmp_path / "policy.yaml").write_text(
            "default: deny\ntiers:\n  - name: platform\n    rules:\n"
            "      - name: to-the-upstream\n        action: allow\n"
            f"        to: {{cidrs: ['{remote_ip}/{'128' if six else '32'}'], ports: [80]}}\n"
        )
        payments, batch, _unknown = topo["pods"]
        config: dict[str, Any] = {
            "proxy": {"listen": "127.0.0.1:3128"},
            "admin": {"listen": "127.0.0.1:9090"},
            "transparent": {"listen": topo["listen"]},
            "resolver": {"nameservers": ["127.0.0.1:5353"], "ipv6": six},
            "guard": {"allow": [remote_net]},
            "node": {"pod_cidrs": [pod_cidr]},
            "identity": {
                "static": [
                    {"cidr": str(ipaddress.ip_network(payments)), "namespace": "payments"},
                    {"cidr": str(ipaddress.ip_network(batch)), "namespace": "batch"},
                ]
            },
            "egress_ips": {"payments": topo["egress"][0], "batch": topo["egress"][1]},
            "policy": {"files": ["policy.yaml"]},
            "sinks": [{"type": "file", "path": "events.jsonl"}],
            "reload": {"watch": False},
        }
        run_node_gateway(stack, gw, config, tmp_path)
        yield pod, tmp_path, topo


@pytest.mark.netns
@pytest.mark.integration
def test_each_namespace_leaves_from_its_egress_address(
    egress_node: tuple[NetNs, Path, dict[str, Any]],
) -> None:
    """Redirected flows of two namespaces reach the upstream from each one's egress_ips address,
    a source of no listed namespace from the node's own; the original destination is read for
    IPv4 (SO_ORIGINAL_DST) and IPv6 (IP6T_SO_ORIGINAL_DST)."""
    pod, tmp_path, topo = egress_node
    seen = {}
    for source in topo["pods"]:
        out = pod.run([*CURL, "--interface", source, topo["url"]])
        seen[source] = out.stdout or out.stderr
    payments, batch, unknown = topo["pods"]
    assert seen == {
        payments: f"peer {topo['egress'][0]}",
        batch: f"peer {topo['egress'][1]}",
        unknown: f"peer {topo['node_ip']}",
    }
    events = {field(e, "source.ip"): e for e in decisions(tmp_path, 3)}
    assert field(events[payments], "kubernetes.namespace") == "payments"
    assert field(events[batch], "kubernetes.namespace") == "batch"
    remote_ip = topo["remote"][0].partition("/")[0]
    assert all(field(e, "destination.ip") == remote_ip for e in events.values())
    assert all(field(e, "event.action") == "connection_allowed" for e in events.values())
