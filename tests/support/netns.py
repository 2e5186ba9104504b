"""A throwaway network namespace with only `lo` up, for tests that need fixed ports to be free.

`NetNs()` creates `egw-test-<pid>-<n>`, brings loopback up, runs commands in it
(`run`, `popen`) and deletes it on exit, also when the test failed. Needs root
and the `ip` program (iproute2).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType

IP_TIMEOUT = 10.0
_COUNTER = itertools.count(1)


def netns_unavailable() -> str | None:
    """Return why network namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "ip is not installed (Debian package iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


class NetNs:
    """Context manager owning one network namespace."""

    def __init__(self) -> None:
        self.name = f"egw-test-{os.getpid()}-{next(_COUNTER)}"

    def command(self, args: Sequence[str]) -> list[str]:
        """Return `args` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self, args: Sequence[str], timeout: float = IP_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run `args` in the namespace; return its captured output whatever its exit code."""
        return subprocess.run(
            self.command(args), capture_output=True, text=True, timeout=timeout, check=False
        )

    def __enter__(self) -> NetNs:
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=IP_TIMEOUT)
        try:
            subprocess.run(
                self.command(["ip", "link", "set", "lo", "up"]), check=True, timeout=IP_TIMEOUT
            )
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        """Delete the namespace (its processes must have exited)."""
        subprocess.run(
            ["ip", "netns", "del", self.name], check=False, timeout=IP_TIMEOUT, capture_output=True
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()
