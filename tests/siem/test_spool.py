"""Tests for the durable spool: record layout, recovery, acknowledgement, bounds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siem.spool import (
    HEADER,
    MAGIC,
    Spool,
    gap_event,
    parse_record,
    records_after,
    segment_name,
    to_record,
)


def payload(n: int, size: int = 0) -> bytes:
    return orjson.dumps({"event": {"id": f"e-{n}"}, "pad": "x" * size})


def open_spool(path: Path, **kw: object) -> Spool:
    kw.setdefault("segment_bytes", 4096)
    kw.setdefault("max_bytes", 64 * 1024)
    return Spool(path, ["a", "b"], **kw).open()  # type: ignore[arg-type]


def ids(records: list) -> list[str]:
    return [orjson.loads(r.payload)["event"]["id"] for r in records]


def test_record_roundtrip_and_layout() -> None:
    """A record is length, CRC, seq, payload; parse_record inverts to_record."""
    raw = to_record(7, b"hello")
    assert len(raw) == HEADER.size + 5
    assert int.from_bytes(raw[:4], "little") == 5
    assert int.from_bytes(raw[8:16], "little") == 7
    record, end = parse_record(raw)  # type: ignore[misc]
    assert (record.seq, record.payload, end) == (7, b"hello", len(raw))


def test_parse_record_incomplete_and_corrupt() -> None:
    """A short buffer needs more bytes; a flipped payload byte fails the CRC."""
    raw = to_record(1, b"payload")
    assert parse_record(raw[:10]) is None
    assert parse_record(raw[:-1]) is None
    bad = raw[:-1] + bytes([raw[-1] ^ 1])
    with pytest.raises(ValueError, match="CRC"):
        parse_record(bad)


def test_append_sync_read_in_order(tmp_path: Path) -> None:
    """Durable records come back in order with consecutive seqs across segments."""
    spool = open_spool(tmp_path)
    spool.append([payload(i, 100) for i in range(200)])
    early = records_after(spool, 0)  # only sealed (fsynced) segments are visible yet
    assert spool.durable_seq < 200 and len(early) == spool.durable_seq
    spool.sync()
    records = records_after(spool, 0)
    assert [r.seq for r in records] == list(range(1, 201))
    assert ids(records) == [f"e-{i}" for i in range(200)]
    assert len(spool.segments()) > 3
    spool.close()


def test_reopen_continues_sequence_and_cursors(tmp_path: Path) -> None:
    """After close and reopen, seqs continue and each sink resumes after its cursor."""
    spool = open_spool(tmp_path)
    spool.append([payload(i) for i in range(10)])
    spool.sync()
    spool.ack("a", 4)
    spool.close()
    spool = open_spool(tmp_path)
    assert spool.next_seq == 11
    assert spool.cursors == {"a": 4, "b": 0}
    assert [r.seq for r in records_after(spool, spool.cursors["a"])] == list(range(5, 11))
    spool.append([payload(10)])
    spool.sync()
    assert [r.seq for r in records_after(spool, spool.cursors["b"])][-1] == 11
    spool.close()


def test_torn_tail_is_cut_on_open(tmp_path: Path) -> None:
    """A half-written last record is detected and truncated; earlier records survive."""
    spool = open_spool(tmp_path, segment_bytes=1 << 20)
    spool.append([payload(i) for i in range(5)])
    spool.sync()
    spool.close()
    seg = tmp_path / segment_name(1)
    good = seg.stat().st_size
    with seg.open("ab") as fh:
        fh.write(to_record(6, payload(5))[:-3])
    spool = open_spool(tmp_path, segment_bytes=1 << 20)
    assert seg.stat().st_size == good
    assert spool.torn_bytes > 0
    assert [r.seq for r in records_after(spool, 0)] == [1, 2, 3, 4, 5]
    spool.append([payload(99)])
    spool.sync()
    assert records_after(spool, 5)[0].seq == 6
    spool.close()


def test_garbled_record_in_tail_is_cut(tmp_path: Path) -> None:
    """A record with a bad CRC and everything after it are cut on open."""
    spool = open_spool(tmp_path, segment_bytes=1 << 20)
    spool.append([payload(i) for i in range(5)])
    spool.sync()
    spool.close()
    seg = tmp_path / segment_name(1)
    data = bytearray(seg.read_bytes())
    third = len(MAGIC) + 2 * len(to_record(1, payload(0)))
    data[third + HEADER.size + 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    spool = open_spool(tmp_path, segment_bytes=1 << 20)
    assert [r.seq for r in records_after(spool, 0)] == [1, 2, 6]  # 6: the gap marker
    assert spool.next_seq == 7  # the ledger had promised 3..5: never reuse them
    assert spool.dropped["corrupt"] == 3
    spool.append([payload(7)])
    spool.sync()
    tail = [orjson.loads(r.payload) for r in records_after(spool, 2)]
    assert tail[0]["egressgw"]["gap"]["dropped"] == 3 and tail[1]["event"]["id"] == "e-7"
    spool.close()
    spool = open_spool(tmp_path, segment_bytes=1 << 20)
    assert [r.seq for r in records_after(spool, 0)] == [1, 2, 6, 7]
    spool.close()


def test_ledger_is_replaced_atomically(tmp_path: Path) -> None:
    """save_ledger writes via a temp file; no temp file stays behind."""
    spool = open_spool(tmp_path)
    spool.append([payload(1)])
    spool.sync()
    spool.ack("a", 1)
    assert spool.save_ledger()
    assert not spool.save_ledger()  # nothing changed since
    data = orjson.loads((tmp_path / "ledger.json").read_bytes())
    assert data["cursors"]["a"] == 1 and data["next_seq"] == 2
    assert not (tmp_path / "ledger.json.tmp").exists()
    spool.close()


def test_segments_deleted_only_when_every_sink_acked(tmp_path: Path) -> None:
    """A sealed segment stays until the slowest sink acknowledged all of it."""
    spool = open_spool(tmp_path)
    spool.append([payload(i, 200) for i in range(100)])
    spool.sync()
    before = len(spool.segments())
    spool.ack("a", 100)
    spool.collect()
    assert len(spool.segments()) == before
    spool.ack("b", 100)
    spool.collect()
    assert len(spool.segments()) == 1  # only the active segment is kept
    assert len(list(tmp_path.glob("segment-*"))) == 1
    spool.close()


def test_drop_oldest_counts_and_marks_gap(tmp_path: Path) -> None:
    """When full, drop_oldest deletes unacknowledged data, counts it and writes a gap marker."""
    spool = open_spool(tmp_path, max_bytes=16 * 1024, when_full="drop_oldest")
    for i in range(300):
        spool.append([payload(i, 100)])
    spool.append([payload(1000)])
    spool.sync()
    assert spool.total_bytes <= 16 * 1024
    lost = spool.dropped["spool_full_drop_oldest"]
    assert lost > 0
    records = records_after(spool, 0)
    gaps = [orjson.loads(r.payload) for r in records if b"spool-gap" in r.payload]
    assert gaps and gaps[-1]["egressgw"]["gap"]["dropped_total"] == lost
    kept = [i for i in ids(records) if not i.count("-") > 1]
    assert kept[-1] == "e-1000"
    numbers = [int(i[2:]) for i in kept[:-1]]
    assert numbers == list(range(numbers[0], 300))  # a contiguous tail survived
    spool.close()


def test_refuse_new_keeps_old_and_reports_refusals(tmp_path: Path) -> None:
    """refuse_new keeps unacknowledged data, refuses new events, then writes a gap marker."""
    spool = open_spool(tmp_path, max_bytes=16 * 1024, when_full="refuse_new")
    accepted = sum(spool.append([payload(i, 100)]) for i in range(300))
    refused = spool.dropped["spool_full_refuse_new"]
    assert accepted + refused == 300 and refused > 0
    spool.sync()
    assert ids(records_after(spool, 0))[:3] == ["e-0", "e-1", "e-2"]
    last = spool.durable_seq
    for sink in ("a", "b"):
        spool.ack(sink, last)
    spool.append([payload(5000)])
    spool.sync()
    tail = [orjson.loads(r.payload) for r in records_after(spool, last)]
    assert tail[0]["event"]["action"] == "spool-gap"
    assert tail[0]["egressgw"]["gap"]["dropped"] == refused
    assert tail[1]["event"]["id"] == "e-5000"
    spool.close()


def test_reader_skips_segments_dropped_under_it(tmp_path: Path) -> None:
    """A reader behind a dropped segment continues at the oldest remaining record."""
    spool = open_spool(tmp_path, max_bytes=16 * 1024)
    reader = spool.reader("a")
    for i in range(300):
        spool.append([payload(i, 100)])
    spool.sync()
    records = reader.read(10_000)
    reader.close()
    assert records[0].seq > 1
    assert reader.skipped == records[0].seq - 1
    assert [r.seq for r in records] == list(range(records[0].seq, records[-1].seq + 1))
    spool.close()


def test_second_process_cannot_open_spool(tmp_path: Path) -> None:
    """The spool directory is locked while open."""
    spool = open_spool(tmp_path)
    with pytest.raises(RuntimeError, match="in use"):
        open_spool(tmp_path)
    spool.close()
    open_spool(tmp_path).close()


def test_oversize_record_is_counted(tmp_path: Path) -> None:
    """A payload larger than a segment is refused and counted as oversize."""
    spool = open_spool(tmp_path)
    assert spool.append([b"x" * 10_000]) == 0
    assert spool.dropped["oversize"] == 1
    spool.close()


def test_gap_event_shape() -> None:
    """The gap marker is an ECS event that says how many events were lost and why."""
    event = gap_event(12, "spool_full_drop_oldest", 5, 16)
    assert event["event"]["action"] == "spool-gap"
    assert event["egressgw"]["gap"] == {
        "dropped": 12,
        "dropped_total": 12,
        "reason": "spool_full_drop_oldest",
        "first_seq": 5,
        "last_seq": 16,
    }
    assert "12 events" in event["message"]


def test_unsynced_tail_lost_on_crash_is_never_reused_after_ack(tmp_path: Path) -> None:
    """Seqs acknowledged before a crash are never handed out again."""
    spool = open_spool(tmp_path)
    spool.append([payload(i) for i in range(3)])
    spool.sync()
    spool.ack("a", 3)
    spool.ack("b", 3)
    spool.save_ledger()
    spool.collect()
    assert spool._active is not None and spool._lock_fd is not None
    spool._active.close()
    os.close(spool._lock_fd)  # simulate a crash: no close(), no final ledger
    spool = open_spool(tmp_path)
    assert spool.next_seq == 4
    spool.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    synced=st.integers(min_value=0, max_value=20),
    unsynced=st.integers(min_value=0, max_value=20),
    cut=st.floats(min_value=0, max_value=1),
    garbage=st.binary(max_size=40),
)
def test_any_torn_tail_keeps_every_synced_record(
    tmp_path_factory: pytest.TempPathFactory, synced: int, unsynced: int, cut: float, garbage: bytes
) -> None:
    """Whatever a crash leaves after the last fsync, reopening keeps every synced record,
    then a clean prefix of the rest, with consecutive seqs, and appends continue after it."""
    path = tmp_path_factory.mktemp("spool")
    spool = open_spool(path, segment_bytes=1 << 20)
    spool.append([payload(i) for i in range(synced)])
    spool.sync()
    seg = path / segment_name(1)
    durable_size = seg.stat().st_size
    spool.append([payload(synced + i) for i in range(unsynced)])
    spool._flush_buf()
    assert spool._active is not None and spool._lock_fd is not None
    spool._active.flush()
    full = seg.read_bytes()
    spool._active.close()
    os.close(spool._lock_fd)  # crash: no close(), no ledger
    keep = durable_size + int((len(full) - durable_size) * cut)
    seg.write_bytes(full[:keep] + garbage)
    spool = open_spool(path, segment_bytes=1 << 20)
    got = records_after(spool, 0)
    assert [r.seq for r in got] == list(range(1, len(got) + 1))
    assert synced <= len(got) <= synced + unsynced
    assert ids(got) == [f"e-{i}" for i in range(len(got))]
    spool.append([payload(1000)])
    spool.sync()
    assert records_after(spool, len(got))[0].seq == len(got) + 1
    spool.close()


def test_damaged_sealed_segment_is_reported_and_skipped(tmp_path: Path) -> None:
    """A bad record inside an older segment loses only the rest of that segment, reported."""
    spool = open_spool(tmp_path)
    spool.append([payload(i, 100) for i in range(100)])
    spool.sync()
    spool.close()
    first = sorted(tmp_path.glob("segment-*"))[0]
    data = bytearray(first.read_bytes())
    record = len(to_record(1, payload(0, 100)))
    data[len(MAGIC) + 5 * record + HEADER.size + 3] ^= 0xFF  # the 6th record's payload
    first.write_bytes(bytes(data))
    spool = open_spool(tmp_path)
    lost = spool.dropped["corrupt"]
    assert lost > 0
    records = records_after(spool, 0)
    got = ids(records)
    assert got[:5] == [f"e-{i}" for i in range(5)]
    assert got[5 : 100 - lost] == [f"e-{i}" for i in range(5 + lost, 100)]
    gap = orjson.loads(records[-1].payload)
    assert gap["egressgw"]["gap"] == {
        "dropped": lost,
        "dropped_total": lost,
        "reason": "corrupt",
        "first_seq": 6,
        "last_seq": 5 + lost,
    }
    spool.close()


class FailingFile:
    """Wraps a segment file: the next write fails like a full disk."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def write(self, data: bytes) -> int:
        self.inner.write(data[: len(data) // 2])  # a partial write reaches the file
        self.inner.flush()
        raise OSError(28, "No space left on device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_write_error_discards_only_what_was_not_durable(tmp_path: Path) -> None:
    """A failed write cuts the segment back to its last fsync, counts the loss, and the spool
    keeps working: later records are readable now and after reopening."""
    spool = open_spool(tmp_path, segment_bytes=1 << 20)
    spool.append([payload(i) for i in range(5)])
    spool.sync()
    spool._active = FailingFile(spool._active)  # type: ignore[assignment]
    spool.append([payload(i) for i in range(5, 8)])
    with pytest.raises(OSError, match="No space"):
        spool.sync()
    spool._active.inner.close()  # type: ignore[union-attr]
    assert spool.recover_write_error() == 3
    spool.append([payload(100)])
    spool.sync()
    got = [orjson.loads(r.payload) for r in records_after(spool, 0)]
    assert [g["event"]["id"] for g in got[:5]] == [f"e-{i}" for i in range(5)]
    assert got[5]["egressgw"]["gap"]["reason"] == "write_error"
    assert got[5]["egressgw"]["gap"]["dropped"] == 3
    assert got[6]["event"]["id"] == "e-100"
    spool.close()
    spool = open_spool(tmp_path, segment_bytes=1 << 20)
    assert [r.seq for r in records_after(spool, 0)] == [1, 2, 3, 4, 5, 6, 7]
    spool.close()
