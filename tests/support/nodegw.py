"""A node gateway in a network namespace: its rules installed, `egressgw run` until the test's
ExitStack closes, started only once it is ready."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import dump_yaml, egressgw_executable
from tests.support.netns import NetNs

READY_TIMEOUT = 20.0
ADMIN = "127.0.0.1:9090"  # the admin address the node configurations of the tests use


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """Terminate, then kill if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_node_gateway(
    stack: ExitStack,
    ns: NetNs,
    config: dict[str, Any],
    tmp_path: Path,
    ready: Callable[[], bool] | None = None,
) -> Path:
    """Write ``config`` to tmp_path/gw.yaml, run ``node setup`` and ``egressgw run`` in ``ns``
    (stopped with ``stack``), and return the file once ``ready()`` (default: /readyz 200)."""
    path = tmp_path / "gw.yaml"
    dump_yaml(config, path)
    setup = ns.run([str(egressgw_executable()), "node", "setup", "--config", str(path)], 30)
    assert setup.returncode == 0, setup.stderr
    err = (tmp_path / "gw.stderr").open("wb")
    stack.callback(err.close)
    proc = subprocess.Popen(
        ns.command([str(egressgw_executable()), "run", "--config", str(path)]),
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    stack.callback(stop_process, proc)

    def readyz() -> bool:
        probe = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{ADMIN}/readyz"]
        return ns.run(probe).stdout == "200"

    deadline = time.monotonic() + READY_TIMEOUT
    while not (ready or readyz)():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("gateway not ready:\n" + (tmp_path / "gw.stderr").read_text())
        time.sleep(0.1)
    return path
