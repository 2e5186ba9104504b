"""Loopback port helpers: pick a free port, wait for a listener, wait for an HTTP 200."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

DEFAULT_WAIT_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
HTTP_PROBE_TIMEOUT = 1.0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float = DEFAULT_WAIT_TIMEOUT) -> None:
    """Block until a TCP connect to host:port succeeds; raise TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=HTTP_PROBE_TIMEOUT):
                return
        except OSError as exc:
            last = exc
            time.sleep(POLL_INTERVAL)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.1f}s ({last})")


def http_status(url: str, timeout: float = HTTP_PROBE_TIMEOUT) -> int:
    """Return the status of a direct (never proxied) GET of `url`, or 0 if it cannot connect."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except (OSError, urllib.error.URLError):
        return 0


def wait_http_ok(url: str, timeout: float = DEFAULT_WAIT_TIMEOUT) -> None:
    """Block until GET `url` answers 200; raise TimeoutError with the last status otherwise."""
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        status = http_status(url)
        if status == 200:
            return
        time.sleep(POLL_INTERVAL)
    raise TimeoutError(f"GET {url} did not answer 200 within {timeout:.1f}s (last: {status})")
