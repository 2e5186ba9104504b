"""The test support itself: parsers, dnsmasq answers, echo upstreams, curl and raw clients."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from tests.support import (
    Dnsmasq,
    Gateway,
    GatewayError,
    RawConnection,
    TlsFiles,
    Upstream,
    curl,
    field,
    free_port,
    header_names,
    header_value,
    machine_lock,
    parse_response,
    wait_for_port,
    wait_http_ok,
    write_config,
)
from tests.support.clients import parse_header_blocks
from tests.support.dnsmasq import local_zones
from tests.support.gateway import load_yaml
from tests.support.scripted_dns import answer_query

from .testbed import ALLOWED_IP, CONTRACT_DIR, EVIL_IP, HTTP_PORT, HTTPS_PORT


def test_parse_response_content_length() -> None:
    """A response with Content-Length is complete only once the whole body arrived."""
    raw = b"HTTP/1.1 403 Forbidden\r\nX-Egressgw-Reason: default\r\nContent-Length: 5\r\n\r\nnope\n"
    assert parse_response(raw[:-1]) is None
    parsed = parse_response(raw + b"HTTP/1.1")
    assert parsed is not None
    resp, used = parsed
    assert (resp.status, resp.reason, resp.body, used) == (403, "default", b"nope\n", len(raw))


def test_parse_response_chunked_and_eof() -> None:
    """Chunked bodies are decoded; a body without length runs to EOF."""
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    parsed = parse_response(chunked)
    assert parsed is not None and parsed[0].body == b"abcde" and parsed[1] == len(chunked)
    assert parse_response(chunked[:-2]) is None
    until_eof = b"HTTP/1.0 200 OK\r\n\r\nall of it"
    assert parse_response(until_eof) is None
    parsed = parse_response(until_eof, eof=True)
    assert parsed is not None and parsed[0].body == b"all of it"


def test_parse_response_rejects_garbage() -> None:
    """Bytes that are not an HTTP/1.x response raise ValueError."""
    with pytest.raises(ValueError, match="status line"):
        parse_response(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(ValueError, match="truncated"):
        parse_response(b"HTTP/1.1 200", eof=True)


def test_parse_header_blocks_keeps_each_response() -> None:
    """curl's header dump of a CONNECT then a response gives two blocks, last one last."""
    dump = b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK\r\nVia: 1.1 x\r\n\r\n"
    blocks = parse_header_blocks(dump)
    assert [b[0] for b in blocks] == ["HTTP/1.1 200 Connection established", "HTTP/1.1 200 OK"]
    assert blocks[1][1] == {"via": "1.1 x"}


def test_field_reads_nested_and_dotted_keys() -> None:
    """ECS fields are found whether the event nests objects or uses dotted keys."""
    event = {"event": {"action": "connection_denied"}, "kubernetes.labels": {"app": "api"}}
    assert field(event, "event.action") == "connection_denied"
    assert field(event, "kubernetes.labels.app") == "api"
    assert field(event, "source.ip") is None


def test_local_zones_are_top_level_labels() -> None:
    """dnsmasq answers alone for the top-level labels of the names it serves."""
    assert local_zones(["a.test", "B.TEST.", "x.example"]) == ["example", "test"]


def test_write_config_points_the_contract_at_the_test_bed(tmp_path: Path) -> None:
    """The written config keeps the contract's identity and policy but uses test ports and DNS."""
    path = write_config(
        tmp_path, CONTRACT_DIR, nameserver="127.0.0.1:5999", overrides={"guard": {"allow": []}}
    )
    config = load_yaml(path)
    assert config["resolver"]["nameservers"] == ["127.0.0.1:5999"]
    assert config["sinks"] == [{"type": "file", "path": "events.jsonl"}]
    assert config["guard"] == {"allow": []}
    assert config["proxy"]["listen"].startswith("127.0.0.1:")
    assert config["identity"] == load_yaml(CONTRACT_DIR / "egressgw.yaml")["identity"]
    assert (tmp_path / "policy.yaml").read_text() == (CONTRACT_DIR / "policy.yaml").read_text()


@pytest.mark.integration
def test_dnsmasq_answers_records_and_cnames(dns: Dnsmasq) -> None:
    """dnsmasq answers the test names, follows CNAMEs and says NXDOMAIN for unknown names."""
    if shutil.which("dig") is None:
        pytest.skip("dig is not installed (Debian package dnsutils)")

    def dig(name: str, rtype: str = "A") -> str:
        out = subprocess.run(
            [
                "dig",
                "+short",
                "+time=2",
                "+tries=1",
                f"@{dns.host}",
                "-p",
                str(dns.port),
                name,
                rtype,
            ],
            capture_output=True,
            check=True,
            timeout=10,
        )
        return out.stdout.decode()

    assert dig("allowed.test").split() == [ALLOWED_IP]
    assert dig("cname.allowed.test").split() == ["evil.test.", EVIL_IP]
    assert dig("allowed.test", "AAAA").split() == []
    full = subprocess.run(
        ["dig", f"@{dns.host}", "-p", str(dns.port), "nothing.test"],
        capture_output=True,
        check=True,
        timeout=10,
    ).stdout.decode()
    assert "status: NXDOMAIN" in full


@pytest.mark.integration
def test_dnsmasq_stops_by_pid() -> None:
    """Leaving the context stops dnsmasq: its process is gone."""
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed (Debian package dnsmasq)")
    with Dnsmasq({"x.test": "127.0.0.40"}) as server:
        pid = server.pid
        assert pid is not None
        wait_for_port("127.0.0.1", server.port, 1)
    assert server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.integration
