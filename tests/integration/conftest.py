"""Fixtures of the integration tests: one test CA and one dnsmasq per session; the echo
upstreams per module.

The upstreams bind fixed loopback addresses (the contract policy names their
ports), so a machine-wide lock lets one test module of one test run hold them
at a time: a second run waits at module boundaries instead of failing. Gateways
are module-scoped fixtures of each test module (each needs its own config).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import BlackHole, Dnsmasq, TlsFiles, Upstream, machine_lock, make_test_pki

from .testbed import BLACKHOLE_IP, DNS_CNAMES, DNS_RECORDS, HTTPS_PORT, UPSTREAM_LISTENERS


def require(program: str, package: str) -> None:
    """Skip the calling test when `program` is not installed, naming the Debian package."""
    if shutil.which(program) is None and not Path(f"/usr/sbin/{program}").exists():
        pytest.skip(f"{program} is not installed (Debian package {package})")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A test CA and a server certificate for the test names."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def dns() -> Iterator[Dnsmasq]:
    """dnsmasq serving the test bed names on a free port of 127.0.0.1."""
    require("dnsmasq", "dnsmasq")
    with Dnsmasq(DNS_RECORDS, DNS_CNAMES) as server:
        yield server


@pytest.fixture(scope="module")
def upstream(pki: TlsFiles) -> Iterator[Upstream]:
    """Echo upstreams on the test bed's fixed addresses, held by one test module at a time."""
    with machine_lock("upstreams"), Upstream(UPSTREAM_LISTENERS, pki) as servers:
        yield servers


@pytest.fixture(scope="session")
def curl_installed() -> None:
    """Skip the test when curl is not installed."""
    require("curl", "curl")


@pytest.fixture(scope="module")
def blackhole(upstream: Upstream) -> Iterator[BlackHole]:
    """slow.partner.test:8443 (127.0.0.33): connects to it hang until the client gives up."""
    with BlackHole(BLACKHOLE_IP, HTTPS_PORT) as hole:
        yield hole
