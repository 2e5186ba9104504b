"""The DNS proxy in a running gateway: real `dig` as the client, a real dnsmasq as the upstream.

On loopback: the gateway (`egressgw run`) serves DNS on a free port and forwards to dnsmasq;
127.0.0.1 is the static identity payments/api, the contract policy and domain feed judge.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Dnsmasq, Gateway, field, free_port
from tests.support.gateway import dump_yaml

pytestmark = [pytest.mark.integration]

CONTRACT_DIR = Path(__file__).resolve().parents[2] / "integration" / "contract"
LONG = "x" * 250
RECORDS = {
    "allowed.test": "192.0.2.10",
    "cdn.evil.test": "192.0.2.11",
    "evil.test": "192.0.2.12",
    "rebind.test": "10.1.2.3",
}
CNAMES = {"shop.test": "cdn.evil.test"}
BIG_TXT = f"--txt-record=big.test,{LONG},{LONG},{LONG}"


def dig(port: int, *args: str) -> str:
    """Run dig against the gateway's DNS proxy; return its output."""
    done = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+time=3", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return done.stdout + done.stderr


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Gateway, int]]:
    """The gateway with its DNS proxy in front of dnsmasq; yields it and the DNS port."""
    if shutil.which("dig") is None:
        pytest.skip("dig is not installed (Debian package dnsutils)")
    for name in ("policy.yaml", "feed-domains.txt"):
        shutil.copyfile(CONTRACT_DIR / name, tmp_path / name)
    with Dnsmasq(RECORDS, CNAMES, extra=[BIG_TXT]) as upstream:
        dns_port = free_port()
        config: dict[str, Any] = {
            "proxy": {"listen": f"127.0.0.1:{free_port()}"},
            "admin": {"listen": f"127.0.0.1:{free_port()}"},
            "resolver": {"nameservers": [upstream.nameserver]},
            "dns": {"listen": f"127.0.0.1:{dns_port}", "upstreams": [upstream.nameserver]},
            "identity": {
                "static": [
                    {
                        "cidr": "127.0.0.1/32",
                        "namespace": "payments",
                        "pod": "api-1",
                        "labels": {"app": "api"},
                    }
                ]
            },
            "feeds": [{"name": "local-domains", "url": "feed-domains.txt", "format": "lines"}],
            "policy": {"files": ["policy.yaml"]},
            "sinks": [{"type": "file", "path": "events.jsonl"}],
            "reload": {"watch": False},
        }
        path = tmp_path / "egressgw.yaml"
        dump_yaml(config, path)
        with Gateway(path) as gw:
            yield gw, dns_port


def dns_event(gw: Gateway, name: str) -> dict[str, Any]:
    """The DNS event of the (first) query for `name`."""
    return gw.wait_events(lambda e: field(e, "dns.question.name") == name)[0]


def test_allowed_name_is_answered_and_recorded(gateway: tuple[Gateway, int]) -> None:
    """dig gets dnsmasq's address; the event names question, answer, code and the workload."""
    gw, port = gateway
    out = dig(port, "+short", "allowed.test", "A")
    assert out.strip() == "192.0.2.10", out
    e = dns_event(gw, "allowed.test")
    assert field(e, "event.action") == "dns_allowed"
    assert field(e, "dns.response_code") == "NOERROR"
    assert field(e, "dns.resolved_ip") == ["192.0.2.10"]
    assert field(e, "dns.answers")[0]["data"] == "192.0.2.10"
    assert field(e, "network.transport") == "udp"
    assert field(e, "kubernetes.namespace") == "payments"
    assert field(e, "kubernetes.pod.name") == "api-1"


def test_listed_name_gets_nxdomain_with_an_alert(gateway: tuple[Gateway, int]) -> None:
    """A feed-listed name is answered NXDOMAIN; the event names the rule and the feed."""
    gw, port = gateway
    assert "status: NXDOMAIN" in dig(port, "www.evil.test", "A")
    e = dns_event(gw, "www.evil.test")
    assert field(e, "event.action") == "dns_denied"
    assert field(e, "event.kind") == "alert"
    assert field(e, "rule.name") == "block-threat-feeds"
    assert field(e, "threat.feed.name") == "local-domains"
    assert field(e, "dns.response_code") == "NXDOMAIN"


def test_cname_cloaking_is_refused(gateway: tuple[Gateway, int]) -> None:
    """An unlisted name that CNAMEs to a listed one is answered NXDOMAIN."""
    gw, port = gateway
    assert "status: NXDOMAIN" in dig(port, "shop.test", "A")
    e = dns_event(gw, "shop.test")
    assert "cdn.evil.test listed by feed local-domains" in field(e, "event.reason")


def test_private_answer_for_a_public_name_is_refused(gateway: tuple[Gateway, int]) -> None:
    """DNS rebinding: an answer with a guarded address is refused, the guard in the reason."""
    gw, port = gateway
    assert "status: NXDOMAIN" in dig(port, "rebind.test", "A")
    assert field(dns_event(gw, "rebind.test"), "event.reason").startswith(
        "guard: 10.1.2.3 is private"
    )


def test_long_answer_is_truncated_over_udp_and_whole_over_tcp(
    gateway: tuple[Gateway, int],
) -> None:
    """Without EDNS a 770-byte answer comes back with TC set; dig then retries over TCP."""
    gw, port = gateway
    cut = dig(port, "+noedns", "+ignore", "big.test", "TXT")
    assert "flags: qr" in cut and " tc" in cut.split("flags:")[1].split(";")[0], cut
    whole = dig(port, "+noedns", "+short", "big.test", "TXT")
    assert whole.count(LONG) == 3, whole
    tcp = gw.wait_events(
        lambda e: (
            field(e, "dns.question.name") == "big.test" and field(e, "network.transport") == "tcp"
        )
    )
    assert field(tcp[0], "event.action") == "dns_allowed"
