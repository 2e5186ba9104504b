"""`egressgw run` without a config, on its embedded defaults, in a network namespace of its own.

The defaults use fixed ports (proxy 127.0.0.1:3128, admin 127.0.0.1:9090), so the
gateway runs in a fresh namespace where they are surely free. There loopback
also holds 198.51.100.10 (TEST-NET-2, reachable only inside the namespace) with
a plain HTTP server: the defaults allow it, the guard refuses 127.0.0.1, and
ECS events go to stdout.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import field
from tests.support.gateway import egressgw_executable
from tests.support.netns import NetNs, netns_unavailable

pytestmark = [pytest.mark.integration, pytest.mark.netns]

PUBLIC_IP = "198.51.100.10"
PUBLIC_PORT = 8080
DEFAULT_PROXY = "http://127.0.0.1:3128"
DEFAULT_READYZ = "http://127.0.0.1:9090/readyz"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.1


def wait_status(ns: NetNs, url: str, wanted: str, timeout: float = READY_TIMEOUT) -> None:
    """Poll `url` with curl inside `ns` until it answers `wanted`; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    got = ""
    while time.monotonic() < deadline:
        got = ns.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url]).stdout
        if got == wanted:
            return
        time.sleep(POLL_INTERVAL)
    pytest.fail(f"{url} answered {got!r}, not {wanted}, within {timeout}s")


def via_proxy(ns: NetNs, url: str, *extra: str) -> tuple[str, dict[str, str]]:
    """Request `url` through the default proxy inside `ns`; return the last status line, headers."""
    out = ns.run(["curl", "-s", "-D", "-", "-o", "/dev/null", "-x", DEFAULT_PROXY, *extra, url])
    blocks = [b for b in out.stdout.replace("\r\n", "\n").split("\n\n") if b.startswith("HTTP/")]
    assert blocks, (out.stdout, out.stderr)
    lines = blocks[-1].splitlines()
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return lines[0], headers


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[NetNs]:
    """A network namespace whose loopback also holds PUBLIC_IP, with an HTTP server there."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with NetNs() as ns:
        done = ns.run(["ip", "addr", "add", f"{PUBLIC_IP}/32", "dev", "lo"])
        assert done.returncode == 0, done.stderr
        server = subprocess.Popen(
            ns.command(
                [
                    sys.executable,
                    "-m",
                    "http.server",
                    "-d",
                    str(tmp_path),
                    "-b",
                    PUBLIC_IP,
                    str(PUBLIC_PORT),
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_status(ns, f"http://{PUBLIC_IP}:{PUBLIC_PORT}/", "200")
            yield ns
        finally:
            server.terminate()
            server.wait(STOP_TIMEOUT)


def test_embedded_defaults_allow_guard_and_log_to_stdout(
    namespace: NetNs, tmp_path: Path, curl_installed: None
) -> None:
    """Without --config: proxy :3128, admin :9090, all but loopback allowed, events on stdout."""
    stdout_path, stderr_path = tmp_path / "stdout", tmp_path / "stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        gw = subprocess.Popen(
            namespace.command([str(egressgw_executable()), "run"]),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    try:
        wait_status(namespace, DEFAULT_READYZ, "200")
        allowed, _ = via_proxy(namespace, f"http://{PUBLIC_IP}:{PUBLIC_PORT}/")
        guarded, headers = via_proxy(namespace, "http://127.0.0.1:9090/healthz")
        tunnel, tunnel_headers = via_proxy(namespace, "http://127.0.0.1:9090/", "-p")
    finally:
        gw.send_signal(signal.SIGTERM)
        code = gw.wait(STOP_TIMEOUT)
    assert code == 0, stderr_path.read_text()
    assert " 200 " in allowed
    assert " 403 " in guarded and headers["x-egressgw-reason"].startswith("guard:")
    assert " 403 " in tunnel and tunnel_headers["x-egressgw-reason"].startswith("guard:")
    events: list[dict[str, Any]] = []
    for line in stdout_path.read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    actions = [field(e, "event.action") for e in events if field(e, "event.category")]
    assert actions.count("connection_allowed") == 1 and actions.count("connection_denied") == 2
    assert {field(e, "destination.ip") for e in events if field(e, "event.category")} >= {
        PUBLIC_IP,
        "127.0.0.1",
    }
