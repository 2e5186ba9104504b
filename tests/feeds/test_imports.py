"""The pure cores of the feeds library import no network, event-loop or metrics modules."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = [
    "feeds.catalog",
    "feeds.acceptance",
    "feeds.indicator",
    "feeds.jsonpath",
    "feeds.matcher",
    "feeds.normalise",
    "feeds.options",
    "feeds.parsers",
    "feeds.result",
    "feeds.spec",
    "feeds.stix",
]
# socket is allowed: normalise and matcher use socket.inet_pton, a pure strict IPv4 parser.
BANNED = ("asyncio", "aiohttp", "ssl", "http", "urllib.request", "prometheus_client", "egressgw")


@pytest.mark.parametrize("module", PURE)
def test_pure_core_imports_no_io(module: str) -> None:
    """Importing a pure core (in a fresh interpreter) loads no I/O framework."""
    code = (
        f"import sys, {module}; "
        f"print(' '.join(m for m in sys.modules if m.split('.')[0] in {BANNED!r} "
        f"or m in {BANNED!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []
