"""Crash test: a producer SIGKILLed at random points loses no acknowledged event, and
Elasticsearch (the stand-in) never stores one twice."""

from __future__ import annotations

import asyncio
import collections
import random
import sys
from pathlib import Path

import pytest

from tests.siem.es_standin import EsStandin

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 6
STARTUP_TIMEOUT = 60.0


async def run_child(
    spool: Path, url: str, start: int, count: int, kill_after: float | None, from_launch: bool
) -> int:
    """Run the producer; SIGKILL it kill_after seconds after it started producing (or after
    launch, which may hit spool recovery). Returns the last acknowledged event number."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.siem.crash_producer",
        str(spool),
        url,
        str(start),
        str(count),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    acked = start - 1
    lines: list[str] = []
    started = asyncio.Event()

    async def read() -> None:
        nonlocal acked
        assert proc.stdout is not None
        async for raw in proc.stdout:
            if not raw.endswith(b"\n"):
                continue  # cut by the kill: not an acknowledgement
            line = raw.decode().strip()
            lines.append(line)
            if line == "started":
                started.set()
            elif line.startswith("acked "):
                acked = int(line.split()[1])

    reader = asyncio.get_running_loop().create_task(read())
    if kill_after is None:
        await asyncio.wait_for(proc.wait(), STARTUP_TIMEOUT)
    else:
        if not from_launch:
            await asyncio.wait_for(started.wait(), STARTUP_TIMEOUT)
        await asyncio.sleep(kill_after)
        proc.kill()
        await proc.wait()
    await reader
    if kill_after is None:
        assert proc.returncode == 0 and lines[-1] == "drained", lines
    return acked


@pytest.mark.integration
async def test_sigkill_loses_no_acknowledged_event(tmp_path: Path) -> None:
    """After repeated SIGKILLs and a restart, every flushed event is in ES exactly once."""
    es = EsStandin()
    await es.start()
    rng = random.Random(4)
    spool = tmp_path / "spool"
    acked = -1
    try:
        for n in range(ROUNDS):
            # The producer resubmits from the first unacknowledged event, like a real client.
            # Every third kill is timed from launch, so it can land in spool recovery.
            from_launch = n % 3 == 2
            delay = rng.uniform(0.5, 2.0) if from_launch else rng.uniform(0.05, 0.6)
            acked = await run_child(spool, es.url, acked + 1, 100_000, delay, from_launch)
        await run_child(spool, es.url, 0, 0, None, False)
    finally:
        await es.stop()
    assert acked > 100, "the producer should have acknowledged events before being killed"
    stored = collections.Counter(d["event"]["id"] for d in es.all_docs())
    missing = [n for n in range(acked + 1) if stored[f"e-{n}"] == 0]
    assert missing == []
    assert max(stored.values()) == 1
    # Deliveries acknowledged after the last ledger save are redone after a kill: ES answers
    # 409 for those, which proves the dedup path ran rather than the kill being harmless.
    assert es.item_statuses.get(409, 0) > 0
