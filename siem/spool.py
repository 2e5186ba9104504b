"""Durable spool: an append-only queue of records on disk, read by each sink at its own pace.

Invariants
----------
1. Every record has a sequence number (``seq``), strictly increasing by one from record to
   record across segments and across restarts; a seq is never reused once a sink may have
   acknowledged it (the ledger keeps ``next_seq`` and the newest segment is never deleted).
2. Only the newest segment (the *active* one) is written; a segment is fsynced before the
   next one is created, so after a crash only the active segment can have a torn tail.
3. A record is visible to readers only once it is durable (fsynced): ``seq <= durable_seq``.
   So no sink can acknowledge a record that a crash could still take back.
4. Each sink has a cursor: the seq of its newest acknowledged record (all older ones are
   delivered too). Cursors live in memory and in the ledger, which is replaced atomically
   (write ``ledger.json.tmp``, fsync, ``os.replace``, fsync the directory).
5. A sealed segment is deleted once every configured sink's cursor has reached its last seq.
6. The total size of segment files stays within ``max_bytes``. When a record does not fit
   after deleting acknowledged segments, ``when_full`` decides: ``drop_oldest`` deletes the
   oldest sealed segment even if unacknowledged; ``refuse_new`` rejects the new record. Both
   count what they lose and append a gap-marker event (`gap_event`) as soon as there is room:
   loss is never silent.
7. On open, the active segment is scanned; the first record with a short header, a short
   payload, a CRC mismatch or an unexpected seq marks a torn tail, and the file is truncated
   there (and fsynced). Records after the cut were never durable, hence never acknowledged.

Files in the spool directory
----------------------------
``segment-<first seq, 20 digits>.log``  records, oldest first
``ledger.json``                         ``{"version": 1, "next_seq": N, "cursors": {sink: seq}}``
``lock``                                held with flock while a process owns the spool

Byte layout
-----------
A segment starts with the 8-byte magic ``b"EGWSPL01"``. Then records, each::

    offset  size  field
    0       4     payload length, unsigned little-endian
    4       4     CRC-32 (zlib polynomial) of the 8 seq bytes followed by the payload
    8       8     seq, unsigned little-endian
    16      len   payload: one ECS event as UTF-8 JSON (no trailing newline)

CRC-32 rather than CRC-32C because zlib's implementation ships with Python; it catches the
torn and garbled writes the spool is concerned with just as well.

Threading: one writer thread calls `append`, `sync`, `save_ledger` and `collect`; any thread
may call `ack` and `SpoolReader.read` (a lock guards the shared segment list and cursors).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import orjson

log = logging.getLogger(__name__)

MAGIC = b"EGWSPL01"
HEADER = struct.Struct("<IIQ")
SEQ = struct.Struct("<Q")
LEDGER = "ledger.json"
LOCK = "lock"
SEGMENT_PREFIX = "segment-"
SEGMENT_SUFFIX = ".log"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_RECORD_BYTES = 4 * 1024 * 1024
DEFAULT_READ_CHUNK = 256 * 1024

WhenFull = Literal["drop_oldest", "refuse_new"]


class Record(NamedTuple):
    """One spooled event: its sequence number and its JSON payload."""

    seq: int
    payload: bytes


def crc(seq: int, payload: bytes) -> int:
    """CRC-32 of a record's seq bytes and payload."""
    return zlib.crc32(payload, zlib.crc32(SEQ.pack(seq)))


def to_record(seq: int, payload: bytes) -> bytes:
    """Encode one record (header and payload)."""
    return HEADER.pack(len(payload), crc(seq, payload), seq) + payload


def parse_record(buf: bytes | memoryview, offset: int = 0) -> tuple[Record, int] | None:
    """Decode the record at offset: (record, next offset), None if incomplete, ValueError if bad."""
    end = offset + HEADER.size
    if len(buf) < end:
        return None
    length, checksum, seq = HEADER.unpack_from(buf, offset)
    if len(buf) < end + length:
        return None
    payload = bytes(buf[end : end + length])
    if crc(seq, payload) != checksum:
        raise ValueError(f"CRC mismatch in record at offset {offset}")
    return Record(seq, payload), end + length


