"""Tests of feeds.state: the persisted last good data."""

from __future__ import annotations

from pathlib import Path

from feeds.state import StoredFeed, load_feed, save_feed


def test_round_trip(tmp_path: Path) -> None:
    """What is saved loads back identically."""
    stored = StoredFeed(b"1.2.3.4\n", "https://x/y", '"e"', "Mon, 01 Jan 2024", 1234.5)
    save_feed(tmp_path, "f", stored)
    assert load_feed(tmp_path, "f") == stored
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_or_inconsistent_state_is_ignored(tmp_path: Path) -> None:
    """No files, a body that does not match its hash, or bad JSON load as None."""
    assert load_feed(tmp_path, "f") is None
    save_feed(tmp_path, "f", StoredFeed(b"1.2.3.4\n", "a.txt"))
    (tmp_path / "f.body").write_bytes(b"9.9.9.9\n")
    assert load_feed(tmp_path, "f") is None
    (tmp_path / "f.json").write_bytes(b"{not json")
    assert load_feed(tmp_path, "f") is None