def test_upstream_echoes_a_chunked_post(upstream: Upstream, curl_installed: None) -> None:
    """The HTTP upstream echoes method, target, Host, headers and the length of a chunked body."""
    result = curl(
        f"http://{ALLOWED_IP}:{HTTP_PORT}/echo?q=1",
        method="POST",
        headers={"Transfer-Encoding": "chunked", "X-Test": "yes"},
        data=b"x" * 1000,
    )
    echo = result.json()
    assert result.status == 200
    assert (echo["method"], echo["target"], echo["body_length"]) == ("POST", "/echo?q=1", 1000)
    assert echo["host"] == f"{ALLOWED_IP}:{HTTP_PORT}"
    assert header_value(echo, "x-test") == "yes"
    assert header_value(echo, "transfer-encoding") == "chunked"
    assert echo in upstream.requests_to(ALLOWED_IP, HTTP_PORT)


@pytest.mark.integration
def test_upstream_https_is_trusted_with_the_test_ca(
    upstream: Upstream, pki: TlsFiles, curl_installed: None
) -> None:
    """curl trusts the HTTPS upstream for a test name through --cacert, and only with it."""
    resolve = ["--resolve", f"www.allowed.test:{HTTPS_PORT}:{ALLOWED_IP}"]
    url = f"https://www.allowed.test:{HTTPS_PORT}/tls"
    result = curl(url, cacert=pki.ca_cert, extra=resolve)
    assert result.status == 200 and result.json()["tls"] is True
    untrusted = curl(url, extra=resolve)
    assert untrusted.status == 0 and untrusted.exit_code == 60


@pytest.mark.integration
def test_upstream_keeps_the_connection_alive(upstream: Upstream) -> None:
    """Two requests on one connection are both answered, and the status can be chosen."""
    with RawConnection(ALLOWED_IP, HTTP_PORT) as conn:
        first = conn.request(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
        second = conn.request(b"GET /b?status=418 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert first.status == 200 and json.loads(first.body)["path"] == "/a"
    assert second.status == 418 and "host" in header_names(json.loads(second.body))


@pytest.mark.integration
def test_curl_reports_source_address_and_port(upstream: Upstream, curl_installed: None) -> None:
    """curl --interface picks the source address, and the result names the local port used."""
    result = curl(f"http://{ALLOWED_IP}:{HTTP_PORT}/", interface="127.0.0.5")
    assert result.local_ip == "127.0.0.5" and result.local_port > 0


def test_free_port_is_bindable() -> None:
    """free_port returns a port that can be bound right away."""
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert port > 0


def test_machine_lock_waits_for_the_holder() -> None:
    """A second holder of the same machine lock times out while the first holds it."""
    with (
        machine_lock("self-test"),
        pytest.raises(TimeoutError, match="held by another test run"),
        machine_lock("self-test", timeout=0.2),
    ):
        pass
    with machine_lock("self-test", timeout=0.2):
        pass


@pytest.mark.integration
def test_gateway_that_cannot_start_fails_with_its_stderr(tmp_path: Path, dns: Dnsmasq) -> None:
    """A config the gateway refuses makes Gateway.start raise GatewayError quoting its stderr."""
    path = write_config(
        tmp_path, CONTRACT_DIR, nameserver=dns.nameserver, overrides={"no_such_key": 1}
    )
    with pytest.raises(GatewayError, match="no_such_key"):
        Gateway(path, ready_timeout=10).start()


def test_scripted_dns_answers_in_script_order() -> None:
    """The n-th A query gets the n-th scripted answer (the last repeats); others get no data."""
    query = dns.message.make_query("rebind.test", "A")
    answers = {"rebind.test": ["127.0.0.30", "127.0.0.99"]}
    for seen, expected in [(0, "127.0.0.30"), (1, "127.0.0.99"), (5, "127.0.0.99")]:
        wire, name, rtype = answer_query(query.to_wire(), answers, seen, {"rebind.test": 7})
        reply = dns.message.from_wire(wire)
        assert (name, rtype) == ("rebind.test", "A")
        assert [(rr.to_text(), reply.answer[0].ttl) for rr in reply.answer[0]] == [(expected, 7)]
    aaaa, _, _ = answer_query(
        dns.message.make_query("rebind.test", "AAAA").to_wire(), answers, 0, {}
    )
    assert dns.message.from_wire(aaaa).answer == []
    missing, _, _ = answer_query(dns.message.make_query("x.test", "A").to_wire(), answers, 0, {})
    assert dns.message.from_wire(missing).rcode() == dns.rcode.NXDOMAIN


@pytest.mark.integration
def test_upstream_delay_and_status_parameters(upstream: Upstream) -> None:
    """?delay=S answers after S seconds and ?status=N with status N."""
    started = time.monotonic()
    with RawConnection(ALLOWED_IP, HTTP_PORT) as conn:
        reply = conn.request(b"GET /d?delay=0.3&status=503 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert reply.status == 503
    assert time.monotonic() - started >= 0.3


@pytest.mark.integration
def test_wait_http_ok_passes_on_200_and_times_out_otherwise(upstream: Upstream) -> None:
    """wait_http_ok returns once the URL answers 200 and raises TimeoutError naming the status."""
    wait_http_ok(f"http://{ALLOWED_IP}:{HTTP_PORT}/ready", timeout=2)
    with pytest.raises(TimeoutError, match="last: 503"):
        wait_http_ok(f"http://{ALLOWED_IP}:{HTTP_PORT}/?status=503", timeout=0.3)
    with pytest.raises(TimeoutError, match="last: 0"):
        wait_http_ok(f"http://127.0.0.1:{free_port()}/", timeout=0.3)