def gap_event(
    dropped: int, reason: str, first_seq: int, last_seq: int, total: int | None = None
) -> dict[str, Any]:
    """The ECS event that marks a gap: how many events were lost (total: since start), and why."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "@timestamp": now,
        "event": {
            "id": str(uuid.uuid4()),
            "kind": "event",
            "category": ["process"],
            "type": ["info"],
            "action": "spool-gap",
            "dataset": "egressgw.spool",
            "severity": 7,
        },
        "message": f"{dropped} events lost by the spool ({reason})",
        "labels": {"gap_reason": reason},
        "egressgw": {
            "gap": {
                "dropped": dropped,
                "dropped_total": dropped if total is None else total,
                "reason": reason,
                "first_seq": first_seq,
                "last_seq": last_seq,
            }
        },
    }


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first record has first_seq."""
    return f"{SEGMENT_PREFIX}{first_seq:020d}{SEGMENT_SUFFIX}"


@dataclass
class Segment:
    """One segment file: its first seq, last seq written (first-1 if empty), size in bytes."""

    path: Path
    first_seq: int
    last_seq: int
    size: int
    deleted: bool = field(default=False)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _scan(path: Path, first_seq: int) -> tuple[int, int, bool]:
    """Scan a segment: (last good seq, offset after it, torn?)."""
    data = path.read_bytes()
    if data[: len(MAGIC)] != MAGIC:
        return first_seq - 1, 0, True
    offset, expected = len(MAGIC), first_seq
    while offset < len(data):
        try:
            parsed = parse_record(data, offset)
        except ValueError:
            return expected - 1, offset, True
        if parsed is None or parsed[0].seq != expected:
            return expected - 1, offset, True
        offset, expected = parsed[1], expected + 1
    return expected - 1, offset, False


