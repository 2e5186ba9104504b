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
]
IO_MODULES = {"asyncio", "socket", "ssl", "aiohttp", "httptools", "uvloop", "dns.asyncresolver"}


@pytest.mark.parametrize("module", PURE)
def test_pure_core_imports_no_io(module: str) -> None:
    """Importing the module alone (in a fresh interpreter) loads none of the I/O modules."""
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert not (loaded & IO_MODULES), sorted(loaded & IO_MODULES)
