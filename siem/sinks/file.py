"""File sink: JSON lines appended to a file, rotated by size (path, path.1 ... path.<keep>)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from siem.config import FileSinkSpec
from siem.sinks import SendResult
from siem.spool import Record


def rotate(path: Path, keep: int) -> None:
    """Shift path.N to path.N+1 (dropping the one beyond keep) and path to path.1."""
    if keep <= 0:
        path.unlink(missing_ok=True)
        return
    path.with_name(f"{path.name}.{keep}").unlink(missing_ok=True)
    for n in range(keep - 1, 0, -1):
        src = path.with_name(f"{path.name}.{n}")
        if src.exists():
            os.replace(src, path.with_name(f"{path.name}.{n + 1}"))
    if path.exists():
        os.replace(path, path.with_name(f"{path.name}.1"))


class FileSink:
    """Appends each event as one JSON line; rotates when the file reaches rotate_bytes."""

    def __init__(self, spec: FileSinkSpec, name: str) -> None:
        self.spec = spec
        self.name = name
        self._fh: IO[bytes] | None = None
        self._size = 0

    async def start(self) -> None:
        """Create the directory; the file opens on the first write."""
        self.spec.path.parent.mkdir(parents=True, exist_ok=True)

    def _open(self) -> IO[bytes]:
        if self._fh is None:
            self._fh = self.spec.path.open("ab")
            self._size = self._fh.tell()
        return self._fh

    def _rotate(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        rotate(self.spec.path, self.spec.keep)

    def _write(self, batch: Sequence[Record]) -> None:
        fh = self._open()
        payloads = [r.payload for r in batch]
        size = sum(map(len, payloads)) + len(payloads)
        if self._size + size <= self.spec.rotate_bytes:
            # The common case, no rotation within the batch: one join, one write.
            fh.write(b"\n".join(payloads) + b"\n")
            self._size += size
            fh.flush()
            if self.spec.fsync:
                os.fsync(fh.fileno())
            return
        chunk: list[bytes] = []
        pending = 0
        for record in batch:
            line = record.payload + b"\n"
            if self._size + pending + len(line) > self.spec.rotate_bytes and self._size + pending:
                self._open().write(b"".join(chunk))
                chunk, pending = [], 0
                self._rotate()
                self._open()
            chunk.append(line)
            pending += len(line)
        fh = self._open()
        fh.write(b"".join(chunk))
        self._size += pending
        fh.flush()
        if self.spec.fsync:
            os.fsync(fh.fileno())

    async def send(self, batch: Sequence[Record]) -> SendResult:
        """Write the batch (in a thread: disk writes never stall the event loop)."""
        await asyncio.to_thread(self._write, batch)
        return SendResult()

    async def aclose(self) -> None:
        """Close the file."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
