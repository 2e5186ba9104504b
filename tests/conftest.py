"""Suite-wide test setup: `tests.support` importable everywhere; SIGTERM tears fixtures down."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import settings

# No per-example deadline: the suite shares two cores with the daemons it starts, and a property
# test's first example (imports, caches) can take longer than hypothesis' default 200 ms there
# while proving nothing about the code. Hypothesis still bounds each test's examples.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")

# The editable install maps only egressgw, feeds and siem; the shared test helpers live in
# tests/support and are imported as `tests.support`, so the repository root must be on the path.
REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """Turn SIGTERM into KeyboardInterrupt, so fixtures stop their daemons (dnsmasq, gateways)."""
    # A CI timeout sends SIGTERM; by default Python would die at once and orphan every daemon.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
