"""The pure cores of the gateway import no I/O: no sockets, TLS, event loop or HTTP library."""

import json
import subprocess
import sys

import pytest

PURE = [
    "egressgw.decision.policy",
    "egressgw.decision.verdict",
    "egressgw.decision.guard",
    "egressgw.decision.names",
    "egressgw.wire.tlshello",
    "egressgw.record.events",
    "egressgw.identity.workload",
    "egressgw.identity.static",
    "egressgw.wire.responses",
    "egressgw.wire.framing",
    "egressgw.wire.dnsmsg",
    "egressgw.decision.answers",
    "egressgw.decision.dnsanswer",
    "egressgw.record.dnsevents",
    "egressgw.node",
    "egressgw.egress",
]
IO_MODULES = {"asyncio", "socket", "ssl", "aiohttp", "httptools", "uvloop", "dns.asyncresolver"}
# dnspython's dns.inet (under dns.message) imports socket for its AF_INET/AF_INET6 constants;
# the DNS cores use messages only, and no I/O module beyond that one is loaded.
LOADED_BY_DNSPYTHON = {"socket"}
DNS_CORES = {"egressgw.wire.dnsmsg", "egressgw.decision.dnsanswer", "egressgw.record.dnsevents"}


@pytest.mark.parametrize("module", PURE)
def test_pure_core_imports_no_io(module: str) -> None:
    """Importing the module alone (in a fresh interpreter) loads none of the I/O modules."""
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    forbidden = IO_MODULES - LOADED_BY_DNSPYTHON if module in DNS_CORES else IO_MODULES
    assert not (loaded & forbidden), sorted(loaded & forbidden)
