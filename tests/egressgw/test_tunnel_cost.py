"""The deterministic per-tunnel cost script (bench/tunnel_cost.py) keeps working."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "tunnel_cost.py"


@pytest.mark.parametrize("mode", [[], ["--tls"]], ids=["plain", "tls"])
def test_tunnel_cost_runs_whole_tunnels_and_counts_them(mode: list[str]) -> None:
    """The script drives complete tunnels through the gateway and prints its counts."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tunnels", "20", "--repeat", "1", "--counted", "20", *mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("per tunnel:") and "bytecode instructions" in first, done.stdout
    instructions = int(first.split()[2].replace(",", ""))
    # A tunnel is far more than nothing and far less than a stuck loop.
    assert 500 < instructions < 20_000, first
