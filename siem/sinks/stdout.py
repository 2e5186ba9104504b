"""Stdout sink: one JSON line per event on standard output (for `kubectl logs` pipelines)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import BinaryIO

from siem.config import StdoutSinkSpec
from siem.sinks import SendResult
from siem.spool import Record


class StdoutSink:
    """Writes JSON lines to a binary stream (standard output unless one is given)."""

    def __init__(self, spec: StdoutSinkSpec, name: str, stream: BinaryIO | None = None) -> None:
        self.spec = spec
        self.name = name
        self.stream = stream

    async def start(self) -> None:
        """Nothing to prepare."""

    async def send(self, batch: Sequence[Record]) -> SendResult:
        """Write and flush the batch."""
        stream = self.stream if self.stream is not None else sys.stdout.buffer
        stream.write(b"".join(r.payload + b"\n" for r in batch))
        stream.flush()
        return SendResult()

    async def aclose(self) -> None:
        """Flush the stream."""
        stream = self.stream if self.stream is not None else sys.stdout.buffer
        stream.flush()