class Spool:
    """The durable spool (see the module docstring for the rules)."""

    def __init__(
        self,
        directory: Path | str,
        sinks: Iterable[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        when_full: WhenFull = "drop_oldest",
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        on_drop: Callable[[str, int], None] | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.sinks = list(sinks)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.when_full: WhenFull = when_full
        self.max_record_bytes = min(max_record_bytes, segment_bytes)
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._segments: list[Segment] = []
        self._active: IO[bytes] | None = None
        self._dir_dirty = False
        self._ledger_dirty = False
        self.cursors: dict[str, int] = {}
        self.next_seq = 1
        self.durable_seq = 0
        self.dropped: dict[str, int] = {}
        self._gap: dict[str, list[int]] = {}  # reason -> [count, first seq, last seq]
        self._lock_fd: int | None = None
        self.torn_bytes = 0
        self._total = 0
        self._buf: list[bytes] = []  # encoded records not yet handed to the file object
        self._synced_size = 0  # size of the active segment at its last fsync

    # -- opening and recovery -------------------------------------------------------------

    def open(self) -> Spool:
        """Lock the directory, load the ledger, cut a torn tail, delete acknowledged segments."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"spool {self.dir} is in use by another process") from None
        self._lock_fd = fd
        ledger_next, saved = self._load_ledger()
        paths = sorted(self.dir.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"))
        for path in paths:
            first = int(path.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)])
            self._segments.append(Segment(path, first, first - 1, path.stat().st_size))
        damaged: list[tuple[int, int]] = []
        for seg, nxt in zip(self._segments, self._segments[1:], strict=False):
            # Sealed segments were fsynced before the next one was created, so damage here is
            # the disk's doing, not a torn write: report the records after the bad one as
            # lost and cut them (so they are reported once; readers move to the next file).
            seg.last_seq, end, torn = _scan(seg.path, seg.first_seq)
            if torn:
                log.error("spool segment %s is damaged after offset %d", seg.path, end)
                if seg.last_seq < nxt.first_seq - 1:
                    damaged.append((seg.last_seq + 1, nxt.first_seq - 1))
                self._recover_tail(seg)
        if self._segments:
            self._recover_tail(self._segments[-1])
        self._total = sum(seg.size for seg in self._segments)
        for first, last in damaged:
            self._drop("corrupt", last - first + 1, first, last)
        last = self._segments[-1].last_seq if self._segments else 0
        self.next_seq = max(ledger_next, last + 1, 1)
        self.durable_seq = self.next_seq - 1
        start = self._segments[0].first_seq - 1 if self._segments else self.durable_seq
        for sink in self.sinks:
            self.cursors[sink] = min(saved.get(sink, start), self.durable_seq)
        if self._segments and self._segments[-1].last_seq < self.durable_seq:
            # The ledger promised records beyond what survived (a damaged disk, not a torn
            # write): report them, and start a new segment so seqs stay consecutive per file.
            lost_from = self._segments[-1].last_seq + 1
            self._drop("corrupt", self.durable_seq - lost_from + 1, lost_from, self.durable_seq)
            self._active = None
            self._new_segment()
        elif not self._segments or self._segments[-1].path.stat().st_size >= self.segment_bytes:
            self._new_segment()
        else:
            self._active = self._segments[-1].path.open("ab")
            self._synced_size = self._segments[-1].size
        self.collect()
        self.sync()
        return self

    def _load_ledger(self) -> tuple[int, dict[str, int]]:
        path = self.dir / LEDGER
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return 1, {}
        except orjson.JSONDecodeError as exc:
            raise RuntimeError(f"spool ledger {path} is not valid JSON: {exc}") from exc
        cursors = {str(k): int(v) for k, v in data.get("cursors", {}).items()}
        return int(data.get("next_seq", 1)), cursors

    def _recover_tail(self, seg: Segment) -> None:
        seg.last_seq, end, torn = _scan(seg.path, seg.first_seq)
        if torn:
            size = seg.path.stat().st_size
            self.torn_bytes += size - max(end, len(MAGIC))
            log.warning(
                "spool: cutting torn tail of %s at offset %d (was %d bytes)", seg.path, end, size
            )
            with seg.path.open("r+b") as fh:
                if end < len(MAGIC):
                    fh.seek(0)
                    fh.write(MAGIC)
                    end = len(MAGIC)
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
        seg.size = end

    # -- writing ----------------------------------------------------------------------------

    def _flush_buf(self) -> None:
        if not self._buf:
            return
        if self._active is None:
            raise OSError("spool: no segment open for writing (after a write error)")
        self._active.write(b"".join(self._buf))
        self._buf = []

    def _new_segment(self) -> None:
        if self._active is not None:
            self._flush_buf()
            self._active.flush()
            os.fsync(self._active.fileno())
            self._active.close()
            self._active = None
            if self._dir_dirty:
                _fsync_dir(self.dir)
                self._dir_dirty = False
            self.durable_seq = self.next_seq - 1
            # If creating the next file fails, recover_write_error keeps this sealed one whole.
            self._synced_size = self._segments[-1].size
        path = self.dir / segment_name(self.next_seq)
        fh = path.open("wb")
        fh.write(MAGIC)
        seg = Segment(path, self.next_seq, self.next_seq - 1, len(MAGIC))
        with self._lock:
            self._segments.append(seg)
        self._total += seg.size
        self._active = fh
        self._synced_size = seg.size
        self._dir_dirty = True

    @property
    def total_bytes(self) -> int:
        """Bytes in segment files."""
        return self._total

    def _drop(self, reason: str, count: int, first: int, last: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        gap = self._gap.setdefault(reason, [0, first, last])
        gap[0] += count
        gap[1], gap[2] = min(gap[1], first), max(gap[2], last)
        if self._on_drop is not None:
            self._on_drop(reason, count)

    def _delete(self, seg: Segment) -> None:
        with self._lock:
            self._segments.remove(seg)
            seg.deleted = True
        self._total -= seg.size
        seg.path.unlink(missing_ok=True)
        self._dir_dirty = True

    def _make_room(self, need: int) -> bool:
        if self.total_bytes + need <= self.max_bytes:
            return True
        self.collect()
        while self.total_bytes + need > self.max_bytes:
            if self.when_full == "refuse_new" or len(self._segments) < 2:
                return False
            oldest = self._segments[0]
            acked = min((self.cursors[s] for s in self.sinks), default=oldest.last_seq)
            lost = oldest.last_seq - max(acked, oldest.first_seq - 1)
            self._delete(oldest)
            if lost > 0:
                self._drop(
                    "spool_full_drop_oldest",
                    lost,
                    max(acked + 1, oldest.first_seq),
                    oldest.last_seq,
                )
                log.warning("spool full: dropped %d undelivered events (oldest segment)", lost)
        return True

    def _write(self, payload: bytes) -> bool:
        size = HEADER.size + len(payload)
        if self._total + size > self.max_bytes and not self._make_room(size):
            return False
        assert self._active is not None
        seq = self.next_seq
        self._buf.append(
            HEADER.pack(len(payload), zlib.crc32(payload, zlib.crc32(SEQ.pack(seq))), seq)
        )
        self._buf.append(payload)
        seg = self._segments[-1]
        seg.last_seq = seq
        seg.size += size
        self._total += size
        self.next_seq += 1
        if seg.size >= self.segment_bytes:
            self._new_segment()
        return True

    def _write_gaps(self) -> None:
        for reason, (count, first, last) in list(self._gap.items()):
            total = self.dropped.get(reason, count)
            marker = orjson.dumps(gap_event(count, reason, first, last, total))
            if not self._write(marker):
                return
            del self._gap[reason]

    def append(self, payloads: Sequence[bytes]) -> int:
        """Append records (not yet durable: call `sync`). Returns how many were accepted."""
        if self._gap:
            self._write_gaps()
        accepted = 0
        # The hot loop of the spool: the common case (room left, no roll) stays inline.
        pack, crc32, seq_bytes = HEADER.pack, zlib.crc32, SEQ.pack
        header_size, max_record = HEADER.size, self.max_record_bytes
        limit, roll_at = self.max_bytes, self.segment_bytes
        for payload in payloads:
            n = len(payload)
            size = header_size + n
            seg = self._segments[-1]
            if n > max_record:
                self._drop("oversize", 1, self.next_seq, self.next_seq)
                continue
            if self._total + size > limit or seg.size + size >= roll_at:
                if self._write(payload):
                    accepted += 1
                else:
                    self._drop("spool_full_refuse_new", 1, self.next_seq, self.next_seq)
                continue
            seq = self.next_seq
            self._buf += (pack(n, crc32(payload, crc32(seq_bytes(seq))), seq), payload)
            seg.last_seq = seq
            seg.size += size
            self._total += size
            self.next_seq = seq + 1
            accepted += 1
        if accepted < len(payloads):
            log.warning("spool: refused %d events", len(payloads) - accepted)
        return accepted

    def note_lost(self, reason: str, count: int) -> None:
        """Count events lost before reaching the spool; a gap marker follows on the next append."""
        self._drop(reason, count, self.next_seq, self.next_seq)

    def sync(self) -> None:
        """Write pending gap markers, make everything appended durable (fsync file and dir)."""
        if self._gap and self._active is not None:
            self._write_gaps()
        if self._active is not None:
            self._flush_buf()
            self._active.flush()
            os.fsync(self._active.fileno())
        if self._dir_dirty:
            _fsync_dir(self.dir)
            self._dir_dirty = False
        self.durable_seq = self.next_seq - 1
        self._synced_size = self._segments[-1].size

    def recover_write_error(self) -> int:
        """After a failed write or fsync (disk full, I/O error): discard what is not durable,
        cut the active segment back to its last synced size, count the discarded records as
        lost (reason ``write_error``, gap marker follows) and return how many they were."""
        lost = self.next_seq - 1 - self.durable_seq
        self._buf = []
        if self._active is not None:
            with contextlib.suppress(OSError):
                self._active.close()
            self._active = None
        seg = self._segments[-1]
        with seg.path.open("r+b") as fh:
            fh.truncate(self._synced_size)
            os.fsync(fh.fileno())
        self._total -= seg.size - self._synced_size
        seg.size = self._synced_size
        seg.last_seq = self.durable_seq
        self.next_seq = self.durable_seq + 1
        self._active = seg.path.open("ab")
        if lost > 0:
            self._drop("write_error", lost, self.durable_seq + 1, self.durable_seq + lost)
            log.error("spool: write failed, %d events not made durable were discarded", lost)
        return lost

    # -- acknowledgements and the ledger ------------------------------------------------------

    def ack(self, sink: str, seq: int) -> None:
        """Record that sink has delivered every record up to seq."""
        with self._lock:
            if seq > self.cursors.get(sink, 0):
                self.cursors[sink] = min(seq, self.durable_seq)
                self._ledger_dirty = True

    def lag(self, sink: str) -> int:
        """Durable records the sink has not acknowledged yet."""
        return max(0, self.durable_seq - self.cursors.get(sink, 0))

    def save_ledger(self, force: bool = False) -> bool:
        """Replace the ledger atomically if cursors changed; returns whether it wrote."""
        with self._lock:
            if not (self._ledger_dirty or force):
                return False
            data = {"version": 1, "next_seq": self.durable_seq + 1, "cursors": dict(self.cursors)}
            self._ledger_dirty = False
        tmp = self.dir / (LEDGER + ".tmp")
        with tmp.open("wb") as fh:
            fh.write(orjson.dumps(data))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / LEDGER)
        _fsync_dir(self.dir)
        return True

    def collect(self) -> int:
        """Delete sealed segments that every sink acknowledged; returns how many."""
        if not self.sinks:
            floor = self.durable_seq
        else:
            with self._lock:
                floor = min(self.cursors[s] for s in self.sinks)
        deleted = 0
        while len(self._segments) > 1 and self._segments[0].last_seq <= floor:
            self._delete(self._segments[0])
            deleted += 1
        return deleted

    def close(self) -> None:
        """Make everything durable, save the ledger, delete acknowledged segments, unlock."""
        if self._active is not None:
            self.sync()
            self._active.close()
            self._active = None
        self.save_ledger(force=True)
        self.collect()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- reading ------------------------------------------------------------------------------

    def segments(self) -> list[Segment]:
        """A snapshot of the current segments, oldest first."""
        with self._lock:
            return list(self._segments)

    def reader(self, sink: str) -> SpoolReader:
        """A reader positioned after the sink's cursor."""
        return SpoolReader(self, self.cursors.get(sink, 0))


class SpoolReader:
    """Reads durable records after a position; one per sink, used from one thread at a time."""

    def __init__(self, spool: Spool, after_seq: int, chunk: int = DEFAULT_READ_CHUNK) -> None:
        self.spool = spool
        self.last_seq = after_seq
        self.chunk = chunk
        self._seg: Segment | None = None
        self._fh: IO[bytes] | None = None
        self._buf = b""
        self._pos = 0
        self.skipped = 0

    def _open_next(self) -> bool:
        want = self.last_seq + 1
        for seg in self.spool.segments():
            if seg.last_seq < want:
                continue
            if seg is self._seg:
                return True
            self._close()
            try:
                self._fh = seg.path.open("rb")
            except FileNotFoundError:
                continue
            self._fh.seek(len(MAGIC))
            self._seg, self._buf, self._pos = seg, b"", 0
            if seg.first_seq > want:
                self.skipped += seg.first_seq - want
            return True
        return False

    def _exhausted(self) -> bool:
        seg = self._seg
        if seg is None or seg.deleted:
            return True
        return self.last_seq >= seg.last_seq and seg is not self.spool.segments()[-1]

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh, self._seg = None, None

    def read(self, max_records: int) -> list[Record]:
        """Up to max_records durable records after the last one returned."""
        out: list[Record] = []
        limit = self.spool.durable_seq
        eof = False
        while len(out) < max_records and self.last_seq < limit:
            if self._exhausted() and not self._open_next():
                break
            assert self._fh is not None
            try:
                parsed = parse_record(self._buf, self._pos)
            except ValueError:
                log.error("spool: corrupt record in %s; skipping the rest", self._seg)
                self._skip_segment()
                continue
            if parsed is None:
                more = self._fh.read(self.chunk)
                if not more:
                    if self._seg is self.spool.segments()[-1]:
                        break  # the active segment: nothing more is durable yet
                    if self._seg is not None and self.last_seq < self._seg.last_seq and not eof:
                        # Sealed while we read: its last bytes were flushed before the next
                        # segment appeared, so one more read sees them.
                        eof = True
                        continue
                    self._skip_segment()  # a sealed file ended (or was cut): go on
                    continue
                self._buf = self._buf[self._pos :] + more
                self._pos = 0
                eof = False
                continue
            record, self._pos = parsed
            if record.seq > limit:
                self._pos -= HEADER.size + len(record.payload)
                break
            if record.seq <= self.last_seq:
                continue
            self.last_seq = record.seq
            out.append(record)
        return out

    def _skip_segment(self) -> None:
        if self._seg is not None:
            self.last_seq = max(self.last_seq, self._seg.last_seq)
        self._close()

    def close(self) -> None:
        """Close the open segment file."""
        self._close()


def records_after(spool: Spool, after_seq: int) -> list[Record]:
    """Every durable record after after_seq (for tests and tools)."""
    reader = SpoolReader(spool, after_seq)
    out: list[Record] = []
    while batch := reader.read(10_000):
        out.extend(batch)
    reader.close()
    return out
