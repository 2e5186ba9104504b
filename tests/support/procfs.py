"""What a process holds, from /proc and its Prometheus metrics: descriptors, memory, gauges."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

METRICS_TIMEOUT = 2.0
POLL_INTERVAL = 0.1

T = TypeVar("T")


def open_fds(pid: int) -> dict[int, str]:
    """Return the process's open descriptors: number -> what it points at (socket:[...] etc.)."""
    fds: dict[int, str] = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            fds[int(entry.name)] = os.readlink(entry)
        except FileNotFoundError:
            continue  # closed while listing
    return fds


def _hex_address(text: str) -> str:
    host, port = text.split(":")
    # IPv6 sockets keep their raw hex form: enough to tell them apart.
    ip = ".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0)) if len(host) == 8 else host
    return f"{ip}:{int(port, 16)}"


def socket_peers(pid: int) -> dict[str, str]:
    """Return the process's sockets: 'socket:[inode]' -> 'proto local -> remote (state)'."""
    out: dict[str, str] = {}
    for table in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            parts = line.split()
            local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
            out[f"socket:[{inode}]"] = (
                f"{table} {_hex_address(local)} -> {_hex_address(remote)} (state {int(state, 16)})"
            )
    return out


def rss_bytes(pid: int) -> int:
    """Return the process's resident memory (VmRSS) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS in /proc/{pid}/status")


def metric(admin_url: str, name: str) -> float:
    """Return the value of an unlabelled metric from `admin_url`/metrics (direct, never proxied)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{admin_url}/metrics", timeout=METRICS_TIMEOUT) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise ValueError(f"metric {name} not found")


def labelled_metric(admin_url: str, name: str, labels: str) -> float:
    """Return the value of `name{labels}` (labels as the exposition writes them), 0 if absent."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{admin_url}/metrics", timeout=METRICS_TIMEOUT) as resp:
        text = resp.read().decode()
    prefix = f"{name}{{{labels}}} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def settle(probe: Callable[[], T], done: Callable[[T], bool], timeout: float) -> T:
    """Call `probe` until `done(value)` or `timeout` seconds pass; return the last value."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
        value = probe()
    return value
