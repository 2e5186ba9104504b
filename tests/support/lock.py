"""A machine-wide lock for tests that bind fixed loopback addresses (127.0.0.30:8080 ...).

Two test runs at once (a developer's and CI's, or two sessions) would fight
over the same fixed upstream ports; the second waits for the first instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_TIMEOUT = 300.0
POLL_INTERVAL = 0.1


@contextlib.contextmanager
def machine_lock(name: str, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive flock on <tmpdir>/egressgw-tests-<name>.lock; raise TimeoutError."""
    path = Path(tempfile.gettempdir()) / f"egressgw-tests-{name}.lock"
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path} held by another test run for {timeout}s") from None
                time.sleep(POLL_INTERVAL)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
